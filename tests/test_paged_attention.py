"""The paged attention paths against plain attention over each row's own contiguous KV."""

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from omlx.kernels.paged_attention import cascade_decode_attention, gathered_attention, gather_indices
from omlx.scheduler.kv_cache import plan_cascade, causal_paged_mask

BS, H, R, D = 4, 2, 3, 8


def dense_reference(q, pool_k, pool_v, tables, lengths, scale):
    """Each row alone: its tokens' keys/values in order, unmasked SDPA of its one query."""
    blocks_k = np.array(pool_k).reshape(-1, H, BS, D)
    blocks_v = np.array(pool_v).reshape(-1, H, BS, D)
    outs = []
    for row, (table, n) in enumerate(zip(tables, lengths)):
        k = np.concatenate([blocks_k[b] for b in table], axis=1)[:, :n]
        v = np.concatenate([blocks_v[b] for b in table], axis=1)[:, :n]
        out = mx.fast.scaled_dot_product_attention(
            q[row : row + 1], mx.array(k)[None], mx.array(v)[None], scale=scale
        )
        outs.append(out)
    return mx.concatenate(outs)


@settings(max_examples=60, deadline=None)
@given(
    shared_blocks=st.integers(0, 5),
    rows=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4 * BS)), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_decode_paths_match_dense_attention(shared_blocks, rows, seed):
    rng = np.random.default_rng(seed)
    num_blocks = 64
    pool_k = mx.array(rng.standard_normal((num_blocks * H * BS, D)).astype(np.float32))
    pool_v = mx.array(rng.standard_normal((num_blocks * H * BS, D)).astype(np.float32))
    prefixes = [list(range(1 + g * 10, 1 + g * 10 + shared_blocks)) for g in range(3)]
    next_block = 40
    tables, lengths = [], []
    for group, own_tokens in rows:
        own = list(range(next_block, next_block + -(-own_tokens // BS)))
        next_block += len(own)
        tables.append(prefixes[group] + own)
        lengths.append(shared_blocks * BS + own_tokens)
    width = max(len(t) for t in tables)
    padded = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    positions = np.array(lengths, dtype=np.int32) - 1
    q = mx.array(rng.standard_normal((len(tables), H * R, 1, D)).astype(np.float32))
    scale = D**-0.5

    expected = dense_reference(q, pool_k, pool_v, tables, lengths, scale)
    gathered = gathered_attention(
        q, pool_k, pool_v, gather_indices(mx.array(padded), H),
        causal_paged_mask(mx.array(positions), 1, width * BS), BS, scale,
    )
    assert mx.allclose(gathered, expected, atol=1e-5).item()

    plan = plan_cascade(padded, positions, H, BS)
    shares = shared_blocks > 0 and any(
        sum(1 for g, _ in rows if g == group) > 1 for group in range(3)
    )
    assert (plan is not None) == shares
    if plan is not None:
        cascaded = cascade_decode_attention(q, pool_k, pool_v, plan, BS, scale)
        assert mx.allclose(cascaded, expected, atol=1e-5).item()
