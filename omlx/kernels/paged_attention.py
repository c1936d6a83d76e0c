"""Portable (pure MLX ops) attention inputs over a paged KV pool.

The pool of one layer is a flat array of token slots, `(num_blocks * block_size, heads,
head_dim)`.  For a batch, every row's block table is gathered into a contiguous
`(batch, heads, blocks * block_size, head_dim)` view, and a boolean mask hides positions a
row's queries must not see; the model then runs `mx.fast.scaled_dot_product_attention` on
the result unchanged.  Fused kernels (Metal / CUDA) that read blocks in place would replace
the gather and must agree with this path.
"""

from __future__ import annotations

import mlx.core as mx


def gather_blocks(pool: mx.array, block_tables: mx.array, block_size: int) -> mx.array:
    """`pool[(blocks*block_size), H, D]`, `block_tables[B, nb]` -> `[B, H, nb*block_size, D]`."""
    _, heads, head_dim = pool.shape
    batch, num_blocks = block_tables.shape
    blocks = pool.reshape(-1, block_size, heads, head_dim)
    gathered = blocks[block_tables]  # (B, nb, block_size, H, D)
    return gathered.reshape(batch, num_blocks * block_size, heads, head_dim).transpose(
        0, 2, 1, 3
    )


def causal_paged_mask(offsets: mx.array, query_len: int, key_len: int) -> mx.array:
    """Mask `[B, 1, L, S]`: query i of row b (absolute position offsets[b] + i) sees keys at
    positions <= its own.  Keys past a row's context and padded queries need no extra care:
    the former lie beyond every real query's position, the latter's outputs are discarded.
    """
    query_pos = offsets[:, None] + mx.arange(query_len, dtype=offsets.dtype)[None, :]
    key_pos = mx.arange(key_len, dtype=offsets.dtype)
    return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None, :, :]
