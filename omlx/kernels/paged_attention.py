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

A step can also be *ragged* (`RaggedPlan`): every query token of the step is a batch row of
its own (decode tokens and prefill chunks of any length side by side, no padding) and
`ragged_attention` groups them back by sequence.  There the fused CPU kernel
(`omlx/kernels/cpu/paged_attention.cpp`, see `backend.py`) reads the pool in place through
the block tables; without it the same plan is padded per sequence and attended with the
portable paths above, which stay the reference the kernel is tested against.

Layers that see less than the whole context share the pool and the block tables; the
attention call applies the layer's limit: a sliding `window` (the query at position p sees
keys p - window < k <= p, mlx-lm's `create_causal_mask(..., window_size=window)`), `chunk`ed
attention (keys k <= p with k // chunk == p // chunk, Llama 4), and attention `sinks`
(gpt-oss: a learned logit per query head that joins the softmax denominator with no value,
exactly as `mx.fast.scaled_dot_product_attention(..., sinks=)`).  The kernel skips the
blocks out of reach; the portable path gathers only the blocks inside each sequence's reach
and masks the rest (masks cached per plan and limit, so layers sharing a window share it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

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


def causal_paged_mask(offsets: mx.array, query_len: int, key_len: int, key_start: int | mx.array = 0,
                      window: int = 0, chunk: int = 0) -> mx.array:
    """Mask `[B, 1, L, S]`: query i of row b (absolute position offsets[b] + i) sees the keys
    at absolute positions key_start + j <= its own.  Keys past a row's context need no extra
    care (they lie beyond every real query), nor do padded queries (their outputs are dropped).
    `window` > 0: and only keys k with p - window < k (mlx-lm's sliding-window mask);
    `chunk` > 0: and only keys in the query's chunk, k // chunk == p // chunk (Llama 4).
    """
    query_pos = offsets[:, None] + mx.arange(query_len, dtype=mx.int32)[None, :]
    key_pos = mx.arange(key_len, dtype=mx.int32)[None, :] + mx.array(key_start, dtype=mx.int32).reshape(-1, 1)
    q, k = query_pos[:, :, None], key_pos[:, None, :]
    mask = k <= q
    if window > 0:
        mask = mask & (q < k + window)
    if chunk > 0:
        mask = mask & ((k // chunk) == (q // chunk))
    return mask[:, None, :, :]


def gathered_attention(queries, pool_k, pool_v, tiles, mask, block_size: int, scale: float, sinks=None):
    keys = gather_blocks(pool_k, tiles, block_size)
    values = gather_blocks(pool_v, tiles, block_size)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


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


def cascade_decode_attention(queries, pool_k, pool_v, plan: CascadePlan, block_size: int, scale: float,
                             sinks: mx.array | None = None):
    """Decode attention (`queries` `[B, Hq, 1, D]`) with shared prefixes attended once per group.

    `sinks` (Hq,): per-head sink logits joined to the softmax (as in
    `mx.fast.scaled_dot_product_attention`).  No window or chunk here: a caller with one uses
    `gathered_attention` (as `ragged_attention` does)."""
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
    if sinks is not None:  # one more score with no value: it joins the max and the sum only
        sink = sinks.astype(mx.float32).reshape(1, kv_heads, repeats, 1)
        peak = mx.maximum(peak, sink)
    w1, w2 = mx.exp(peak1 - peak), mx.exp(peak2 - peak)
    total = sum1 * w1 + sum2 * w2
    if sinks is not None:
        total = total + mx.exp(sink - peak)
    grouped = ((out1 * w1 + out2 * w2) / total).astype(queries.dtype)
    grouped = grouped.reshape(-1, q_heads, 1, grouped.shape[-1])  # value dim
    if plan.ungrouped_rows is None:
        return grouped[plan.order]
    plain = gathered_attention(
        queries[plan.ungrouped_rows], pool_k, pool_v, plan.ungrouped_tiles, plan.ungrouped_mask,
        block_size, scale, sinks=sinks,
    )
    return mx.concatenate([grouped, plain])[plan.order]


@dataclass
class PortableView:
    """How the portable path attends a ragged step: queries padded per sequence."""

    query_index: mx.array  # (S, Lmax) token row of each padded query (padding: row 0)
    output_index: mx.array  # (T,) each token's place in the padded (S * Lmax) output
    tiles: mx.array  # (S, H, W) pool tiles of each sequence's blocks
    mask: mx.array  # (S, 1, Lmax, W * block_size)
    cascade: CascadePlan | None  # an all-decode step with shared prefixes
    # What limited layers (window / chunk) need: numpy tables (S, W), first positions and
    # query counts (S,); and their gathers and masks, built once per (window, chunk).
    tables_np: np.ndarray | None = None
    pos0_np: np.ndarray | None = None
    q_lens_np: np.ndarray | None = None
    num_kv_heads: int = 0
    block_size: int = 0
    limited_cache: dict = field(default_factory=dict)

    def limited(self, window: int, chunk: int) -> tuple[mx.array, mx.array]:
        """Tiles `(S, H, W')` and mask `(S, 1, Lmax, W' * block_size)` for a layer that sees
        keys within `window` / its `chunk` only: each sequence's gather starts at the block of
        the first key its first query sees, so blocks out of reach are not read."""
        key = (window, chunk)
        hit = self.limited_cache.get(key)
        if hit is None:
            hit = self.limited_cache[key] = self._build_limited(window, chunk)
        return hit

    def _build_limited(self, window: int, chunk: int) -> tuple[mx.array, mx.array]:
        tables, pos0, bs = self.tables_np, self.pos0_np.astype(np.int64), self.block_size
        last = pos0 + np.maximum(self.q_lens_np.astype(np.int64), 1) - 1
        low = np.zeros_like(pos0)
        if window > 0:
            low = np.maximum(low, pos0 - window + 1)
        if chunk > 0:
            low = np.maximum(low, pos0 - pos0 % chunk)
        first = low // bs
        if not first.any():
            tiles, key_start = self.tiles, 0
            width = tables.shape[1]
        else:
            width = int((last // bs - first).max()) + 1
            index = first[:, None] + np.arange(width)[None, :]
            inside = index <= (last // bs)[:, None]
            index = np.minimum(index, tables.shape[1] - 1)
            trimmed = np.where(inside, np.take_along_axis(tables, index, axis=1), 0).astype(np.int32)
            tiles = gather_indices(mx.array(trimmed), self.num_kv_heads)
            key_start = mx.array((first * bs).astype(np.int32))
        mask = causal_paged_mask(
            mx.array(self.pos0_np.astype(np.int32)), self.query_index.shape[1], width * bs,
            key_start=key_start, window=window, chunk=chunk,
        )
        return tiles, mask


@dataclass
class RaggedPlan:
    """One step's query tokens, grouped by sequence, for attention over the paged pool.

    Tokens of a sequence are consecutive rows; `seqs[s] = (first row, count, position of the
    first, shared-prefix group or -1)`; `groups[g] = (first sequence, count, table row, shared
    blocks)`: consecutive sequences whose tables start with the same full blocks.
    """

    tables: mx.array  # (S, W) int32, padded with the scratch block
    seqs: mx.array  # (S, 4) int32
    groups: mx.array  # (G, 4) int32
    num_kv_heads: int
    block_size: int
    kernel: object | None  # the fused extension module that attends this plan; None: portable
    portable: PortableView | None  # built only when the portable path will run

    @classmethod
    def for_sequences(cls, tables: list[list[int]], q_lens: list[int], pos0: list[int], num_kv_heads: int,
                      block_size: int, kernel=None) -> tuple[list[int], "RaggedPlan"]:
        """Plan a pass over sequences (block tables, new tokens, position of the first new
        token).  Sequences sharing a cached prefix are put next to each other so they attend
        to it together; returns that order (indices into the inputs) and the plan."""
        padded = padded_tables(tables)
        starts = np.asarray(pos0, dtype=np.int32)
        groups = shared_prefix_groups(padded, starts, block_size) if len(tables) > 1 else []
        grouped = [r for rows, _ in groups for r in rows]
        order = grouped + sorted(set(range(len(tables))) - set(grouped))
        spans, first = [], 0
        for rows, shared in groups:
            spans.append((first, len(rows), shared))
            first += len(rows)
        lens = np.asarray(q_lens, dtype=np.int32)[order]
        return order, cls.build(padded[order], lens, starts[order], spans, num_kv_heads, block_size, kernel)

    @classmethod
    def build(cls, tables: np.ndarray, q_lens: np.ndarray, pos0: np.ndarray, groups: list[tuple[int, int, int]],
              num_kv_heads: int, block_size: int, kernel=None) -> "RaggedPlan":
        """numpy inputs: tables (S, W), q_lens / pos0 (S,); groups as (first seq, count,
        shared blocks), their members consecutive.  `kernel`: the fused extension module
        (see backend.py) that will attend it, None for the portable path."""
        num = len(q_lens)
        starts = np.zeros(num, dtype=np.int32)
        starts[1:] = np.cumsum(q_lens)[:-1]
        group_of = np.full(num, -1, dtype=np.int32)
        group_rows = np.zeros((len(groups), 4), dtype=np.int32)
        for g, (first, count, shared) in enumerate(groups):
            group_of[first : first + count] = g
            group_rows[g] = (first, count, first, shared)
        seqs = np.stack([starts, np.asarray(q_lens, np.int32), np.asarray(pos0, np.int32), group_of], axis=1)
        portable = None if kernel is not None else _portable_view(tables, q_lens, pos0, starts, groups, num_kv_heads, block_size)
        return cls(
            tables=mx.array(tables, dtype=mx.int32), seqs=mx.array(seqs), groups=mx.array(group_rows),
            num_kv_heads=num_kv_heads, block_size=block_size, kernel=kernel, portable=portable,
        )


def _portable_view(tables, q_lens, pos0, starts, groups, num_kv_heads: int, block_size: int) -> PortableView:
    longest = int(max(q_lens))
    query_index = np.zeros((len(q_lens), longest), dtype=np.int32)
    output_index = np.zeros(int(sum(q_lens)), dtype=np.int32)
    for s, (start, n) in enumerate(zip(starts, q_lens)):
        query_index[s, :n] = np.arange(start, start + n)
        output_index[start : start + n] = s * longest + np.arange(n)
    cascade = None
    if longest == 1 and groups:
        cascade = plan_cascade(tables, np.asarray(pos0), num_kv_heads, block_size)
    block_tables = mx.array(tables, dtype=mx.int32)
    return PortableView(
        query_index=mx.array(query_index),
        output_index=mx.array(output_index),
        tiles=gather_indices(block_tables, num_kv_heads),
        mask=causal_paged_mask(mx.array(np.asarray(pos0), dtype=mx.int32), longest, tables.shape[1] * block_size),
        cascade=cascade,
        tables_np=np.asarray(tables, dtype=np.int32),
        pos0_np=np.asarray(pos0, dtype=np.int32),
        q_lens_np=np.asarray(q_lens, dtype=np.int32),
        num_kv_heads=num_kv_heads,
        block_size=block_size,
    )


def _pool_dtype(pool) -> mx.Dtype:
    """The dtype a pool's keys / values are attended in (a quantized pool: its scales')."""
    return pool.scales.dtype if isinstance(pool, QuantizedRows) else pool.dtype


def ragged_attention(queries: mx.array, pool_k, pool_v, plan: RaggedPlan, scale: float, window: int = 0,
                     chunk: int = 0, sinks: mx.array | None = None) -> mx.array:
    """Attention of a ragged step's queries `[T, Hq, 1, D]` -> `[T, Hq, 1, Dv]`, by the
    plan's kernel (or the portable path).

    `window` > 0: the query at position p sees keys p - window < k <= p; `chunk` > 0: keys
    k <= p in its chunk (k // chunk == p // chunk); `sinks` (Hq,): sink logits, unscaled,
    joined to the softmax denominator.  Like `mx.fast.scaled_dot_product_attention`, the
    sinks take the attention's dtype (that of queries, keys and values together) before they
    count; where MLX refuses sinks of a wider dtype, they are rounded to it here.
    """
    if window < 0 or chunk < 0:
        raise ValueError(f"window and chunk must be >= 0, got {window}, {chunk}")
    tokens, q_heads = queries.shape[:2]
    if sinks is not None:
        if sinks.shape != (q_heads,):
            raise ValueError(f"sinks must have shape ({q_heads},), got {sinks.shape}")
        sinks = sinks.astype(mx.result_type(queries.dtype, _pool_dtype(pool_k), _pool_dtype(pool_v)))
    kernel = plan.kernel
    if kernel is not None:
        quantized = isinstance(pool_k, QuantizedRows)
        limits = {}
        if window or chunk or sinks is not None:  # the default call stays what it always was
            limits = dict(window=window, chunk=chunk, sinks=None if sinks is None else sinks.astype(mx.float32))
        # The kernel takes the layer's (T, Hq, 1, D) queries as they are, views included, and
        # answers in that shape: no reshape or copy node on either side (nodes cost per step).
        out = kernel.paged_attention(
            queries,
            pool_k.parts() if quantized else [pool_k],
            pool_v.parts() if quantized else [pool_v],
            plan.tables, plan.seqs, plan.groups,
            kv_heads=plan.num_kv_heads, block_size=plan.block_size, scale=scale,
            bits=pool_k.bits if quantized else 0, group_size=pool_k.group_size if quantized else 64,
            **limits,
        )
        return out.astype(queries.dtype)
    view = plan.portable
    padded = queries[:, :, 0, :][view.query_index]  # (S, Lmax, Hq, D)
    padded = padded.transpose(0, 2, 1, 3)
    if window or chunk:
        # The cascade has no per-query window: a limited layer attends each sequence's own
        # gather (of only the blocks within its reach), even in a step with shared prefixes.
        tiles, mask = view.limited(window, chunk)
        out = gathered_attention(padded, pool_k, pool_v, tiles, mask, plan.block_size, scale, sinks=sinks)
    elif view.cascade is not None:
        out = cascade_decode_attention(padded, pool_k, pool_v, view.cascade, plan.block_size, scale, sinks=sinks)
    else:
        out = gathered_attention(padded, pool_k, pool_v, view.tiles, view.mask, plan.block_size, scale, sinks=sinks)
    num_seqs, _, longest, dim_v = out.shape
    out = out.transpose(0, 2, 1, 3).reshape(num_seqs * longest, q_heads, dim_v)[view.output_index]
    return out.reshape(tokens, q_heads, 1, dim_v)


def padded_tables(tables: list[list[int]], pad: int = 0) -> np.ndarray:
    """Block tables as one `(n, longest)` array, padded with the scratch block (0)."""
    width = max(len(t) for t in tables)
    out = np.full((len(tables), width), pad, dtype=np.int32)
    for row, table in enumerate(tables):
        out[row, : len(table)] = table
    return out


def shared_prefix_groups(tables: np.ndarray, pos0: np.ndarray, block_size: int) -> list[tuple[list[int], int]]:
    """Rows (sequences) whose block tables start with the same blocks, and how many blocks
    they share.  Rows can only share a block through the prefix cache, so a shared block is
    full and never written again; the count is capped below every member's first new token
    (its own block may be written this step)."""
    by_first_block: dict[int, list[int]] = {}
    for row in range(tables.shape[0]):
        by_first_block.setdefault(int(tables[row, 0]), []).append(row)
    grouped: list[tuple[list[int], int]] = []
    for rows in by_first_block.values():
        if len(rows) < 2:
            continue
        sub = tables[rows]
        same = (sub == sub[:1]).all(axis=0)
        shared = sub.shape[1] if same.all() else int(same.argmin())
        shared = min(shared, int(pos0[rows].min()) // block_size)
        if shared:
            grouped.append((rows, shared))
    return grouped


def plan_cascade(tables: np.ndarray, positions: np.ndarray, num_heads: int, block_size: int) -> CascadePlan | None:
    """Group decode rows by the blocks their tables share at the start (see
    `shared_prefix_groups`); None when no rows share any."""
    grouped = shared_prefix_groups(tables, positions, block_size)
    if not grouped:
        return None

    grouped_rows = [r for rows, _ in grouped for r in rows]
    ungrouped = sorted(set(range(tables.shape[0])) - set(grouped_rows))
    order = np.empty(tables.shape[0], dtype=np.int32)
    order[grouped_rows + ungrouped] = np.arange(tables.shape[0], dtype=np.int32)

    groups, rests, starts, member = [], [], [], 0
    for rows, shared in grouped:
        groups.append(
            SharedPrefix(
                members=mx.arange(member, member + len(rows), dtype=mx.int32),
                tiles=gather_indices(mx.array(tables[rows[0], :shared], dtype=mx.int32), num_heads),
            )
        )
        member += len(rows)
        for r in rows:
            rests.append(_trimmed(tables[r, shared:]))
            starts.append(shared * block_size)
    rest_tiles, rest_mask = _tiles_and_mask(rests, positions[grouped_rows], starts, num_heads, block_size)
    plan = CascadePlan(
        grouped_rows=mx.array(grouped_rows, dtype=mx.int32),
        groups=groups,
        rest_tiles=rest_tiles,
        rest_mask=rest_mask,
        ungrouped_rows=None,
        ungrouped_tiles=None,
        ungrouped_mask=None,
        order=mx.array(order),
    )
    if ungrouped:
        plan.ungrouped_rows = mx.array(ungrouped, dtype=mx.int32)
        plan.ungrouped_tiles, plan.ungrouped_mask = _tiles_and_mask(
            [_trimmed(tables[r]) for r in ungrouped], positions[ungrouped], [0] * len(ungrouped),
            num_heads, block_size,
        )
    return plan


def _trimmed(table: np.ndarray) -> np.ndarray:
    """A padded block-table row without its trailing scratch-block padding."""
    used = np.flatnonzero(table != 0)
    return table[: used[-1] + 1] if used.size else table[:1]


def _tiles_and_mask(tables, positions, key_starts, num_heads: int, block_size: int):
    padded = padded_tables(tables)  # scratch block padding
    mask = causal_paged_mask(
        mx.array(np.asarray(positions), dtype=mx.int32), 1, padded.shape[1] * block_size,
        key_start=mx.array(np.asarray(key_starts, dtype=np.int32)),
    )
    return gather_indices(mx.array(padded), num_heads), mask
