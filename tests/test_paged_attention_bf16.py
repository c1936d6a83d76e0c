"""The fused kernel over bf16 pools (the packed path's KV): its bf16 tile arithmetic
(omlx/kernels/cpu/paged_attention_bf16.h: queries and probabilities rounded to bf16, float32
accumulation on vdpbf16ps) against a float64 reference, and a token's output bit-identical
however the step around it is made: alone or chunked, beside other sequences, as a decode
row, or attending a shared prefix with a group.  The float32 pool is held to the same
invariance (its arithmetic is the one token-exact tests compare with mlx-lm), and so are
float16 and 8-bit pools."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.kernels import backend
from omlx.kernels.paged_attention import QuantizedRows, RaggedPlan, ragged_attention

KERNEL = backend.attention_backend().module
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the fused CPU kernel is not built")


def reference(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: list[int], scale: float,
              kv_heads: int) -> np.ndarray:
    """Causal attention in float64 of queries (T, Hq, D) at `positions` over a contiguous
    sequence's keys / values (kv_heads, N, D), queries rounded to bf16 after scaling as the
    kernel rounds them (keys and values are bf16 already)."""
    q = np.array(mx.array(queries * scale).astype(mx.bfloat16).astype(mx.float32), dtype=np.float64)
    rep = q.shape[1] // kv_heads
    out = np.zeros((q.shape[0], q.shape[1], values.shape[-1]))
    for t, pos in enumerate(positions):
        for h in range(q.shape[1]):
            k, v = keys[h // rep, : pos + 1], values[h // rep, : pos + 1]
            s = k @ q[t, h]
            p = np.exp(s - s.max())
            out[t, h] = p @ v / p.sum()
    return out


def build_pool(rng, rows: int, dim: int, dtype):
    data = mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
    if dtype == "q8":
        return QuantizedRows(*mx.quantize(data, group_size=32, bits=8), group_size=32, bits=8)
    return data.astype(getattr(mx, dtype) if isinstance(dtype, str) else dtype)


def contiguous(pool: mx.array, table: list[int], length: int, kv_heads: int, block_size: int) -> np.ndarray:
    blocks = np.array(pool.astype(mx.float32), dtype=np.float64).reshape(-1, kv_heads, block_size, pool.shape[1])
    return np.concatenate([blocks[b] for b in table], axis=1)[:, :length]


@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (32, 96)])
@pytest.mark.parametrize("kv_heads,ratio", [(3, 3), (1, 4), (2, 1)])
def test_bf16_pool_matches_a_float64_reference(dims, kv_heads, ratio):
    """Decode rows and a prefill chunk over bf16 pools, 1-700 keys: within the error of bf16
    probabilities (2^-9 relative each) of the exact attention of the bf16 operands (the
    errors measured are about a third of the bound)."""
    dk, dv = dims
    rng = np.random.default_rng(dk + kv_heads)
    bs, scale = 16, dk**-0.5
    lengths = [1, 33, 700, 95]
    q_lens = [1, 1, 1, 64]  # three decode rows, a 64-token chunk ending the last sequence
    tables, first = [], 1
    for n in lengths:
        blocks = -(-n // bs)
        tables.append(list(range(first, first + blocks)))
        first += blocks
    pool_k = build_pool(rng, first * kv_heads * bs, dk, mx.bfloat16)
    pool_v = build_pool(rng, first * kv_heads * bs, dv, mx.bfloat16)
    queries = rng.standard_normal((sum(q_lens), kv_heads * ratio, dk)).astype(np.float32) * 2
    pos0 = [n - q for n, q in zip(lengths, q_lens)]
    order, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, bs, kernel=KERNEL)
    assert order == [0, 1, 2, 3]
    out = np.array(ragged_attention(mx.array(queries[:, :, None, :]), pool_k, pool_v, plan, scale))[:, :, 0]
    start = 0
    for table, n, q_len in zip(tables, lengths, q_lens):
        keys = contiguous(pool_k, table, n, kv_heads, bs)
        values = contiguous(pool_v, table, n, kv_heads, bs)
        want = reference(queries[start:start + q_len], keys, values, list(range(n - q_len, n)), scale, kv_heads)
        got = out[start:start + q_len]
        bound = 2.0**-9 * np.abs(values).max()  # one bf16 rounding of the weights, at the largest value
        assert np.abs(got - want).max() <= bound, (n, np.abs(got - want).max(), bound)
        start += q_len


def outputs(queries, pool_k, pool_v, calls, kv_heads, bs, scale) -> dict[tuple[int, int], np.ndarray]:
    """Run each call (a list of (table, first position, token indices into `queries`)) and
    return every (sequence, position)'s output."""
    got = {}
    for call in calls:
        tables = [c[1] for c in call]
        q_lens = [len(c[3]) for c in call]
        pos0 = [c[2] for c in call]
        order, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, kv_heads, bs, kernel=KERNEL)
        index = [i for s in order for i in call[s][3]]
        out = np.array(ragged_attention(mx.array(queries[index]), pool_k, pool_v, plan, scale))
        row = 0
        for s in order:
            seq, _, first, tokens = call[s]
            for i in range(len(tokens)):
                got[(seq, first + i)] = out[row]
                row += 1
    return got


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["bfloat16", "float32", "float16", "q8"]),
    bs=st.sampled_from([4, 16, 32]),
    kv_heads=st.sampled_from([1, 3]),
    ratio=st.sampled_from([1, 3]),
    shared_blocks=st.integers(1, 6),
    own=st.integers(1, 90),
    cuts=st.lists(st.integers(1, 89), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_a_tokens_output_does_not_depend_on_its_step(dtype, bs, kv_heads, ratio, shared_blocks, own, cuts, seed):
    """Sequence A (a cached prefix of whole blocks, then `own` new tokens) attended: in one
    chunk; in chunks cut anywhere; token by token as decode rows; in a step beside sequence B,
    which shares A's prefix blocks (a shared-prefix group), and a decode row of an unrelated
    sequence C.  Every token's output is the same bits in all of them."""
    rng = np.random.default_rng(seed)
    dk = 64
    prefix = list(range(1, 1 + shared_blocks))
    start = shared_blocks * bs  # A's first new token
    length_a = start + own
    table_a = prefix + list(range(100, 100 + -(-length_a // bs) - shared_blocks))
    table_b = prefix + [300, 301, 302]
    table_c = [400, 401, 402]
    rows = 410 * kv_heads * bs
    pool_k, pool_v = (build_pool(rng, rows, dk, dtype) for _ in range(2))
    queries = mx.array(rng.standard_normal((own + 2, kv_heads * ratio, 1, dk)).astype(np.float32))
    queries = np.array(queries)  # rows: A's own tokens, then B's and C's decode queries
    a_tokens = list(range(own))
    b_row, c_row = own, own + 1
    scale = dk**-0.5

    whole = [[("A", table_a, start, a_tokens)]]
    bounds = sorted({c for c in cuts if c < own} | {0, own})
    chunked = [[("A", table_a, start + lo, a_tokens[lo:hi])] for lo, hi in zip(bounds, bounds[1:])]
    decode = [[("A", table_a, start + i, [i])] for i in range(own)]
    b_pos = shared_blocks * bs + 2  # B's one new token: it shares every prefix block with A
    beside = [[("A", table_a, start, a_tokens), ("B", table_b, b_pos, [b_row]), ("C", table_c, bs + 1, [c_row])]]
    runs = [outputs(queries, pool_k, pool_v, calls, kv_heads, bs, scale)
            for calls in (whole, chunked, decode, beside)]
    # The step beside B did group A with it (else this would not test the shared-prefix phase).
    _, plan = RaggedPlan.for_sequences([table_a, table_b, table_c], [own, 1, 1], [start, b_pos, bs + 1], kv_heads, bs,
                                       kernel=KERNEL)
    assert np.array(plan.groups).shape[0] == 1
    for i in range(own):
        want = runs[0][("A", start + i)]
        for name, run in zip(("chunked", "decode", "beside a group"), runs[1:]):
            assert np.array_equal(run[("A", start + i)], want), (name, i)
