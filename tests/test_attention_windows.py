"""Sliding windows, chunked attention and attention sinks over the paged pool.

Both the fused CPU kernel and the portable MLX-ops path are checked against a dense
reference computed independently per sequence: that sequence's keys and values gathered into
a contiguous array, the mask built by hand in numpy (mlx-lm's sliding-window and Llama 4's
chunk masks), and `mx.fast.scaled_dot_product_attention` with the sinks.

The blocks that no query of a step can reach (wholly below every holder's window / chunk
start) are filled with NaN in the pool handed to the two paths: any read of them would show
in the output, so passing proves they are skipped (kernel) or not gathered (portable path).
"""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.kernels import backend
from omlx.kernels.paged_attention import QuantizedRows, RaggedPlan, ragged_attention

KERNEL = backend.attention_backend().module
GROUP_SIZE = 32


def first_visible(pos, window: int, chunk: int):
    """The first key position the query at `pos` sees (0 without a limit)."""
    pos = np.asarray(pos, dtype=np.int64)
    low = np.zeros_like(pos)
    if window:
        low = np.maximum(low, pos - window + 1)
    if chunk:
        low = np.maximum(low, pos - pos % chunk)
    return low


class Pools:
    """One layer's K and V pools in some form, a NaN-poisoned copy of them, and the float32
    values the dense reference attends (what the pools hold, after rounding / quantizing)."""

    def __init__(self, rng, rows: int, key_dim: int, value_dim: int, form: str):
        self.form = form
        self.pools, self.dense = [], []
        for dim in (key_dim, value_dim):
            data = mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
            if form in ("q4", "q8"):
                bits = 4 if form == "q4" else 8
                packed, scales, biases = mx.quantize(data, group_size=GROUP_SIZE, bits=bits)
                pool = QuantizedRows(packed, scales, biases, group_size=GROUP_SIZE, bits=bits)
                dense = mx.dequantize(packed, scales, biases, group_size=GROUP_SIZE, bits=bits)
            else:
                pool = data.astype(getattr(mx, form))
                dense = pool.astype(mx.float32)
            self.pools.append(pool)
            self.dense.append(np.array(dense.astype(mx.float32)))

    def poisoned(self, bad_rows: np.ndarray):
        """The pools with NaN in `bad_rows` (for quantized pools: their scales and biases)."""
        out = []
        for pool in self.pools:
            if isinstance(pool, QuantizedRows):
                bad = mx.array(bad_rows)[:, None]
                out.append(QuantizedRows(
                    pool.packed, mx.where(bad, float("nan"), pool.scales), mx.where(bad, float("nan"), pool.biases),
                    group_size=pool.group_size, bits=pool.bits,
                ))
            else:
                out.append(mx.where(mx.array(bad_rows)[:, None], float("nan"), pool))
        return out


def unreachable_blocks(tables, q_lens, pos0, block_size: int, window: int, chunk: int, num_blocks: int):
    """Blocks that every table holding them has wholly below its first query's reach."""
    reachable = np.zeros(num_blocks, dtype=bool)
    held = np.zeros(num_blocks, dtype=bool)
    for table, n, p in zip(tables, q_lens, pos0):
        low = int(first_visible(p, window, chunk))
        for i, b in enumerate(table):
            held[b] = True
            if (i + 1) * block_size > low:
                reachable[b] = True
    bad = held & ~reachable
    bad[0] = False  # the scratch block pads tables: it is read (and masked) like any padding
    return bad


def dense_reference(queries, plan_seqs, order, tables, pools: Pools, kv_heads: int, block_size: int, scale,
                    window: int, chunk: int, sinks):
    """Each sequence alone: its keys / values contiguous, the mask built by hand, MLX's SDPA."""
    tokens, q_heads, _, _ = queries.shape
    blocks_k = pools.dense[0].reshape(-1, kv_heads, block_size, pools.dense[0].shape[-1])
    blocks_v = pools.dense[1].reshape(-1, kv_heads, block_size, pools.dense[1].shape[-1])
    out = np.zeros((tokens, q_heads, 1, blocks_v.shape[-1]), dtype=np.float32)
    q32 = queries.astype(mx.float32)
    for (q_start, q_len, p0, _), source in zip(np.array(plan_seqs).tolist(), order):
        context = p0 + q_len
        table = tables[source]
        keys = np.concatenate([blocks_k[b] for b in table], axis=1)[:, :context]
        values = np.concatenate([blocks_v[b] for b in table], axis=1)[:, :context]
        qpos = p0 + np.arange(q_len)[:, None]
        kpos = np.arange(context)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= qpos < kpos + window
        if chunk:
            mask &= (kpos // chunk) == (qpos // chunk)
        q = q32[q_start : q_start + q_len, :, 0, :].transpose(1, 0, 2)[None]
        got = mx.fast.scaled_dot_product_attention(
            q, mx.array(keys)[None], mx.array(values)[None], scale=scale, mask=mx.array(mask), sinks=sinks,
        )
        out[q_start : q_start + q_len] = np.array(got[0].transpose(1, 0, 2))[:, :, None, :]
    return out


def build_step(seqs, shared_blocks: int, block_size: int):
    """Block tables: each family's shared prefix, then every sequence's own blocks."""
    prefixes = [list(range(1 + f * shared_blocks, 1 + (f + 1) * shared_blocks)) for f in range(3)]
    next_block = 1 + 3 * shared_blocks
    tables, q_lens, pos0 = [], [], []
    for family, cached, new in seqs:
        start = shared_blocks * block_size + cached
        own = -(-(start + new) // block_size) - shared_blocks
        tables.append(prefixes[family] + list(range(next_block, next_block + own)))
        next_block += own
        q_lens.append(new)
        pos0.append(start)
    return tables, q_lens, pos0, next_block


def tolerance(form: str, query_dtype) -> float:
    if query_dtype != mx.float32:
        return 3e-2  # the portable path then attends in half precision (scores and softmax input)
    return 1e-4 if form == "float32" or form.startswith("q") else 2e-2


def check_step(rng, seqs, shared_blocks, block_size, kv_heads, ratio, dims, form, window, chunk, with_sinks,
               half_queries=False):
    key_dim, value_dim = dims
    if form in ("q4", "q8") and (key_dim % GROUP_SIZE or value_dim % GROUP_SIZE):
        form = "float32"
    tables, q_lens, pos0, num_blocks = build_step(seqs, shared_blocks, block_size)
    rows = num_blocks * kv_heads * block_size
    pools = Pools(rng, rows, key_dim, value_dim, form)
    bad_blocks = unreachable_blocks(tables, q_lens, pos0, block_size, window, chunk, num_blocks)
    bad_rows = np.repeat(bad_blocks, kv_heads * block_size)
    pool_k, pool_v = pools.poisoned(bad_rows)

    q_heads = kv_heads * ratio
    query_dtype = getattr(mx, form) if half_queries and form in ("float16", "bfloat16") else mx.float32
    queries = mx.array(rng.standard_normal((sum(q_lens), q_heads, 1, key_dim)).astype(np.float32)).astype(query_dtype)
    sinks = mx.array(rng.normal(0.5, 2.0, q_heads).astype(np.float32)) if with_sinks else None
    scale = key_dim**-0.5

    order, fused_plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, block_size, kernel=KERNEL)
    order2, portable_plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, block_size, kernel=None)
    assert order == order2
    fused = ragged_attention(queries, pool_k, pool_v, fused_plan, scale, window=window, chunk=chunk, sinks=sinks)
    portable = ragged_attention(queries, pool_k, pool_v, portable_plan, scale, window=window, chunk=chunk,
                                sinks=sinks)
    # The attention's dtype rounds the sinks (MLX's rule): the reference gets them rounded.
    attend_dtype = mx.result_type(query_dtype, pools.pools[0].scales.dtype if form.startswith("q") else
                                  pools.pools[0].dtype)
    ref_sinks = None if sinks is None else sinks.astype(attend_dtype).astype(mx.float32)
    expected = dense_reference(queries, fused_plan.seqs, order, tables, pools, kv_heads, block_size, scale,
                               window, chunk, ref_sinks)
    assert fused.shape == portable.shape == (sum(q_lens), q_heads, 1, value_dim)
    tol = tolerance(form, query_dtype)
    fused_np = np.array(fused.astype(mx.float32))
    portable_np = np.array(portable.astype(mx.float32))
    assert np.isfinite(fused_np).all(), "the kernel read a block out of every query's reach"
    assert np.isfinite(portable_np).all(), "the portable path gathered a block out of every query's reach"
    np.testing.assert_allclose(fused_np, expected, atol=tol, rtol=tol)
    np.testing.assert_allclose(portable_np, expected, atol=tol, rtol=tol)
    return fused_plan, bad_blocks


sequence = st.tuples(
    st.integers(0, 2),  # prefix family (sequences of one family share its cached blocks)
    st.integers(0, 100),  # tokens already in the cache past the shared prefix
    st.sampled_from([1, 1, 1, 3, 17, 40]),  # new tokens: decode or a prefill chunk
)
limits = st.one_of(
    st.tuples(st.sampled_from([1, 2, 5, 16, 33, 64, 128]), st.just(0)),  # sliding window
    st.tuples(st.just(0), st.sampled_from([4, 8, 32, 50, 64])),  # chunked
    st.tuples(st.just(0), st.just(0)),  # sinks alone (or nothing)
    st.tuples(st.sampled_from([3, 40]), st.sampled_from([16, 64])),  # both (no model does; still exact)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=st.lists(sequence, min_size=1, max_size=6),
    shared_blocks=st.integers(0, 4),
    block_size=st.sampled_from([4, 8, 16, 32]),
    kv_heads=st.sampled_from([1, 2, 4]),
    ratio=st.sampled_from([1, 2, 3, 4]),
    dims=st.sampled_from([(64, 64), (128, 128), (32, 32), (64, 32), (8, 8), (20, 20)]),
    form=st.sampled_from(["float32", "float32", "float16", "bfloat16", "q4", "q8"]),
    limit=limits,
    with_sinks=st.booleans(),
    half_queries=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_limited_attention_matches_dense_reference(seqs, shared_blocks, block_size, kv_heads, ratio, dims, form,
                                                   limit, with_sinks, half_queries, seed):
    window, chunk = limit
    check_step(np.random.default_rng(seed), seqs, shared_blocks, block_size, kv_heads, ratio, dims, form, window,
               chunk, with_sinks, half_queries)


@pytest.mark.parametrize("form", ["float32", "q8"])
@pytest.mark.parametrize("window,chunk,with_sinks", [(24, 0, True), (24, 0, False), (0, 128, True), (0, 0, True)])
def test_shared_prefix_groups_with_limits(form, window, chunk, with_sinks):
    """Decode rows and prefill chunks over one cached prefix (the kernel keeps the group):
    some rows still see part of the prefix, others see none of it (window: past it; chunk 128:
    in the next chunk); with the window, the prefix's first blocks are out of everyone's
    reach (poisoned) and must be skipped."""
    rng = np.random.default_rng(7)
    seqs = [(0, c, 1) for c in (0, 3, 9, 20, 30, 45, 70, 90)] + [(0, 2, 24), (0, 50, 24)]
    plan, bad = check_step(rng, seqs, 8, 8, 2, 3, (64, 64), form, window, chunk, with_sinks)
    assert np.array(plan.groups).tolist() == [[0, 10, 0, 8]]
    if window:
        assert bad[1:3].all()  # the first prefix blocks were poisoned, and never read


@pytest.mark.parametrize("form", ["float32", "bfloat16"])
def test_cascade_decode_with_sinks(form):
    """An all-decode step over shared prefixes takes the portable cascade; sinks fold into
    its merged softmax (and a windowed layer of the same step bypasses it, exactly)."""
    seqs = [(0, c, 1) for c in (1, 5, 9, 30)] + [(1, c, 1) for c in (2, 40)] + [(2, 7, 1)]
    tables, q_lens, pos0, _ = build_step(seqs, 3, 8)
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, 2, 8, kernel=None)
    assert plan.portable.cascade is not None and plan.portable.cascade.ungrouped_rows is not None
    for window in (0, 20):
        check_step(np.random.default_rng(5), seqs, 3, 8, 2, 2, (64, 64), form, window, 0, True, half_queries=True)


def test_long_context_window_skips_blocks():
    """Sequences far past a small window: almost every block is poisoned, nothing changes."""
    rng = np.random.default_rng(3)
    seqs = [(0, 900, 1), (1, 700, 40), (2, 1000, 3)]
    _, bad = check_step(rng, seqs, 0, 16, 2, 4, (64, 64), "float32", 32, 0, True)
    assert bad.sum() > 100


def test_defaults_reproduce_plain_causal_attention():
    """window=0, chunk=0, sinks=None is today's call: bitwise equal to omitting them, to a
    window longer than any context, and (kernel) to a sink of -inf; and still the dense
    causal reference."""
    rng = np.random.default_rng(11)
    seqs = [(0, 5, 1), (0, 30, 17), (1, 2, 40), (0, 60, 1), (2, 9, 3)]
    tables, q_lens, pos0, num_blocks = build_step(seqs, 2, 8)
    kv_heads, q_heads, dim = 2, 6, 64
    pools = Pools(rng, num_blocks * kv_heads * 8, dim, dim, "float32")
    pool_k, pool_v = pools.pools
    queries = mx.array(rng.standard_normal((sum(q_lens), q_heads, 1, dim)).astype(np.float32))
    scale = dim**-0.5
    for kernel in (KERNEL, None):
        order, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, 8, kernel=kernel)
        plain = np.array(ragged_attention(queries, pool_k, pool_v, plan, scale))
        explicit = np.array(ragged_attention(queries, pool_k, pool_v, plan, scale, window=0, chunk=0, sinks=None))
        huge = np.array(ragged_attention(queries, pool_k, pool_v, plan, scale, window=1 << 20))
        np.testing.assert_array_equal(plain, explicit)
        np.testing.assert_array_equal(plain, huge)
        no_sink = mx.full((q_heads,), -float("inf"))
        if kernel is not None:
            np.testing.assert_array_equal(plain, np.array(ragged_attention(queries, pool_k, pool_v, plan, scale,
                                                                           sinks=no_sink)))
        expected = dense_reference(queries, plan.seqs, order, tables, pools, kv_heads, 8, scale, 0, 0, None)
        np.testing.assert_allclose(plain, expected, atol=1e-5, rtol=1e-5)
    # The extension's own defaults: the call without the new arguments is the same call.
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, 8, kernel=KERNEL)
    args = (queries.reshape(-1, q_heads, dim), [pool_k], [pool_v], plan.tables, plan.seqs, plan.groups)
    before = KERNEL.paged_attention(*args, kv_heads=kv_heads, block_size=8, scale=scale)
    after = KERNEL.paged_attention(*args, kv_heads=kv_heads, block_size=8, scale=scale, window=0, chunk=0, sinks=None)
    np.testing.assert_array_equal(np.array(before), np.array(after))


def test_portable_limits_are_built_once_per_plan():
    """Layers sharing a window share one gather / mask per step."""
    tables, q_lens, pos0, _ = build_step([(0, 50, 1), (1, 80, 7)], 0, 8)
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, 2, 8, kernel=None)
    view = plan.portable
    first = view.limited(16, 0)
    assert view.limited(16, 0) is first
    assert view.limited(0, 32) is not first
    tiles, mask = first
    assert tiles.shape[-1] < view.tiles.shape[-1]  # only the blocks within the window are gathered
    assert mask.shape[-1] == tiles.shape[-1] * 8


def test_bad_limits_are_refused():
    tables, q_lens, pos0, num_blocks = build_step([(0, 5, 1)], 0, 8)
    pool = mx.zeros((num_blocks * 8, 64))
    queries = mx.zeros((1, 2, 1, 64))
    for kernel in (KERNEL, None):
        _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, 1, 8, kernel=kernel)
        with pytest.raises(ValueError, match="window and chunk"):
            ragged_attention(queries, pool, pool, plan, 1.0, window=-1)
        with pytest.raises(ValueError, match="sinks must have shape"):
            ragged_attention(queries, pool, pool, plan, 1.0, sinks=mx.zeros((3,)))
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, 1, 8, kernel=KERNEL)
    with pytest.raises(ValueError, match="sinks must have shape"):
        KERNEL.paged_attention(queries.reshape(1, 2, 64), [pool], [pool], plan.tables, plan.seqs, plan.groups,
                               kv_heads=1, block_size=8, scale=1.0, sinks=mx.zeros((3,)))
    with pytest.raises(ValueError, match="window and chunk"):
        KERNEL.paged_attention(queries.reshape(1, 2, 64), [pool], [pool], plan.tables, plan.seqs, plan.groups,
                               kv_heads=1, block_size=8, scale=1.0, chunk=-2)
