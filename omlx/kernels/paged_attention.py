"""Attention over a paged KV pool, in portable MLX ops.

Each layer's pool is stored head-major inside a block: `(num_blocks, heads, block_size,
dim)`, kept flat as `(num_blocks * heads * block_size, dim)` rows.  Gathering a batch's block
tables yields `(batch, heads, tokens, dim)` that is already contiguous, which matters on the
CPU: MLX's attention on a strided (transposed) view runs several times slower.

Two paths:
- `gathered_attention`: gather every row's blocks, mask, `mx.fast.scaled_dot_product_attention`.
  Used for prefill chunks, and for decode rows that share nothing.
- `cascade_decode_attention`: decode rows whose block tables start with the same blocks (the
  same system prompt, the same conversation so far) attend to that shared prefix together:
  one matmul of all their queries against the prefix, read once, instead of one copy of the
  prefix per row.  Each row's own remainder is attended separately and the two softmax
  partials are merged exactly (log-sum-exp rescaling).  With 32 agents on a 1,500-token
  system prompt this turns 32 gathers of the prefix per layer into one.

Fused kernels (Metal / CUDA) that read blocks in place would replace the gathers and must
agree with these paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

_NEG = -1e30  # finite "minus infinity": fully masked partials must merge to zero, not NaN


def write_indices(blocks: mx.array, offsets: mx.array, num_heads: int, block_size: int) -> mx.array:
    """Flat pool rows for new tokens `[B, L]` (their block and offset in it) -> `[B*H*L]`,
    ordered like `keys.reshape(-1, dim)` for keys shaped `[B, H, L, dim]`."""
    heads = mx.arange(num_heads, dtype=mx.int32)[None, :, None]
    rows = (blocks[:, None, :] * num_heads + heads) * block_size + offsets[:, None, :]
    return rows.reshape(-1)


def gather_indices(block_tables: mx.array, num_heads: int) -> mx.array:
    """`[..., nb]` block tables -> `[..., H, nb]` indices of (block, head) tiles in the pool."""
    heads = mx.arange(num_heads, dtype=mx.int32)[:, None]
    return block_tables[..., None, :] * num_heads + heads


@dataclass
class QuantizedRows:
    """A pool kept in MLX's quantized layout (`mx.quantize` along the head dim): packed
    values, scales and biases per group, each indexed by the same pool rows."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    def parts(self) -> list[mx.array]:
        return [self.packed, self.scales, self.biases]


def gather_blocks(pool, tiles: mx.array, block_size: int) -> mx.array:
    """Pool rows + `[..., H, nb]` tile indices -> contiguous `[..., H, nb * block_size, dim]`.

    A quantized pool is dequantized after the gather, so only the blocks a batch reads are
    expanded, and attention itself runs as for a float pool.
    """
    if isinstance(pool, QuantizedRows):
        parts = [_gather_rows(part, tiles, block_size) for part in pool.parts()]
        return mx.dequantize(*parts, group_size=pool.group_size, bits=pool.bits)
    return _gather_rows(pool, tiles, block_size)


def _gather_rows(rows: mx.array, tiles: mx.array, block_size: int) -> mx.array:
    *lead, num_blocks = tiles.shape
    width = rows.shape[-1]
    gathered = rows.reshape(-1, block_size, width)[tiles]  # (..., H, nb, block_size, width)
    return gathered.reshape(*lead, num_blocks * block_size, width)


def causal_paged_mask(offsets: mx.array, query_len: int, key_len: int, key_start: int | mx.array = 0) -> mx.array:
    """Mask `[B, 1, L, S]`: query i of row b (absolute position offsets[b] + i) sees the keys
    at absolute positions key_start + j <= its own.  Keys past a row's context need no extra
    care (they lie beyond every real query), nor do padded queries (their outputs are dropped).
    """
    query_pos = offsets[:, None] + mx.arange(query_len, dtype=mx.int32)[None, :]
    key_pos = mx.arange(key_len, dtype=mx.int32)[None, :] + mx.array(key_start, dtype=mx.int32).reshape(-1, 1)
    return (key_pos[:, None, :] <= query_pos[:, :, None])[:, None, :, :]


def gathered_attention(queries, pool_k, pool_v, tiles, mask, block_size: int, scale: float):
    keys = gather_blocks(pool_k, tiles, block_size)
    values = gather_blocks(pool_v, tiles, block_size)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


@dataclass
class SharedPrefix:
    """Decode rows whose block tables start with the same blocks."""

    members: mx.array  # (n,) positions of the rows among the plan's grouped rows
    tiles: mx.array  # (H, P) pool tiles of the shared blocks


@dataclass
class CascadePlan:
    """How a decode batch splits: rows in prefix-sharing groups, and rows sharing nothing."""

    grouped_rows: mx.array  # (G,) batch rows that belong to some group
    groups: list[SharedPrefix]
    rest_tiles: mx.array  # (G, H, nb) each grouped row's blocks after its shared prefix
    rest_mask: mx.array  # (G, 1, 1, nb * block_size)
    ungrouped_rows: mx.array | None  # (U,) rows attended the plain way
    ungrouped_tiles: mx.array | None  # (U, H, nb)
    ungrouped_mask: mx.array | None  # (U, 1, 1, nb * block_size)
    order: mx.array  # (B,) where each batch row sits in [grouped rows, ungrouped rows]


def _partial(q, k, v, mask, scale):
    """Unnormalised softmax partial: running max, sum of exps and weighted values."""
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale
    if mask is not None:
        scores = mx.where(mask, scores, _NEG)
    peak = scores.max(axis=-1, keepdims=True)
    weights = mx.exp(scores - peak)
    return peak, weights.sum(axis=-1, keepdims=True), weights @ v.astype(mx.float32)


def cascade_decode_attention(queries, pool_k, pool_v, plan: CascadePlan, block_size: int, scale: float):
    """Decode attention (`queries` `[B, Hq, 1, D]`) with shared prefixes attended once per group."""
    _, q_heads, _, dim = queries.shape
    kv_heads = plan.rest_tiles.shape[1]
    repeats = q_heads // kv_heads
    q = queries[plan.grouped_rows].reshape(-1, kv_heads, repeats, dim)

    # Prefix partials, one matmul per kv head for all of a group's queries.
    peaks, sums, outs = [], [], []
    for group in plan.groups:
        n = group.members.shape[0]
        qg = q[group.members].transpose(1, 0, 2, 3).reshape(kv_heads, n * repeats, dim)
        keys = gather_blocks(pool_k, group.tiles, block_size)  # (H, P*bs, D)
        values = gather_blocks(pool_v, group.tiles, block_size)
        peak, total, out = _partial(qg, keys, values, None, scale)
        unfold = lambda x: x.reshape(kv_heads, n, repeats, -1).transpose(1, 0, 2, 3)  # noqa: E731
        peaks.append(unfold(peak))
        sums.append(unfold(total))
        outs.append(unfold(out))
    # Groups were laid out member-contiguous in grouped-row order by the planner.
    peak1, sum1, out1 = (mx.concatenate(x) if len(x) > 1 else x[0] for x in (peaks, sums, outs))

    # Each grouped row's own remainder, then the exact merge of the two partials.
    keys = gather_blocks(pool_k, plan.rest_tiles, block_size)
    values = gather_blocks(pool_v, plan.rest_tiles, block_size)
    peak2, sum2, out2 = _partial(q, keys, values, plan.rest_mask, scale)
    peak = mx.maximum(peak1, peak2)
    w1, w2 = mx.exp(peak1 - peak), mx.exp(peak2 - peak)
    grouped = ((out1 * w1 + out2 * w2) / (sum1 * w1 + sum2 * w2)).astype(queries.dtype)
    grouped = grouped.reshape(-1, q_heads, 1, dim)
    if plan.ungrouped_rows is None:
        return grouped[plan.order]
    plain = gathered_attention(
        queries[plan.ungrouped_rows], pool_k, pool_v, plan.ungrouped_tiles, plan.ungrouped_mask,
        block_size, scale,
    )
    return mx.concatenate([grouped, plain])[plan.order]
