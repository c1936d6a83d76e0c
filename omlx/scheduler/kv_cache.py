"""The paged KV pool and the per-layer cache objects that plug it into mlx-lm models.

mlx-lm attention layers call `cache.update_and_fetch(keys, values)`, read `cache.offset`
for RoPE (an array of per-row offsets works) and build masks through `cache.make_mask`.
`PagedLayerCache` answers those calls from the shared pool for a whole batch at once, so
the models themselves stay unmodified.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from omlx.kernels import causal_paged_mask, gather_blocks, gather_indices, write_indices


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's keys and values in every layer of a model."""

    num_layers: int
    num_kv_heads: int
    key_dim: int
    value_dim: int
    dtype: mx.Dtype

    @property
    def bytes_per_token(self) -> int:
        per_layer = self.num_kv_heads * (self.key_dim + self.value_dim) * self.dtype.size
        return per_layer * self.num_layers

    @classmethod
    def probe(cls, model) -> "KVLayout":
        """Run one token through the model with mlx-lm's own cache and read the shapes.

        Models whose caches are not plain full-attention KV caches (sliding windows,
        recurrent state) cannot be paged this way and are refused.
        """
        caches = make_prompt_cache(model)
        unsupported = {type(c).__name__ for c in caches if type(c) is not KVCache}
        if unsupported:
            raise ValueError(
                "paged KV serving supports full-attention models only; this model uses "
                + ", ".join(sorted(unsupported))
            )
        model(mx.array([[0]]), cache=caches)
        keys, values = caches[0].keys, caches[0].values
        mx.eval(keys, values)
        return cls(
            num_layers=len(caches),
            num_kv_heads=keys.shape[1],
            key_dim=keys.shape[3],
            value_dim=values.shape[3],
            dtype=keys.dtype,
        )


class PagedKVStorage:
    """Per-layer key and value pools, block-major then head-major (see omlx.kernels)."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int):
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        rows = num_blocks * layout.num_kv_heads * block_size
        self.keys = [mx.zeros((rows, layout.key_dim), layout.dtype) for _ in range(layout.num_layers)]
        self.values = [mx.zeros((rows, layout.value_dim), layout.dtype) for _ in range(layout.num_layers)]
        mx.eval(self.keys, self.values)

    @property
    def bytes_per_block(self) -> int:
        return self.layout.bytes_per_token * self.block_size

    @property
    def nbytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    @staticmethod
    def blocks_for_budget(layout: KVLayout, block_size: int, budget_bytes: int) -> int:
        return max(2, budget_bytes // (layout.bytes_per_token * block_size))

    def write(self, layer: int, keys: mx.array, values: mx.array, rows: mx.array) -> None:
        """Store `[B, H, L, D]` keys/values at their pool rows (see `write_indices`)."""
        # In-place scatter: the previous pool array has no other reference, so MLX reuses
        # its buffer instead of copying the pool.
        self.keys[layer][rows] = keys.reshape(-1, keys.shape[-1])
        self.values[layer][rows] = values.reshape(-1, values.shape[-1])

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values


@dataclass
class BatchLayout:
    """Everything the layer caches need for one forward pass over `B` rows of `L` tokens."""

    offsets: mx.array  # (B,) position of each row's first new token
    write_rows: mx.array  # (B * H * L,) pool row of each new token's key/value per head
    tiles: mx.array  # (B, H, nb) pool tiles of each row's blocks (scratch block for padding)
    mask: mx.array  # (B, 1, L, nb * block_size)

    @classmethod
    def build(cls, offsets, token_blocks, token_offsets, block_tables, num_heads: int, block_size: int):
        """numpy inputs: offsets (B,), token_blocks / token_offsets (B, L), block_tables (B, nb)."""
        offsets = mx.array(offsets, dtype=mx.int32)
        block_tables = mx.array(block_tables, dtype=mx.int32)
        query_len = token_blocks.shape[1]
        return cls(
            offsets=offsets,
            write_rows=write_indices(
                mx.array(token_blocks, dtype=mx.int32), mx.array(token_offsets, dtype=mx.int32),
                num_heads, block_size,
            ),
            tiles=gather_indices(block_tables, num_heads),
            mask=causal_paged_mask(offsets, query_len, block_tables.shape[1] * block_size),
        )


class PagedLayerCache:
    """What one mlx-lm attention layer sees as its `cache` during a batched forward."""

    def __init__(self, storage: PagedKVStorage, layer: int, batch: BatchLayout):
        self.storage = storage
        self.layer = layer
        self.batch = batch

    @property
    def offset(self) -> mx.array:
        return self.batch.offsets

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise ValueError("sliding-window attention is not supported by the paged cache")
        return self.batch.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        storage, batch = self.storage, self.batch
        storage.write(self.layer, keys, values, batch.write_rows)
        bs = storage.block_size
        return (
            gather_blocks(storage.keys[self.layer], batch.tiles, bs),
            gather_blocks(storage.values[self.layer], batch.tiles, bs),
        )
