"""The fused CPU attention kernel against the portable MLX-ops path on the same ragged plans.

Hypothesis mixes decode rows and prefill chunks at any offset, block sizes, GQA ratios, head
dims, float / half / quantized pools, and sequences sharing cached prefixes.
"""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.kernels import backend
from omlx.kernels.paged_attention import QuantizedRows, RaggedPlan, ragged_attention

KERNEL = backend.attention_backend().module


def test_fused_kernel_is_built_and_chosen():
    """Setup builds the kernel; on the CPU it is what runs (the fallback is tested below)."""
    assert mx.default_device() == mx.cpu
    chosen = backend.attention_backend()
    assert chosen.name == "fused-cpu", chosen.reason
    assert chosen.info()["attention"] == "fused-cpu"


def test_portable_forced_by_environment(monkeypatch):
    monkeypatch.setenv(backend.ENV, "portable")
    backend.attention_backend.cache_clear()
    try:
        chosen = backend.attention_backend()
        assert chosen.name == "portable" and not chosen.fused and "OMLX_KERNELS" in chosen.reason
    finally:
        monkeypatch.delenv(backend.ENV)
        backend.attention_backend.cache_clear()


def test_stale_build_falls_back(monkeypatch):
    """A build for another MLX version (or other sources) is never loaded."""
    from omlx.kernels import build

    monkeypatch.setattr(build, "stamp_text", lambda module=build.ATTENTION: "mlx=0.0.0 source=other\n")
    backend.attention_backend.cache_clear()
    try:
        chosen = backend.attention_backend()
        assert chosen.name == "portable" and "another MLX version" in chosen.reason
    finally:
        monkeypatch.undo()
        backend.attention_backend.cache_clear()


def make_pool(rng, rows: int, dim: int, form: str, group_size: int):
    data = mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
    if form == "float32":
        return data
    if form in ("float16", "bfloat16"):
        return data.astype(getattr(mx, form))
    bits = 4 if form == "q4" else 8
    packed, scales, biases = mx.quantize(data, group_size=group_size, bits=bits)
    return QuantizedRows(packed, scales, biases, group_size=group_size, bits=bits)


sequence = st.tuples(
    st.integers(0, 2),  # prefix family (sequences of one family share its cached blocks)
    st.integers(0, 40),  # tokens already in the cache past the shared prefix
    st.sampled_from([1, 1, 1, 3, 17, 40]),  # new tokens: decode or a prefill chunk
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=st.lists(sequence, min_size=1, max_size=7),
    shared_blocks=st.integers(0, 4),
    block_size=st.sampled_from([4, 8, 16, 32]),
    kv_heads=st.sampled_from([1, 2, 4]),
    ratio=st.sampled_from([1, 2, 3, 4]),
    dims=st.sampled_from([(64, 64), (128, 128), (32, 32), (64, 32), (256, 256), (8, 8), (20, 20)]),
    form=st.sampled_from(["float32", "float32", "float16", "bfloat16", "q4", "q8"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_kernel_matches_portable_path(seqs, shared_blocks, block_size, kv_heads, ratio, dims, form, seed):
    key_dim, value_dim = dims
    group_size = 32
    if form in ("q4", "q8") and (key_dim % group_size or value_dim % group_size):
        form = "float32"
    rng = np.random.default_rng(seed)
    # Block tables: each family's shared prefix, then every sequence's own blocks.
    prefixes = [list(range(1 + f * shared_blocks, 1 + (f + 1) * shared_blocks)) for f in range(3)]
    next_block = 1 + 3 * shared_blocks
    tables, q_lens, pos0 = [], [], []
    for family, cached, new in seqs:
        start = shared_blocks * block_size + cached
        total = start + new
        own = -(-total // block_size) - shared_blocks
        tables.append(prefixes[family] + list(range(next_block, next_block + own)))
        next_block += own
        q_lens.append(new)
        pos0.append(start)
    num_blocks = next_block
    rows = num_blocks * kv_heads * block_size
    pool_k = make_pool(rng, rows, key_dim, form, group_size)
    pool_v = make_pool(rng, rows, value_dim, form, group_size)
    tokens = sum(q_lens)
    queries = mx.array(rng.standard_normal((tokens, kv_heads * ratio, 1, key_dim)).astype(np.float32))
    scale = key_dim**-0.5

    order, fused_plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, block_size, kernel=KERNEL)
    order2, portable_plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, block_size, kernel=None)
    assert order == order2
    fused = ragged_attention(queries, pool_k, pool_v, fused_plan, scale)
    portable = ragged_attention(queries, pool_k, pool_v, portable_plan, scale)
    assert fused.shape == portable.shape == (tokens, kv_heads * ratio, 1, value_dim)
    tolerance = 1e-4 if form == "float32" or form.startswith("q") else 2e-2
    np.testing.assert_allclose(np.array(fused), np.array(portable.astype(mx.float32)), atol=tolerance, rtol=tolerance)


def test_shared_prefix_groups_are_planned_and_exact():
    """Eight decode rows and two prefill chunks over one cached prefix: one group, exact."""
    rng = np.random.default_rng(1)
    bs, kv_heads, dim = 16, 2, 64
    prefix = list(range(1, 9))  # 8 full blocks
    tables, q_lens, pos0 = [], [], []
    next_block = 9
    for i in range(10):
        new = 1 if i < 8 else 24
        start = len(prefix) * bs + 5 + i
        own = -(-(start + new) // bs) - len(prefix)
        tables.append(prefix + list(range(next_block, next_block + own)))
        next_block += own
        q_lens.append(new)
        pos0.append(start)
    rows = next_block * kv_heads * bs
    pool_k = mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
    pool_v = mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
    queries = mx.array(rng.standard_normal((sum(q_lens), kv_heads * 3, 1, dim)).astype(np.float32))
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, bs, kernel=KERNEL)
    assert np.array(plan.groups).tolist() == [[0, 10, 0, 8]]
    _, portable_plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, bs, kernel=None)
    fused = ragged_attention(queries, pool_k, pool_v, plan, dim**-0.5)
    portable = ragged_attention(queries, pool_k, pool_v, portable_plan, dim**-0.5)
    np.testing.assert_allclose(np.array(fused), np.array(portable), atol=1e-5)


def test_kernel_rejects_bad_shapes():
    q = mx.zeros((2, 3, 64))
    pool = mx.zeros((64, 64))
    seqs = mx.array([[0, 2, 0, -1]], dtype=mx.int32)
    tables = mx.zeros((1, 1), dtype=mx.int32)
    groups = mx.zeros((0, 4), dtype=mx.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        KERNEL.paged_attention(q, [pool], [pool], tables, seqs, groups, kv_heads=2, block_size=16, scale=1.0)
    with pytest.raises(ValueError, match="key pool width"):
        KERNEL.paged_attention(q, [mx.zeros((64, 32))], [pool], tables, seqs, groups, kv_heads=1, block_size=16,
                               scale=1.0)
