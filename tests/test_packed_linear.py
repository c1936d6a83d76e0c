"""The packed bf16 linear path: the primitive against a float32 reference of the same
bf16-rounded operands, its rows independent of the batch, the load-time swap, the choice of
path, and a batching engine on a packed model giving each request what it gets alone.

The real-model checks (top-1 agreement with float32, questions answered through the server)
are in tests/test_packed_linear_smollm2.py.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm import load

from omlx.kernels import cpu_features, linear
from omlx.kernels.linear import PackedEmbedding, PackedLinear, pack_bf16, packed_linear
from omlx.models import packed_weights
from omlx.models.facts import parameter_bytes
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.testing.tiny_models import TinyModelSpec, build_model
from model_helpers import tiny_model_pool

FEATURES = cpu_features.cpu_features()
requires_bf16_unit = pytest.mark.skipif(
    FEATURES.bf16_isa is None, reason="the packed path runs only where the CPU has a bf16 unit")


def bf16_rounded(a: np.ndarray) -> np.ndarray:
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def check_against_reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, y: mx.array) -> None:
    """y equals x @ w.T (+ bias) of the bf16-rounded operands, to float32 accumulation error:
    at most K roundings of 2^-24 relative to the sum of |products| (plus the bias add)."""
    xr, wr = bf16_rounded(x).astype(np.float64), bf16_rounded(w).astype(np.float64)
    exact = xr @ wr.T
    magnitude = np.abs(xr) @ np.abs(wr).T
    if bias is not None:
        exact = exact + bias
        magnitude = magnitude + np.abs(bias)
    k = x.shape[-1]
    bound = (k + 2) * 2.0**-24 * magnitude + 1e-30
    got = np.array(y).astype(np.float64)
    assert got.shape == exact.shape
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) - bound))


shapes = st.tuples(
    st.sampled_from([1, 1, 2, 3, 5, 6, 7, 13, 32, 64, 129, 513, 600]),  # rows: decode to > 512
    st.integers(1, 200),  # out features: panel multiples and not
    st.integers(1, 160),  # in features: odd and even
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_primitive_equals_float32_reference_of_rounded_operands(shape, with_bias, seed):
    m, n, k = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    y = packed_linear(mx.array(x), pack_bf16(mx.array(w)), None if bias is None else mx.array(bias), n)
    check_against_reference(x, w, bias, y)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 576, 576), (8, 1536, 576), (515, 130, 577), (33, 49152 // 64, 576)])
def test_model_shapes_and_tile_remainders(m, n, k):
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    check_against_reference(x, w, bias, packed_linear(mx.array(x), pack_bf16(mx.array(w)), mx.array(bias), n))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), n=st.integers(1, 150), k=st.integers(1, 100), seed=st.integers(0, 2**16),
       data=st.data())
def test_each_row_is_bit_identical_alone_and_in_any_batch(rows, n, k, seed, data):
    """What batch invariance of the served model rests on: no accumulation order depends on
    how many rows a call has or where a row sits among them."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((rows, k)).astype(np.float32))
    packed = pack_bf16(mx.array(rng.standard_normal((n, k)).astype(np.float32)))
    bias = mx.array(rng.standard_normal(n).astype(np.float32))
    batch = np.array(packed_linear(x, packed, bias, n))
    row = data.draw(st.integers(0, rows - 1))
    alone = np.array(packed_linear(x[row:row + 1], packed, bias, n))
    assert np.array_equal(batch[row:row + 1], alone)
    # And in a batch of other rows, at another position.
    others = mx.array(rng.standard_normal((data.draw(st.integers(0, 9)), k)).astype(np.float32))
    mixed = np.array(packed_linear(mx.concatenate([others, x[row:row + 1]]), packed, bias, n))
    assert np.array_equal(mixed[-1:], alone)


def test_inside_lazy_graphs_and_compile():
    """The kernel runs on the CPU stream after its inputs' producers: a chain of ops around
    it, left lazy until the end, and the same under mx.compile."""
    rng = np.random.default_rng(0)
    layer = PackedLinear(mx.array(rng.standard_normal((70, 45)).astype(np.float32)),
                         mx.array(rng.standard_normal(70).astype(np.float32)))
    second = PackedLinear(mx.array(rng.standard_normal((45, 70)).astype(np.float32)))
    x = mx.array(rng.standard_normal((3, 9, 45)).astype(np.float32))

    def chain(v):
        for _ in range(10):
            v = second(nn.silu(layer(v * 1.5 + 0.25))) * 0.1
        return v

    lazy = chain(x)  # one graph of 60 ops, evaluated at once
    expected = x
    for _ in range(10):
        h = layer(expected * 1.5 + 0.25)
        mx.eval(h)
        expected = second(nn.silu(h)) * 0.1
        mx.eval(expected)
    assert np.array_equal(np.array(lazy), np.array(expected))
    compiled = mx.compile(chain)
    assert np.array_equal(np.array(compiled(x)), np.array(expected))
    assert np.array_equal(np.array(compiled(x + 1)), np.array(chain(x + 1)))
    # One shapeless graph for any number of rows (a decode step's batch changes every step).
    shapeless = mx.compile(chain, shapeless=True)
    for rows in (1, 7, 2, 40):
        xs = mx.array(rng.standard_normal((rows, 45)).astype(np.float32))
        assert np.array_equal(np.array(shapeless(xs)), np.array(chain(xs)))


def test_strided_and_half_precision_inputs():
    """Views (transposed, sliced, broadcast) and float16 / bf16 activations give what their
    contiguous float32 copies give."""
    rng = np.random.default_rng(3)
    packed = pack_bf16(mx.array(rng.standard_normal((40, 24)).astype(np.float32)))
    base = mx.array(rng.standard_normal((24, 6)).astype(np.float32))
    bias_base = mx.array(rng.standard_normal(80).astype(np.float32))
    strided_x, strided_bias = base.T, bias_base[::2]
    expected = packed_linear(mx.array(np.array(strided_x)), packed, mx.array(np.array(strided_bias)), 40)
    assert np.array_equal(np.array(packed_linear(strided_x, packed, strided_bias, 40)), np.array(expected))
    row = mx.broadcast_to(base.T[:1], (5, 24))
    assert np.array_equal(np.array(packed_linear(row, packed, None, 40)),
                          np.array(packed_linear(mx.array(np.array(row)), packed, None, 40)))
    for dtype in (mx.float16, mx.bfloat16):
        half = base.T.astype(dtype)
        got = packed_linear(half, packed, None, 40)
        assert got.dtype == mx.float32
        assert np.array_equal(np.array(got), np.array(packed_linear(half.astype(mx.float32), packed, None, 40)))


def test_bad_operands_are_refused():
    packed = pack_bf16(mx.zeros((10, 8)))
    with pytest.raises(ValueError, match="features"):
        packed_linear(mx.zeros((2, 9)), packed, None, 10)
    odd = pack_bf16(mx.zeros((10, 7)))  # K padded to 8: only in_features tells 7 from 8
    with pytest.raises(ValueError, match="features"):
        packed_linear(mx.zeros((2, 8)), odd, None, 10, in_features=7)
    with pytest.raises(ValueError, match="features"):
        PackedLinear(mx.zeros((10, 7)))(mx.zeros((2, 8)))
    with pytest.raises(ValueError, match="out_features"):
        packed_linear(mx.zeros((2, 8)), packed, None, 100)
    with pytest.raises(ValueError, match="bias"):
        packed_linear(mx.zeros((2, 8)), packed, mx.zeros(3), 10)
    with pytest.raises(ValueError, match="packed bf16"):
        packed_linear(mx.zeros((2, 8)), mx.zeros((1, 4, 128)), None, 10)


def test_embedding_lookup_and_tied_head_read_one_packed_copy():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((300, 37)).astype(np.float32)
    embedding = PackedEmbedding(mx.array(table))
    ids = mx.array([[0, 63, 64, 299], [128, 1, 5, 200]])
    assert embedding(ids).dtype == mx.float32
    assert np.array_equal(np.array(embedding(ids)), bf16_rounded(table)[np.array(ids)])
    x = rng.standard_normal((5, 37)).astype(np.float32)
    check_against_reference(x, table, None, embedding.as_linear(mx.array(x)))
    assert [name for name, _ in tree_flatten(embedding.parameters())] == ["weight"]


def test_quantized_layer_packs_its_dequantized_weights():
    quantized = nn.QuantizedLinear(128, 96, bias=True, group_size=32, bits=4)
    packed = PackedLinear.from_linear(quantized)
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    dense = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=32, bits=4)
    check_against_reference(x, np.array(dense), np.array(quantized.bias), packed(mx.array(x)))


# ---------------------------------------------------------------------------- choice of path


def test_cpuinfo_flags_decide_the_bf16_unit():
    xeon = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8\n"
    epyc = "model name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    older = "model name\t: Intel(R) Xeon(R) Gold 6248\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert cpu_features.parse_cpuinfo(xeon).bf16_isa == "amx_bf16"
    assert cpu_features.parse_cpuinfo(epyc).bf16_isa == "avx512_bf16"
    assert cpu_features.parse_cpuinfo(older).bf16_isa is None
    assert cpu_features.parse_cpuinfo("").bf16_isa is None


def test_float32_is_forced_by_the_environment(matmul_env):
    chosen = matmul_env("float32")
    assert chosen.name == "float32" and not chosen.bf16 and "OMLX_MATMUL=float32" in chosen.reason
    assert chosen.info()["matmul"] == "float32" and "MLX float32" in chosen.info()["library"]


def test_auto_follows_the_cpu(matmul_env):
    chosen = matmul_env(None)
    if FEATURES.bf16_isa is None:
        assert chosen.name == "float32" and "no bf16" in chosen.reason
    else:
        assert chosen.name == "bf16-packed", chosen.reason
        assert chosen.isa.startswith("avx512_bf16") and "_linear_cpu" in chosen.info()["library"]


def test_a_stale_kernel_is_not_used(matmul_env, monkeypatch):
    from omlx.kernels import build

    monkeypatch.setattr(build, "stamp_text", lambda module=build.ATTENTION: "mlx=0.0.0 source=other\n")
    linear.kernel.cache_clear()
    try:
        chosen = matmul_env("bf16")
        assert chosen.name == "float32" and "another MLX version" in chosen.reason
    finally:
        monkeypatch.undo()
        linear.kernel.cache_clear()


# ---------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # Dims off the 64-column panel and odd vocab: padding everywhere.
    spec = TinyModelSpec(model_type="llama", hidden_size=72, intermediate_size=136, head_dim=18,
                         vocab_size=509, seed=5)
    return build_model(tmp_path_factory.mktemp("packed") / "m", spec)


def test_swap_packs_every_linear_and_halves_the_weight_bytes(tiny_path):
    model, _ = load(str(tiny_path))
    float32_bytes = parameter_bytes(model)
    linears = sum(type(m) is nn.Linear for _, m in model.named_modules())
    swapped = packed_weights.pack_model(model)
    assert swapped == linears + 1  # + the embedding
    assert not any(type(m) in (nn.Linear, nn.Embedding) for _, m in model.named_modules())
    assert all(v.dtype in (mx.float32, mx.bfloat16) for _, v in tree_flatten(model.parameters()))
    # Half, give or take the padding of 72-wide layers to 128-column panels and the norms.
    assert parameter_bytes(model) < 0.75 * float32_bytes
    logits = model(mx.array([[1, 2, 3, 4, 5]]))
    assert logits.dtype == mx.float32 and logits.shape == (1, 5, 509)


def test_a_model_that_reads_weights_itself_keeps_its_layers(tiny_path):
    """Model code that reads a layer's weight directly (not through its call) cannot run on
    packed layers: the swap is undone and the model runs as loaded."""
    model, _ = load(str(tiny_path))

    class ReadsHeadWeight(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, ids):
            hidden = self.inner.model(ids)
            return hidden @ self.inner.lm_head.weight.T

    wrapped = ReadsHeadWeight(model)
    before = np.array(wrapped(mx.array([[3, 4, 5]])))
    assert packed_weights.pack_model(wrapped) == 0
    assert any(type(m) is nn.Linear for _, m in wrapped.named_modules())
    assert np.array_equal(np.array(wrapped(mx.array([[3, 4, 5]]))), before)


def test_quantized_model_is_packed_when_it_would_have_been_dequantized(tmp_path, matmul_env):
    model, _ = load(str(build_model(tmp_path / "m", TinyModelSpec(seed=4))))
    nn.quantize(model, group_size=32, bits=4)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    path = matmul_env("bf16")
    assert path.bf16, path.reason
    assert not packed_weights.should_pack(model, None, dequantize=False)  # kept as stored
    assert not packed_weights.should_pack(model, False, dequantize=True)  # the setting says so
    assert packed_weights.prepare(model, None, dequantize=True)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.Linear)) for _, m in model.named_modules())
    float32 = matmul_env("float32")
    assert not packed_weights.should_pack(model, True, dequantize=True) and not float32.bf16


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def packed_tiny(request, tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp(f"packed-{request.param}") / "m",
                       TinyModelSpec(model_type=request.param, seed=3))
    model, tokenizer = load(str(path))
    packed_weights.pack_model(model)
    return model, frozenset(tokenizer.eos_token_ids)


def run_engine(model, eos, prompts, max_tokens, arrivals, block_size, budget) -> dict[int, list[int]]:
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    engine = LLMEngine(model, EngineConfig(block_size=block_size, num_blocks=len(prompts) * (-(-longest // block_size) + 2),
                                           max_num_batched_tokens=budget), context_window=4096)
    outputs = {i: [] for i in range(len(prompts))}
    finished = set()
    for step in range(3000):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                engine.add_request(GenerationRequest(str(i), prompts[i], max_tokens[i], stop_token_ids=eos))
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
            if event.finish_reason is not None:
                finished.add(request_id)
        if len(finished) == len(prompts) and not engine.has_work:
            break
    assert len(finished) == len(prompts)
    assert engine.blocks.leaked_blocks() == []
    return outputs


SHARED = [int(t) for t in np.random.default_rng(11).integers(5, 500, 50)]


@pytest.mark.usefixtures("attention_kernel")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(st.fixed_dictionaries({
        "shared": st.integers(0, len(SHARED)),
        "suffix": st.lists(st.integers(5, 500), min_size=1, max_size=24),
        "max_tokens": st.integers(1, 16),
        "arrival": st.integers(0, 8),
    }), min_size=1, max_size=8),
    block_size=st.sampled_from([4, 16]),
    budget=st.sampled_from([5, 16, 64]),
)
@requires_bf16_unit
@pytest.mark.slow
def test_packed_model_is_batch_invariant_in_the_engine(packed_tiny, requests, block_size, budget):
    """A request's greedy tokens on the packed bf16 model are the ones it gets alone in the
    engine, whatever else is in flight, when it arrives, how its prompt is chunked and whether
    its prefix is shared.  (Against mlx-lm's own forward pass it agrees only to bf16 rounding:
    the paged attention's last bits can flip the rounding of a later layer's input, which the
    float32 path absorbs; the load-time self-check and the SmolLM2 agreement test cover that.)"""
    model, eos = packed_tiny
    prompts = [SHARED[: r["shared"]] + r["suffix"] for r in requests]
    max_tokens = [r["max_tokens"] for r in requests]
    together = run_engine(model, eos, prompts, max_tokens, [r["arrival"] for r in requests], block_size, budget)
    for i, prompt in enumerate(prompts):
        alone = run_engine(model, eos, [prompt], [max_tokens[i]], [0], block_size, budget)[0]
        assert together[i] == alone, f"request {i} diverged: {requests}, block_size={block_size}, budget={budget}"


async def test_pool_loads_packed_and_counts_the_packed_bytes(tiny_path, tmp_path, matmul_env):
    """Through the real loading path: the model's layers are packed, and the ledger holds
    the packed weight bytes, about half of the float32 file's."""
    assert matmul_env("bf16").bf16
    pool = tiny_model_pool(tiny_path, tmp_path)
    try:
        async with pool.lease("m") as leased:
            assert leased.model_id == "m"
        resident = pool.resident("m")
        from omlx.scheduler.fallback_engine import FallbackEngine

        # The paged engine serves it (its load-time self-check accepts bf16 rounding).
        assert isinstance(resident.model.engine.engine, LLMEngine), type(resident.model.engine.engine)
        assert not isinstance(resident.model.engine.engine, FallbackEngine)
        model = resident.model.engine.engine.model
        assert any(isinstance(m, PackedLinear) for _, m in model.named_modules())
        assert not any(type(m) is nn.Linear for _, m in model.named_modules())
        assert resident.model.weights_bytes == parameter_bytes(model)
        file_bytes = (tiny_path / "model.safetensors").stat().st_size
        assert resident.model.weights_bytes < 0.75 * file_bytes
    finally:
        await pool.close()


async def test_the_draft_model_is_packed_too(tmp_path, matmul_env):
    """A draft model loads through the same path as the model it drafts for."""
    from omlx.models.pool import ModelPool
    from omlx.settings import SettingsStore

    assert matmul_env("bf16").bf16
    for name, seed in (("main", 0), ("draft", 1)):
        build_model(tmp_path / "models" / name, TinyModelSpec(seed=seed))
    (tmp_path / "home").mkdir()
    config = EngineConfig(block_size=16, num_blocks=32, max_num_batched_tokens=64, speculative=True,
                          draft_model="draft")
    pool = ModelPool([tmp_path / "models"], config, memory_budget=1 << 30, settings=SettingsStore(tmp_path / "home"))
    try:
        async with pool.lease("main"):
            pass
        engine = pool.resident("main").model.engine.engine
        drafter = engine.scheduler.speculator.drafter
        assert drafter is not None, "the draft model was not used"
        draft = drafter.runner.model
        assert any(isinstance(m, PackedLinear) for _, m in draft.named_modules())
        assert not any(type(m) is nn.Linear for _, m in draft.named_modules())
    finally:
        await pool.close()
