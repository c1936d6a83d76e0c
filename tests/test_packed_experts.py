"""MoE expert layers packed bf16 (omlx/kernels/expert_linear.py): the layer against a float32
reference of the same bf16-rounded operands, each row's result independent of the step's
other rows, the load-time swap of mlx-lm's SwitchLinear / QuantizedSwitchLinear, and a tiny
MoE model on the packed path generating in the engine (alone and batched alike)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm import load
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from omlx.kernels import linear
from omlx.kernels.expert_linear import PackedSwitchLinear, expert_linear, pack_experts
from omlx.kernels.linear import PackedLinear, matmul_path
from omlx.models import packed_weights, weight_form
from omlx.models.facts import parameter_bytes
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.testing.tiny_families import build_from_config

TINY_MOE = {  # qwen3_moe: full attention, every layer's MLP a SwitchGLU over 4 experts, top 2
    "model_type": "qwen3_moe",
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
    "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def bf16_rounded(a: np.ndarray) -> np.ndarray:
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32)).astype(np.float64)


def reference(x_rows: np.ndarray, experts: np.ndarray, w: np.ndarray, bias: np.ndarray | None):
    """Per output row: x @ W[e].T (+ b[e]) in float64 from the bf16-rounded operands, and the
    float32 accumulation bound (K + 2 roundings of 2^-24 relative to the sum of |products|)."""
    xr, wr = bf16_rounded(x_rows), bf16_rounded(w)
    picked = wr[experts]  # (R, N, K)
    exact = np.einsum("rk,rnk->rn", xr, picked)
    magnitude = np.einsum("rk,rnk->rn", np.abs(xr), np.abs(picked))
    if bias is not None:
        exact = exact + bias[experts]
        magnitude = magnitude + np.abs(bias[experts])
    return exact, (x_rows.shape[-1] + 2) * 2.0**-24 * magnitude + 1e-30


def assert_within(got: mx.array, exact: np.ndarray, bound: np.ndarray) -> None:
    got = np.array(got).astype(np.float64).reshape(exact.shape)
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) - bound))


@settings(max_examples=50, deadline=None)
@given(tokens=st.sampled_from([1, 1, 2, 5, 6, 7, 32, 33, 129, 600]),  # decode to > 512 rows
       n=st.integers(1, 150), k=st.integers(1, 130), experts=st.integers(1, 9), top_k=st.integers(1, 4),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_equals_float32_reference_of_rounded_operands(tokens, n, k, experts, top_k, with_bias, seed):
    """Both forms mlx-lm's SwitchGLU calls: a token's row expanded over its top-k experts
    (x (T, 1, 1, K), indices (T, k)), and rows sorted by expert (x (R, 1, K), indices (R,))."""
    top_k = min(top_k, experts)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    w = rng.standard_normal((experts, n, k)).astype(np.float32)
    bias = rng.standard_normal((experts, n)).astype(np.float32) if with_bias else None
    idx = np.argsort(rng.random((tokens, experts)), axis=-1)[:, :top_k].astype(np.uint32)
    packed = pack_experts(mx.array(w))
    b = None if bias is None else mx.array(bias)

    expanded = expert_linear(mx.array(x)[:, None, None, :], mx.array(idx), packed, b, n, k)
    assert expanded.shape == (tokens, top_k, 1, n) and expanded.dtype == mx.float32
    assert_within(expanded, *reference(np.repeat(x, top_k, axis=0), idx.reshape(-1), w, bias))

    order = np.argsort(idx.reshape(-1), kind="stable")
    rows, row_experts = np.repeat(x, top_k, axis=0)[order], idx.reshape(-1)[order]
    sorted_form = expert_linear(mx.array(rows)[:, None, :], mx.array(row_experts), packed, b, n, k)
    assert sorted_form.shape == (tokens * top_k, 1, n)
    assert_within(sorted_form, *reference(rows, row_experts, w, bias))


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 40), n=st.integers(1, 140), k=st.integers(1, 90), seed=st.integers(0, 2**16),
       data=st.data())
def test_each_row_is_bit_identical_alone_and_in_any_batch(tokens, n, k, seed, data):
    """Batch invariance of a served MoE model rests on this: a token's output does not depend
    on how many other tokens share its step, which experts they chose, or where it sits."""
    experts, top_k = 6, 2
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((tokens, 1, 1, k)).astype(np.float32))
    idx = mx.array(np.argsort(rng.random((tokens, experts)), axis=-1)[:, :top_k].astype(np.uint32))
    packed = pack_experts(mx.array(rng.standard_normal((experts, n, k)).astype(np.float32)))
    bias = mx.array(rng.standard_normal((experts, n)).astype(np.float32))
    batch = np.array(expert_linear(x, idx, packed, bias, n, k))
    row = data.draw(st.integers(0, tokens - 1))
    alone = np.array(expert_linear(x[row:row + 1], idx[row:row + 1], packed, bias, n, k))
    assert np.array_equal(batch[row:row + 1], alone)
    # Among other tokens routed elsewhere, at the end of the step, its experts listed reversed.
    others = data.draw(st.integers(0, 9))
    x_mixed = mx.concatenate([mx.array(rng.standard_normal((others, 1, 1, k)).astype(np.float32)), x[row:row + 1]])
    idx_mixed = mx.concatenate([mx.array(rng.integers(0, experts, (others, top_k)).astype(np.uint32)),
                                idx[row:row + 1, ::-1]])
    mixed = np.array(expert_linear(x_mixed, idx_mixed, packed, bias, n, k))
    assert np.array_equal(mixed[-1:, ::-1], alone)


@pytest.mark.parametrize(("x_shape", "idx_shape"), [((5, 1, 3, 20), (5, 2)), ((1, 20), (4, 3)), ((2, 1, 1, 20), (2, 1))])
def test_any_broadcast_gather_mm_takes(x_shape, idx_shape):
    """Shapes mlx-lm's layers do not make (several rows per product, x shared by every
    index): the kernel reads x through its strides and gives gather_mm's result."""
    rng = np.random.default_rng(sum(x_shape))
    x = mx.array(rng.standard_normal(x_shape).astype(np.float32))
    w = mx.array(rng.standard_normal((4, 30, 20)).astype(np.float32))
    idx = mx.array(rng.integers(0, 4, idx_shape).astype(np.uint32))
    rounded = lambda a: a.astype(mx.bfloat16).astype(mx.float32)  # noqa: E731
    want = mx.gather_mm(rounded(x), rounded(w).swapaxes(-1, -2), rhs_indices=idx)
    got = expert_linear(x, idx, pack_experts(w), None, 30, 20)
    assert got.shape == want.shape
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-4).item(), mx.abs(got - want).max().item()


def test_switch_glu_with_packed_experts_matches_float32():
    """The whole MoE block (gate, up, activation, down; sorted above 64 rows) stays within
    bf16 rounding of the float32 block."""
    mx.random.seed(1)
    block = SwitchGLU(48, 40, 5)
    mx.eval(block.parameters())
    packed = SwitchGLU(48, 40, 5)
    packed.update(block.parameters())
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(packed, name, PackedSwitchLinear.from_switch(getattr(block, name)))
    for tokens in (1, 3, 40):  # 40 tokens x top 2 = 80 rows: mlx-lm sorts them by expert
        x = mx.random.normal((tokens, 48))
        idx = mx.argpartition(-mx.random.normal((tokens, 5)), kth=1, axis=-1)[..., :2]
        want, got = block(x, idx), packed(x, idx)
        assert got.shape == want.shape
        assert mx.allclose(got, want, rtol=0.05, atol=0.02).item(), mx.abs(got - want).max().item()


def test_quantized_experts_pack_their_dequantized_weights():
    mx.random.seed(2)
    dense = SwitchLinear(64, 70, 3, bias=True)
    dense.bias = mx.random.normal((3, 70))
    quantized = dense.to_quantized(group_size=32, bits=4)
    assert isinstance(quantized, QuantizedSwitchLinear)
    layer = PackedSwitchLinear.from_switch(quantized)
    w = np.array(mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=32, bits=4))
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    idx = np.array([[0, 2], [1, 0], [2, 1], [2, 0]], np.uint32)
    got = layer(mx.array(x)[:, None, None, :], mx.array(idx))
    assert_within(got, *reference(np.repeat(x, 2, axis=0), idx.reshape(-1), w, np.array(dense.bias)))
    assert (layer.num_experts, layer.output_dims, layer.input_dims) == (3, 70, 64)


def test_bad_operands_are_refused():
    packed = pack_experts(mx.zeros((2, 8, 6)))
    with pytest.raises(ValueError, match="features"):
        expert_linear(mx.zeros((3, 1, 1, 4)), mx.zeros((3, 2), mx.uint32), packed, None, 8, 6)
    with pytest.raises(ValueError, match="out_features"):
        expert_linear(mx.zeros((3, 1, 1, 6)), mx.zeros((3, 2), mx.uint32), packed, None, 100, 6)
    with pytest.raises(ValueError, match="integers"):
        expert_linear(mx.zeros((3, 1, 1, 6)), mx.zeros((3, 2)), packed, None, 8, 6)
    with pytest.raises(ValueError, match="bias"):
        expert_linear(mx.zeros((3, 1, 1, 6)), mx.zeros((3, 2), mx.uint32), packed, mx.zeros((8,)), 8, 6)


def test_an_expert_index_out_of_range_gives_zeros_not_garbage():
    packed = pack_experts(mx.ones((2, 8, 6)))
    y = np.array(expert_linear(mx.ones((2, 1, 6)), mx.array([1, 7], mx.uint32), packed, None, 8, 6))
    assert np.all(y[0] == 6.0) and np.all(y[1] == 0.0)


# ----------------------------------------------------------------------------- a tiny MoE model
@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return build_from_config(tmp_path_factory.mktemp("moe") / "m", TINY_MOE, seed=4)


@pytest.fixture
def bf16_path(monkeypatch):
    monkeypatch.setenv(linear.ENV, "bf16")
    matmul_path.cache_clear()
    yield matmul_path()
    matmul_path.cache_clear()


def generate(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=24),
                       context_window=4096)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), prompt, max_tokens))
    for _ in range(500):
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[request_id].append(event.token_id)
        if not engine.has_work:
            break
    assert engine.blocks.leaked_blocks() == []
    return [outputs[str(i)] for i in range(len(prompts))]


def test_a_tiny_moe_runs_packed_and_generates_the_same_alone_and_batched(moe_path, bf16_path):
    assert bf16_path.bf16, bf16_path.reason
    model, _ = load(str(moe_path))
    float32_bytes = parameter_bytes(model)
    assert weight_form.apply(model, None, 1 << 30) == weight_form.BF16_PACKED
    types = {type(m) for _, m in model.named_modules()}
    assert PackedSwitchLinear in types and PackedLinear in types
    assert SwitchLinear not in types and nn.Linear not in types
    assert packed_weights.is_packed(model) and not weight_form.runs_exactly(model)
    # Every expert held once in bf16 (2 bytes a weight; N padded to the 64-column panel, which
    # at this tiny width doubles the 32-wide gate/up; real expert widths are panel multiples).
    for _, m in model.named_modules():
        if isinstance(m, PackedSwitchLinear):
            n_pad, k_pad = -(-m.output_dims // 64) * 64, m.input_dims + m.input_dims % 2
            assert m.weight.dtype == mx.bfloat16 and m.weight.nbytes == m.num_experts * n_pad * k_pad * 2
    assert parameter_bytes(model) < 0.7 * float32_bytes

    rng = np.random.default_rng(7)
    prompts = [[int(t) for t in rng.integers(5, 500, size)] for size in (3, 17, 9, 30)]
    together = generate(model, prompts, 12)
    assert all(len(tokens) == 12 for tokens in together)
    for prompt, tokens in zip(prompts, together):
        assert generate(model, [prompt], 12)[0] == tokens


def test_packed_moe_agrees_with_float32(moe_path, bf16_path):
    """Teacher-forced next-token choices of the packed model match float32's on nearly every
    position (the bf16 rounding of weights and activations moves a few near ties at most)."""
    float32, _ = load(str(moe_path))
    packed, _ = load(str(moe_path))
    assert packed_weights.pack_model(packed) > 0
    tokens = mx.array([[int(t) for t in np.random.default_rng(3).integers(5, 500, 200)]])
    want = np.array(mx.argmax(float32(tokens), axis=-1))
    got = np.array(mx.argmax(packed(tokens), axis=-1))
    assert np.mean(want == got) >= 0.95


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "qwen3_next", "deepseek_v32"])
def test_moe_families_pack_every_expert_layer(tmp_path, family):
    """Expert layers with biases and a custom activation (gpt_oss), a shared expert beside
    the routed ones (llama4, qwen3_next), MLA with routed experts (deepseek_v32): every
    SwitchLinear is swapped, each MoE block gives what its float32 experts give to bf16
    rounding, and the model runs.  (Whole-model logits of a random tiny MoE are no measure:
    rounding anywhere upstream flips its near-tied router choices.)"""
    from mlx_lm.models.switch_layers import SwitchMLP

    from omlx.kernels.expert_linear import switch_linear_types
    from omlx.testing.tiny_sweep import build_sweep_model

    path = build_sweep_model(tmp_path / family, family)
    before, _ = load(str(path))
    packed, _ = load(str(path))
    experts = sum(type(m) in switch_linear_types() for _, m in before.named_modules())
    assert experts > 0 and packed_weights.pack_model(packed) > 0
    assert sum(isinstance(m, PackedSwitchLinear) for _, m in packed.named_modules()) == experts
    assert not any(type(m) in switch_linear_types() for _, m in packed.named_modules())

    blocks = dict(packed.named_modules())
    checked = 0
    for name, block in before.named_modules():
        if not isinstance(block, (SwitchGLU, SwitchMLP)):
            continue
        first = block.gate_proj if isinstance(block, SwitchGLU) else block.fc1
        x = mx.random.normal((7, first.input_dims), key=mx.random.key(checked))
        idx = mx.argpartition(mx.random.normal((7, first.num_experts), key=mx.random.key(99)), kth=1,
                              axis=-1)[..., :2]
        want, got = block(x, idx), blocks[name](x, idx)
        scale = mx.abs(want).max().item()
        assert mx.abs(got - want).max().item() <= 0.03 * scale, (name, mx.abs(got - want).max().item(), scale)
        checked += 1
    assert checked > 0
    logits = packed(mx.array([[int(t) for t in np.random.default_rng(5).integers(5, 500, 40)]]))
    assert logits.shape[1] == 40 and bool(mx.all(mx.isfinite(logits)).item())


def test_a_quantized_moe_packs_its_dequantized_experts(moe_path, bf16_path):
    """`dequantize: true` on a CPU with a bf16 unit: the packed bf16 form, experts included."""
    model, _ = load(str(moe_path))
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    assert any(isinstance(m, QuantizedSwitchLinear) for _, m in model.named_modules())
    assert weight_form.apply(model, True, 1 << 30) == weight_form.BF16_PACKED
    types = {type(m) for _, m in model.named_modules()}
    assert PackedSwitchLinear in types and QuantizedSwitchLinear not in types
    assert generate(model, [[5, 6, 7, 8]], 4)[0]


def test_a_tiny_moe_served_on_the_bf16_path_generates(tmp_path):
    """`omlx serve` on the packed path (a real server process, the openai SDK): the MoE model
    loads with its experts packed, the paged engine serves it, and concurrent clients get the
    tokens one client gets alone."""
    import concurrent.futures

    import openai

    from omlx_process import call, omlx_server

    models = tmp_path / "models"
    build_from_config(models / "tiny-moe", TINY_MOE, seed=4)
    with omlx_server(models, tmp_path, env={"OMLX_MATMUL": "bf16"}, failure=pytest.fail) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
            def ask(text: str) -> str:
                reply = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": text}],
                                                       max_tokens=12, temperature=0)
                assert reply.usage.completion_tokens > 0
                return reply.choices[0].message.content

            questions = ["hello there", "what is the weather like", "count to three", "tell me a story"]
            alone = [ask(q) for q in questions]
            with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
                together = list(pool.map(ask, questions))
        assert together == alone
        status, body = call(server, "GET", "/health")
        assert status == 200 and body["compute"]["matmul"]["matmul"] == "bf16-packed"
        assert body["models_loaded"]["tiny-moe"]["kv_cache"].get("engine") != "fallback"
        log = server.log_path.read_text()
        assert "tiny-moe runs with bf16 weights packed" in log and "fallback engine" not in log
