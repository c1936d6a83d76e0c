"""The routed attention layer (omlx/models/ragged_attention.py): a llama-style attention's
ragged pass as a fused q/k/v call, one `rope_split` node, the pool writes, the paged kernel and
o_proj - bit-identical to the layer's own path, in every step mix and pool dtype, with every
other call left to mlx-lm's code."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from omlx.kernels import cpu_features, fused_ops
from omlx.models import packed_weights
from omlx.models.fused_mlp import fuse_mlps, is_fused_mlp
from omlx.models.fused_residual import PendingRMSNorm, fuse_residual_norms
from omlx.models.ragged_attention import is_routed, route_ragged_attention
from omlx.models.shared_rope import SharedRoPE, share_rope_tables
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler import runner as runner_module
from omlx.testing.tiny_models import TinyModelSpec, build_model

pytestmark = [
    pytest.mark.skipif(cpu_features.cpu_features().bf16_isa is None,
                       reason="the packed path runs only where the CPU has a bf16 unit"),
]


def kernel():
    module = fused_ops.kernel()
    assert module is not None and hasattr(module, "rope_split"), "the fused ops kernel is built by scripts/setup.sh"
    return module


# --------------------------------------------------------------------------- rope_split
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims, head_dim", [(16, 16), (8, 16), (64, 64)])
@pytest.mark.parametrize("tokens, one_offset", [(1, False), (7, False), (5, True)])
@pytest.mark.parametrize("kv_dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_rope_split_equals_rope_and_cast(traditional, dims, head_dim, tokens, one_offset, kv_dtype):
    hq, hkv = 6, 2
    rng = np.random.default_rng(tokens * 31 + dims)
    qkv = mx.array(rng.standard_normal((tokens, 1, (hq + 2 * hkv) * head_dim)).astype(np.float32) * 4)
    offsets = 11 if one_offset else mx.array(rng.integers(0, 3000, size=tokens).astype(np.int32))
    rope = SharedRoPE(dims, traditional, 10000.0, 1.0)

    def heads(lo, n):  # mlx-lm's layout: (B, H, L, D) views of the projection
        part = qkv[..., lo * head_dim:(lo + n) * head_dim]
        return part.reshape(tokens, 1, n, head_dim).transpose(0, 2, 1, 3)

    queries, keys, values = heads(0, hq), heads(hq, hkv), heads(hq + hkv, hkv)
    want_q, want_k = rope(queries, offsets), rope(keys, offsets)
    _, _, table = rope.table_for(tokens, 1, mx.float32, offsets)
    q, k, v = kernel().rope_split(qkv, table, hq, hkv, head_dim, dims, traditional, kv_dtype)
    assert q.shape == (tokens, hq, head_dim) and q.dtype == mx.float32
    assert k.shape == v.shape == (tokens * hkv, head_dim) and k.dtype == v.dtype == kv_dtype
    assert np.array_equal(np.array(q), np.array(want_q.reshape(tokens, hq, head_dim)))
    assert np.array_equal(np.array(k.astype(mx.float32)), np.array(want_k.reshape(-1, head_dim).astype(kv_dtype).astype(mx.float32)))
    assert np.array_equal(np.array(v.astype(mx.float32)), np.array(values.reshape(-1, head_dim).astype(kv_dtype).astype(mx.float32)))


@pytest.mark.parametrize("tokens", [1, 6])
def test_rope_split_with_head_norms_equals_kernel_norm_then_rope(tokens):
    """qwen3: q and k pass a per-head RMSNorm (the one-node kernel norm) before RoPE."""
    from omlx.models.kernel_norms import KernelRMSNorm

    hq, hkv, d = 4, 2, 32
    rng = np.random.default_rng(tokens)
    qkv = mx.array(rng.standard_normal((tokens, 1, (hq + 2 * hkv) * d)).astype(np.float32) * 3)
    q_norm = KernelRMSNorm(mx.array(rng.standard_normal(d).astype(np.float32)), 1e-6)
    k_norm = KernelRMSNorm(mx.array(rng.standard_normal(d).astype(np.float32)), 1e-5)
    offsets = mx.array(rng.integers(0, 500, size=tokens).astype(np.int32))
    rope = SharedRoPE(d, False, 1e6, 1.0)

    def heads(lo, n):
        return qkv[..., lo * d:(lo + n) * d].reshape(tokens, 1, n, d)

    want_q = rope(q_norm(heads(0, hq)).transpose(0, 2, 1, 3), offsets)
    want_k = rope(k_norm(heads(hq, hkv)).transpose(0, 2, 1, 3), offsets)
    _, _, table = rope.table_for(tokens, 1, mx.float32, offsets)
    q, k, _ = kernel().rope_split(qkv, table, hq, hkv, d, d, False, mx.float32, q_norm=q_norm.weight,
                                  k_norm=k_norm.weight, q_eps=1e-6, k_eps=1e-5)
    assert np.array_equal(np.array(q), np.array(want_q.reshape(tokens, hq, d)))
    assert np.array_equal(np.array(k), np.array(want_k.reshape(-1, d)))


def test_rope_split_rounds_like_astype_at_the_edges():
    """Ties, NaN, infinities and subnormals round into bf16 exactly as MLX's astype does."""
    specials = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -1.0 - 2 ** -8, np.nan, np.inf, -np.inf, 1e-40, -0.0,
                         3.4e38, 65519.0, 65520.0, 1e-8], dtype=np.float32)
    hq, hkv, d = 1, 1, 16
    values = np.resize(specials, (2, 1, d)).astype(np.float32)
    qkv = mx.array(np.concatenate([np.zeros((2, 1, 2 * d), np.float32), values], axis=-1))
    rope = SharedRoPE(d, False, 10000.0, 1.0)
    _, _, table = rope.table_for(2, 1, mx.float32, mx.array([0, 1], dtype=mx.int32))
    for dtype in (mx.bfloat16, mx.float16):
        _, _, v = kernel().rope_split(qkv, table, hq, hkv, d, d, False, dtype)
        want = mx.array(values.reshape(-1, d)).astype(dtype)
        assert np.array_equal(np.array(v.astype(mx.float32)), np.array(want.astype(mx.float32)), equal_nan=True)


@pytest.mark.parametrize("kv_dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("held", [False, True])
def test_rope_store_writes_the_split_rows_into_the_pools_in_place(kv_dtype, held):
    """`rope_store` is rope_split then `pool[rows] = k` / `= v`: the pool arrays become the new
    pools (same Python objects); a pool someone else still holds is copied, never changed."""
    hq, hkv, d, tokens = 4, 2, 16, 3
    rng = np.random.default_rng(9)
    qkv = mx.array(rng.standard_normal((tokens, 1, (hq + 2 * hkv) * d)).astype(np.float32))
    offsets = mx.array([4, 9, 0], dtype=mx.int32)
    rope = SharedRoPE(d, False, 10000.0, 1.0)
    _, _, table = rope.table_for(tokens, 1, mx.float32, offsets)
    rows = mx.array([5, 6, 11, 12, 30, 31], dtype=mx.int32)
    start = rng.standard_normal((40, d)).astype(np.float32)
    pool_k, pool_v = mx.array(start).astype(kv_dtype), mx.array(start[::-1].copy()).astype(kv_dtype)
    mx.eval(pool_k, pool_v)
    want_k, want_v = mx.array(pool_k), mx.array(pool_v)
    q_want, k_new, v_new = kernel().rope_split(qkv, table, hq, hkv, d, d, False, kv_dtype)
    want_k[rows] = k_new
    want_v[rows] = v_new
    before = (np.array(pool_k.astype(mx.float32)), mx.array(pool_k)) if held else None
    k_object = pool_k
    q = kernel().rope_store(qkv, table, rows, pool_k, pool_v, hq, hkv, d, d, False)
    mx.eval(q, pool_k, pool_v)
    assert pool_k is k_object and pool_k.shape == (40, d) and pool_k.dtype == kv_dtype
    assert np.array_equal(np.array(q), np.array(q_want))
    assert np.array_equal(np.array(pool_k.astype(mx.float32)), np.array(want_k.astype(mx.float32)))
    assert np.array_equal(np.array(pool_v.astype(mx.float32)), np.array(want_v.astype(mx.float32)))
    if held:  # the held array still has the old contents
        assert np.array_equal(np.array(before[1].astype(mx.float32)), before[0])


def test_rope_store_reuses_the_pool_buffer():
    """Each pool is its own node's single output, so its old buffer is donated, not copied:
    a big pool costs nothing extra to write (measured by memory, not time: the peak grows by
    far less than a pool's bytes over many writes)."""
    hq, hkv, d = 4, 2, 64
    rows_total = 1 << 18  # 32 MiB a float32 pool
    pool_k, pool_v = mx.zeros((rows_total, d)), mx.zeros((rows_total, d))
    mx.eval(pool_k, pool_v)
    rope = SharedRoPE(d, False, 10000.0, 1.0)
    qkv = mx.ones((1, 1, (hq + 2 * hkv) * d))
    rows = mx.array([7, 8], dtype=mx.int32)
    mx.eval(qkv, rows)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    for step in range(8):
        _, _, table = rope.table_for(1, 1, mx.float32, mx.array([step], dtype=mx.int32))
        q = kernel().rope_store(qkv, table, rows, pool_k, pool_v, hq, hkv, d, d, False)
        mx.eval(q, pool_k, pool_v)
    assert mx.get_peak_memory() - before < rows_total * d * 4 // 4
    assert float(pool_v[8, 0].item()) == 1.0 and float(pool_v[9, 0].item()) == 0.0


def test_rope_store_refuses_mismatched_pools_and_rows():
    qkv, table = mx.zeros((2, 1, 8 * 16)), mx.zeros((2, 1, 16))
    rows = mx.zeros((4,), dtype=mx.int32)
    good = dict(q_heads=4, kv_heads=2, head_dim=16, dims=16, traditional=False)
    with pytest.raises(ValueError):  # value pool of another dtype
        kernel().rope_store(qkv, table, rows, mx.zeros((8, 16)), mx.zeros((8, 16), mx.bfloat16), **good)
    with pytest.raises(ValueError):  # one row per (token, kv head)
        kernel().rope_store(qkv, table, mx.zeros((3,), dtype=mx.int32), mx.zeros((8, 16)), mx.zeros((8, 16)), **good)
    with pytest.raises(ValueError):  # pools of another head width
        kernel().rope_store(qkv, table, rows, mx.zeros((8, 8)), mx.zeros((8, 8)), **good)


@pytest.mark.parametrize("bad", ["shape", "heads", "dims", "table", "dtype"])
def test_rope_split_refuses_bad_input(bad):
    qkv = mx.zeros((3, 1, 8 * 16))
    table = mx.zeros((3, 1, 16))
    args = dict(qkv=qkv, table=table, q_heads=4, kv_heads=2, head_dim=16, dims=16, traditional=False,
                kv_dtype=mx.float32)
    args.update({"shape": {"qkv": mx.zeros((3, 8 * 16))}, "heads": {"kv_heads": 3},
                 "dims": {"dims": 15}, "table": {"table": mx.zeros((2, 1, 16))},
                 "dtype": {"kv_dtype": mx.int32}}[bad])
    with pytest.raises(ValueError):
        kernel().rope_split(**args)


# -------------------------------------------------------------------------- swiglu_split
@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (5, 1, 2 * 40), (3, 4, 2 * 24), (9, 2 * 33), (2 * 8,)])
def test_swiglu_split_equals_mlx_lms_compiled_swiglu(shape):
    from mlx_lm.models.activations import swiglu

    values = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 12
    values.flat[:12] = [0.0, -0.0, np.nan, np.inf, -np.inf, 88.5, -88.5, 1e-40, -1e-40, 87.9, -87.9, 1e-8]
    gate_up = mx.array(values)
    half = shape[-1] // 2
    want = swiglu(gate_up[..., :half], gate_up[..., half:])
    got = kernel().swiglu_split(gate_up)
    assert got.shape == want.shape
    assert np.array_equal(np.array(got), np.array(want), equal_nan=True)
    # A strided view (every other row) is read through its strides.
    if len(shape) > 1 and shape[0] > 2:
        view = gate_up[::2]
        want = swiglu(view[..., :half], view[..., half:])
        assert np.array_equal(np.array(kernel().swiglu_split(view)), np.array(want), equal_nan=True)


def test_swiglu_split_vector_lanes_equal_mlx_over_every_kind_of_float():
    """The 16-lane path (rows of 1536) against MLX's compiled swiglu on 3M values: normal ones
    at several scales, the +-88 cut-offs' neighbourhood, and raw bit patterns (NaNs, infinities,
    subnormals, huge magnitudes)."""
    from mlx_lm.models.activations import swiglu

    rng = np.random.default_rng(23)
    parts = [rng.standard_normal(1 << 20).astype(np.float32) * scale for scale in (1, 12, 40)]
    parts.append(rng.uniform(-90, 90, 1 << 19).astype(np.float32))
    parts.append(rng.integers(0, 1 << 32, 1 << 19, dtype=np.uint64).astype(np.uint32).view(np.float32))
    values = np.concatenate(parts)
    values = values[: len(values) // 3072 * 3072].reshape(-1, 1, 3072)
    gate_up = mx.array(values)
    want = swiglu(gate_up[..., :1536], gate_up[..., 1536:])
    got = kernel().swiglu_split(gate_up)
    assert np.array_equal(np.array(got), np.array(want), equal_nan=True)


# ------------------------------------------------------------------------- add_rms_norm
@pytest.mark.parametrize("shape", [(1, 1, 576), (33, 1, 96), (4, 7), (5, 3, 40)])
def test_add_rms_norm_equals_the_add_and_the_norm_nodes(shape):
    rng = np.random.default_rng(sum(shape))
    x = mx.array(rng.standard_normal(shape).astype(np.float32) * 3)
    r = mx.array(rng.standard_normal(shape).astype(np.float32))
    w = mx.array(rng.standard_normal(shape[-1]).astype(np.float32))
    h, y = kernel().add_rms_norm(x, r, w, 1e-6)
    assert mx.array_equal(h, x + r).item() and mx.array_equal(y, kernel().rms_norm(x + r, w, 1e-6)).item()
    # Views are read through their strides.
    wide = mx.array(rng.standard_normal((shape[0] * 2,) + shape[1:]).astype(np.float32))
    h, y = kernel().add_rms_norm(wide[::2], r, w, 1e-5)
    assert mx.array_equal(h, wide[::2] + r).item() and mx.array_equal(y, kernel().rms_norm(wide[::2] + r, w, 1e-5)).item()


def test_add_rms_norm_refuses_mismatched_operands():
    with pytest.raises(ValueError):
        kernel().add_rms_norm(mx.zeros((2, 8)), mx.zeros((2, 4)), mx.ones((8,)), 1e-5)
    with pytest.raises(ValueError):
        kernel().add_rms_norm(mx.zeros((2, 8)), mx.zeros((2, 8)), mx.ones((4,)), 1e-5)


def test_a_fused_block_on_another_input_computes_its_own_norm(llama_pair):
    """The next block takes the normed sum only when handed the very array it belongs to."""
    routed, plain, _ = llama_pair
    x = mx.array(np.random.default_rng(2).standard_normal((1, 3, 96)).astype(np.float32))
    first, second = routed.model.layers[0], routed.model.layers[1]
    first(x)  # leaves its sum's normed form for the next block
    other = x * 2  # not that sum
    want = plain.model.layers[1](other)
    assert mx.array_equal(second(other), want).item()
    # And a whole forward pass equals the plain model's, bit for bit.
    tokens = mx.array([[5, 9, 33, 70, 2]])
    assert mx.array_equal(routed(tokens), plain(tokens)).item()


def test_swiglu_split_refuses_an_odd_width():
    with pytest.raises(ValueError):
        kernel().swiglu_split(mx.zeros((2, 7)))


# ------------------------------------------------------------------------- whole models
def packed_model(path, route: bool):
    model, tokenizer = load(str(path))
    packed_weights.pack_model(model)
    share_rope_tables(model)
    routed = route_ragged_attention(model) if route else 0
    if route:
        assert fuse_mlps(model) == len(model.model.layers)
        # Residual adds with the norms after them (omlx/models/fused_residual.py): the routed
        # model's steps below are compared bit for bit with the plain one's.
        assert fuse_residual_norms(model) == len(model.model.layers)
        assert type(model.model.norm) is PendingRMSNorm
    return model, routed, frozenset(tokenizer.eos_token_ids)


@pytest.fixture(scope="module", params=[
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "rope_traditional": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("qwen3", {}),  # q / k RMSNorm per head before RoPE, inside rope_split
], ids=["llama", "llama-bias-traditional", "llama3-rope", "qwen3"])
def llama_pair(request, tmp_path_factory):
    model_type, extra = request.param
    spec = TinyModelSpec(model_type=model_type, hidden_size=96, intermediate_size=136, head_dim=32,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=509, seed=11,
                         extra_config=extra)
    path = build_model(tmp_path_factory.mktemp("routed") / "m", spec)
    routed, count, eos = packed_model(path, True)
    plain, none, _ = packed_model(path, False)
    assert count == spec.num_hidden_layers and none == 0
    return routed, plain, eos


def step_logits(model, eos, prompts, max_tokens, **config):
    """Every step's logits (numpy) and every request's tokens from one engine serving the
    prompts together: chunked prefill beside decodes, several sequences per pass."""
    seen = []
    forward = runner_module.ModelRunner.forward
    decode_pass = runner_module.ModelRunner.decode_pass  # overlapped decode steps (lookahead)

    def recording(self, *args, **kwargs):
        logits = forward(self, *args, **kwargs)
        if logits is not None:
            seen.append(np.array(logits))
        return logits

    def recording_decode(self, *args, **kwargs):
        logits = decode_pass(self, *args, **kwargs)
        seen.append(np.array(logits))
        return logits

    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=96, max_num_batched_tokens=24, **config),
                       context_window=1024)
    for i, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(GenerationRequest(str(i), prompt, limit, stop_token_ids=eos))
    tokens = {i: [] for i in range(len(prompts))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module.ModelRunner, "forward", recording)
        patch.setattr(runner_module.ModelRunner, "decode_pass", recording_decode)
        while engine.has_work:
            for request_id, event in engine.step():
                if event.token_id is not None:
                    tokens[int(request_id)].append(event.token_id)
    assert engine.blocks.leaked_blocks() == []
    return seen, tokens


@pytest.mark.parametrize("config", [
    {"kv_dtype": "float32"},
    {"kv_dtype": "bfloat16"},
    {"kv_dtype": "float16", "speculative": False},
    # A quantized pool: the layer's own path (the routed one needs a plain pool) ...
    {"kv_bits": 8, "kv_group_size": 32, "quantized_kv_start": 0},
    # ... and sequences in a float pool first, then migrated: passes of either pool and of both.
    {"kv_bits": 8, "kv_group_size": 32, "quantized_kv_start": 16},
], ids=["f32-kv", "bf16-kv", "f16-kv", "q8-kv", "q8-kv-after-16"])
def test_routed_layers_are_bit_identical_in_every_step(llama_pair, config, attention_kernel, monkeypatch):
    routed, plain, eos = llama_pair
    from omlx.models import ragged_attention

    taken = []
    check = ragged_attention._ragged_fast_path
    monkeypatch.setattr(ragged_attention, "_ragged_fast_path", lambda *a: taken.append(check(*a)) or taken[-1])
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 500, size=n).tolist() for n in (3, 19, 41, 9)]
    prompts.append(prompts[1][:12] + [7, 7, 7])  # shares a cached prefix with another request
    limits = [12, 6, 10, 14, 8]
    got_logits, got_tokens = step_logits(routed, eos, prompts, limits, **config)
    want_logits, want_tokens = step_logits(plain, eos, prompts, limits, **config)
    # The routed path ran wherever it can: the fused kernel's plan and a plain pool.
    assert any(taken) == (attention_kernel.name == "fused-cpu" and config.get("quantized_kv_start") != 0)
    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits) > 10
    for got, want in zip(got_logits, want_logits):
        assert got.shape == want.shape and np.array_equal(got, want)


def test_outside_a_ragged_pass_the_layer_runs_mlx_lms_code(llama_pair):
    """No cache, or mlx-lm's own KV cache: the routed layer is the layer it was."""
    from mlx_lm.models.cache import make_prompt_cache

    routed, plain, _ = llama_pair
    tokens = mx.array([[5, 9, 200, 31, 7, 8, 400]])
    assert np.array_equal(np.array(routed(tokens)), np.array(plain(tokens)))
    caches = make_prompt_cache(routed), make_prompt_cache(plain)
    for step in (tokens, mx.array([[17]]), mx.array([[23]])):
        outs = [np.array(m(step, cache=c)) for m, c in zip((routed, plain), caches)]
        assert np.array_equal(outs[0], outs[1])


def test_layers_it_cannot_compute_exactly_are_left_alone(tmp_path):
    """qwen3's q / k norms left as MLX's (not the one-node kernel rope_split reproduces); a
    float32 (unpacked) model, with no fused projection: neither is routed."""
    from model_helpers import pack_model_without

    qwen3 = build_model(tmp_path / "q3", TinyModelSpec(model_type="qwen3", seed=2))
    model, _ = load(str(qwen3))
    pack_model_without(model, "swap_rms_norms")
    share_rope_tables(model)
    assert route_ragged_attention(model) == 0 and not is_routed(model)
    llama = build_model(tmp_path / "ll", TinyModelSpec(model_type="llama", seed=2))
    unpacked, _ = load(str(llama))
    share_rope_tables(unpacked)
    assert route_ragged_attention(unpacked) == 0


def test_parameters_and_names_are_unchanged(llama_pair):
    from mlx.utils import tree_flatten

    routed, plain, _ = llama_pair
    assert is_routed(routed) and not is_routed(plain)
    assert is_fused_mlp(routed) and not is_fused_mlp(plain)
    names = [name for name, _ in tree_flatten(routed.parameters())]
    assert names == [name for name, _ in tree_flatten(plain.parameters())]
    layer = routed.model.layers[0].self_attn
    assert type(layer).__name__ == "Attention" and isinstance(layer, type(plain.model.layers[0].self_attn))
