"""Portable (pure MLX ops) attention inputs over a paged KV pool.

Each layer's pool is stored head-major inside a block: `(num_blocks, heads, block_size,
dim)`, kept flat as `(num_blocks * heads * block_size, dim)` rows.  Gathering a batch's block
tables then yields `(batch, heads, tokens, dim)` that is already contiguous, which matters on
the CPU: MLX's attention on a strided (transposed) view runs several times slower.  A boolean
mask hides positions a row's queries must not see, and the model runs
`mx.fast.scaled_dot_product_attention` on the result unchanged.  Fused kernels (Metal / CUDA)
that read blocks in place would replace the gather and must agree with this path.
"""

from __future__ import annotations

import mlx.core as mx


def write_indices(blocks: mx.array, offsets: mx.array, num_heads: int, block_size: int) -> mx.array:
    """Flat pool rows for new tokens `[B, L]` (their block and offset in it) -> `[B*H*L]`,
    ordered like `keys.reshape(-1, dim)` for keys shaped `[B, H, L, dim]`."""
    heads = mx.arange(num_heads, dtype=mx.int32)[None, :, None]
    rows = (blocks[:, None, :] * num_heads + heads) * block_size + offsets[:, None, :]
    return rows.reshape(-1)


def gather_indices(block_tables: mx.array, num_heads: int) -> mx.array:
    """`[B, nb]` block tables -> `[B, H, nb]` indices of (block, head) tiles in the pool."""
    heads = mx.arange(num_heads, dtype=mx.int32)[None, :, None]
    return block_tables[:, None, :] * num_heads + heads


def gather_blocks(pool: mx.array, tiles: mx.array, block_size: int) -> mx.array:
    """Pool rows + `[B, H, nb]` tile indices -> contiguous `[B, H, nb * block_size, dim]`."""
    batch, heads, num_blocks = tiles.shape
    dim = pool.shape[-1]
    gathered = pool.reshape(-1, block_size, dim)[tiles]  # (B, H, nb, block_size, dim)
    return gathered.reshape(batch, heads, num_blocks * block_size, dim)


def causal_paged_mask(offsets: mx.array, query_len: int, key_len: int) -> mx.array:
    """Mask `[B, 1, L, S]`: query i of row b (absolute position offsets[b] + i) sees keys at
    positions <= its own.  Keys past a row's context and padded queries need no extra care:
    the former lie beyond every real query's position, the latter's outputs are discarded.
    """
    query_pos = offsets[:, None] + mx.arange(query_len, dtype=offsets.dtype)[None, :]
    key_pos = mx.arange(key_len, dtype=offsets.dtype)
    return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None, :, :]
