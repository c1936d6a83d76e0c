"""The paged KV pool and the per-layer cache objects that plug it into mlx-lm models.

mlx-lm attention layers call `cache.update_and_fetch(keys, values)`, read `cache.offset`
for RoPE (an array of per-row offsets works) and build masks through `cache.make_mask`.
`PagedLayerCache` answers those calls from the shared pool for a whole batch at once, so
the models themselves stay unmodified.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from omlx.allocator_caches import release_freed
from omlx.kernels.paged_attention import (
    CascadePlan,
    QuantizedRows,
    RaggedPlan,
    cascade_decode_attention,
    causal_paged_mask,
    gather_blocks,
    gather_indices,
    gathered_attention,
    plan_cascade,
    ragged_attention,
    write_indices,
)

from .layer_kinds import Kind, LayerKind, UnsupportedLayout, layer_kinds


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
        """Run one token through the model with mlx-lm's own caches and read the shapes of
        its attention layers' keys and values (full, windowed and chunked layers alike: they
        share the paged pool).  Recurrent-state layers are not counted here (see
        omlx.scheduler.state_cache).  Raises UnsupportedLayout for models the pool cannot
        hold: cache kinds it does not know, or attention layers of different shapes."""
        kinds = layer_kinds(model)
        caches = make_prompt_cache(model)
        model(mx.array([[0]]), cache=caches)
        shapes = set()
        first = None
        for kind, cache in zip(kinds, caches):
            if not kind.kind.attends:
                continue
            keys, values = cache.keys, cache.values
            if keys is None or values is None:
                # A layer that never writes the cache it is given (it reuses another's KV,
                # or has no attention at all): the pool would hold nothing sensible for it.
                raise UnsupportedLayout(f"a layer leaves its {type(cache).__name__} unwritten")
            mx.eval(keys, values)
            shapes.add((keys.shape[1], keys.shape[3], values.shape[3], keys.dtype))
            first = first or (keys, values)
        if len(shapes) > 1:
            raise UnsupportedLayout(
                "attention layers keep keys and values of different shapes "
                + ", ".join(f"{h} heads x {k}/{v}" for h, k, v, _ in sorted(shapes, key=str))
            )
        if first is None:
            raise UnsupportedLayout("the model has no attention layer (state only)")
        keys, values = first
        return cls(
            num_layers=sum(1 for k in kinds if k.kind.attends),
            num_kv_heads=keys.shape[1],
            key_dim=keys.shape[3],
            value_dim=values.shape[3],
            dtype=keys.dtype,
        )


class PagedKVStorage:
    """Per-layer key and value pools, block-major then head-major (see omlx.kernels).

    With `kv_bits` (4 or 8) every row is stored quantized (`mx.quantize` layout, groups of
    `group_size` along the head dim) and dequantized when a batch gathers it.
    """

    def __init__(
        self, layout: KVLayout, num_blocks: int, block_size: int,
        kv_bits: int | None = None, group_size: int = 64,
    ):
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_bits = kv_bits
        self.group_size = group_size
        if kv_bits is not None:
            check_quantizable(layout, kv_bits, group_size)
        rows = num_blocks * layout.num_kv_heads * block_size
        self.keys = [self._empty(rows, layout.key_dim) for _ in range(layout.num_layers)]
        self.values = [self._empty(rows, layout.value_dim) for _ in range(layout.num_layers)]
        mx.eval(self.arrays())

    def grow(self, num_blocks: int) -> None:
        """Append blocks to every layer's pool; existing blocks keep their rows and contents."""
        if num_blocks > self.num_blocks:
            extra = (num_blocks - self.num_blocks) * self.layout.num_kv_heads * self.block_size
            # mx.pad measured ~2-5x faster than concatenating zeros here (one pass over memory).
            self._resize(num_blocks, lambda a: mx.pad(a, [(0, extra), (0, 0)]))

    def shrink(self, num_blocks: int) -> None:
        """Keep only the first `num_blocks` blocks (the caller made sure nothing past them is
        in use); the rest of the memory goes back to the system."""
        if num_blocks < self.num_blocks:
            rows = num_blocks * self.layout.num_kv_heads * self.block_size
            # A copy: a slice would keep the big buffer alive.
            self._resize(num_blocks, lambda a: mx.contiguous(a[:rows]))

    def _resize(self, num_blocks: int, resized) -> None:
        """Replace every pool array by `resized(array)`, one layer at a time, dropping the old
        one before the next: the transient extra memory is about one layer's pool."""
        for pools in (self.keys, self.values):
            for i, pool in enumerate(pools):
                if isinstance(pool, QuantizedRows):
                    pools[i] = QuantizedRows(*(resized(a) for a in pool.parts()),
                                             group_size=pool.group_size, bits=pool.bits)
                    mx.eval(pools[i].parts())
                else:
                    pools[i] = resized(pool)
                    mx.eval(pools[i])
                del pool
        self.num_blocks = num_blocks
        # The old arrays' buffers go back to the system: clearing MLX's cache alone would
        # leave them on malloc's free lists, resident for good (omlx.allocator_caches).
        release_freed()

    def _empty(self, rows: int, dim: int):
        dtype = self.layout.dtype
        if self.kv_bits is None:
            return mx.zeros((rows, dim), dtype)
        groups = dim // self.group_size
        return QuantizedRows(
            packed=mx.zeros((rows, dim * self.kv_bits // 32), mx.uint32),
            scales=mx.zeros((rows, groups), dtype),
            biases=mx.zeros((rows, groups), dtype),
            group_size=self.group_size,
            bits=self.kv_bits,
        )

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token(self.layout, self.kv_bits, self.group_size) * self.block_size

    @property
    def nbytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    @staticmethod
    def bytes_per_token(layout: KVLayout, kv_bits: int | None = None, group_size: int = 64) -> int:
        if kv_bits is None:
            return layout.bytes_per_token
        dims = layout.key_dim + layout.value_dim
        # Packed values plus one scale and one bias per group, in the model's dtype.
        per_head = dims * kv_bits // 8 + 2 * (dims // group_size) * layout.dtype.size
        return per_head * layout.num_kv_heads * layout.num_layers

    @staticmethod
    def blocks_for_budget(
        layout: KVLayout, block_size: int, budget_bytes: int, kv_bits: int | None = None, group_size: int = 64
    ) -> int:
        per_block = PagedKVStorage.bytes_per_token(layout, kv_bits, group_size) * block_size
        return max(2, budget_bytes // per_block)

    def write(self, layer: int, keys: mx.array, values: mx.array, rows: mx.array) -> None:
        """Store `[B, H, L, D]` keys/values at their pool rows (see `write_indices`)."""
        # In-place scatter: the previous pool array has no other reference, so MLX reuses
        # its buffer instead of copying the pool.
        for pool, new in ((self.keys[layer], keys), (self.values[layer], values)):
            self._store(pool, rows, new.reshape(-1, new.shape[-1]))

    def _store(self, pool, rows: mx.array, flat: mx.array) -> None:
        """Write float `flat` rows at `rows`, quantizing them first for a quantized pool."""
        if self.kv_bits is None:
            pool[rows] = flat
        else:
            packed, scales, biases = mx.quantize(flat, group_size=self.group_size, bits=self.kv_bits)
            pool.packed[rows] = packed
            pool.scales[rows] = scales
            pool.biases[rows] = biases

    def copy_blocks_from(self, source: "PagedKVStorage", src_blocks: list[int], dst_blocks: list[int]) -> None:
        """Copy whole blocks of another pool of the same model into this one, quantizing
        float rows on the way when this pool is quantized (`--quantized-kv-start`: a
        sequence's float blocks moving to the quantized pool).  Row for row this is
        mlx-lm's `KVCache.to_quantized`: `mx.quantize` along the head dim."""
        if not src_blocks:
            return
        rows_per_block = self.layout.num_kv_heads * self.block_size
        within = mx.arange(rows_per_block, dtype=mx.int32)[None, :]
        src = (mx.array(src_blocks, dtype=mx.int32)[:, None] * rows_per_block + within).reshape(-1)
        dst = (mx.array(dst_blocks, dtype=mx.int32)[:, None] * rows_per_block + within).reshape(-1)
        for layer in range(self.layout.num_layers):
            for pool, other in ((self.keys[layer], source.keys[layer]), (self.values[layer], source.values[layer])):
                if isinstance(other, QuantizedRows):
                    raise ValueError("blocks are only copied out of a float pool")
                self._store(pool, dst, other[src])
        # Not evaluated here: the step's forward pass evaluates the pool (with every other
        # sequence's copies of this step), and a disk-tier snapshot evaluates what it reads.

    def copy_blocks(self, src_blocks: list[int], dst_blocks: list[int]) -> None:
        """Copy whole blocks within this pool, as stored (quantized or not)."""
        rows_per_block = self.layout.num_kv_heads * self.block_size
        within = mx.arange(rows_per_block, dtype=mx.int32)[None, :]
        src = (mx.array(src_blocks, dtype=mx.int32)[:, None] * rows_per_block + within).reshape(-1)
        dst = (mx.array(dst_blocks, dtype=mx.int32)[:, None] * rows_per_block + within).reshape(-1)
        arrays = self.arrays()
        # The rows are read out first, on their own: a scatter whose rows are gathered from
        # the same array in one graph cannot reuse that array's buffer, and MLX then copies
        # the whole pool (measured: ~1 s per copy of a 768 MiB pool, against ~15 ms).
        moved = [array[src] for array in arrays]
        mx.eval(moved)
        for array, rows in zip(arrays, moved):
            array[dst] = rows

    def arrays(self) -> list[mx.array]:
        pools = self.keys + self.values
        if self.kv_bits is None:
            return pools
        return [part for pool in pools for part in pool.parts()]


def check_quantizable(layout: KVLayout, kv_bits: int, group_size: int) -> None:
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"kv group size must be 32, 64 or 128, got {group_size}")
    for dim in (layout.key_dim, layout.value_dim):
        if dim % group_size:
            raise ValueError(
                f"this model's head dim ({dim}) is not a multiple of the KV quantization "
                f"group size ({group_size}); use --kv-group-size 32 or no quantized KV"
            )


@dataclass
class BatchLayout:
    """Everything the layer caches need for one forward pass over `B` rows of `L` tokens.

    A ragged pass (`ragged` set) has one row per token (`L` = 1, offsets per token); the plan
    says which sequence each token belongs to, and attention regroups them."""

    offsets: mx.array  # (B,) position of each row's first new token
    write_rows: mx.array  # (B * H * L,) pool row of each new token's key/value per head
    tiles: mx.array  # (B, H, nb) pool tiles of each row's blocks (scratch block for padding)
    mask: mx.array  # (B, 1, L, nb * block_size)
    cascade: CascadePlan | None = None  # decode rows sharing prefixes (see omlx.kernels)
    # Whether the model's attention calls come to `PagedLayerCache.attention`; if not, the
    # cache hands the model gathered keys/values and mlx-lm's own attention runs on them.
    hooked: bool = False
    ragged: RaggedPlan | None = None

    @classmethod
    def build_ragged(cls, positions, token_blocks, token_offsets, plan: RaggedPlan, num_heads: int, block_size: int):
        """numpy inputs, one entry per token: positions, its block and offset in it."""
        # The write rows computed on the host (write_indices' formula, in numpy): an evaluated
        # array, not a few graph nodes every pass, that the pool writes read as it is.
        heads = np.arange(num_heads, dtype=np.int64)[None, :]
        rows = (np.asarray(token_blocks, dtype=np.int64)[:, None] * num_heads + heads) * block_size \
            + np.asarray(token_offsets, dtype=np.int64)[:, None]
        return cls(
            offsets=mx.array(positions, dtype=mx.int32),
            write_rows=mx.array(rows.reshape(-1).astype(np.int32)),
            tiles=None, mask=None, hooked=True, ragged=plan,
        )

    @classmethod
    def build(cls, offsets, token_blocks, token_offsets, tables, num_heads: int, block_size: int, hooked: bool):
        """numpy inputs: offsets (B,), token_blocks / token_offsets (B, L), tables (B, nb)."""
        query_len = token_blocks.shape[1]
        cascade = plan_cascade(tables, offsets, num_heads, block_size) if query_len == 1 and hooked else None
        offsets_mx = mx.array(offsets, dtype=mx.int32)
        block_tables = mx.array(tables, dtype=mx.int32)
        return cls(
            offsets=offsets_mx,
            write_rows=write_indices(
                mx.array(token_blocks, dtype=mx.int32), mx.array(token_offsets, dtype=mx.int32),
                num_heads, block_size,
            ),
            tiles=gather_indices(block_tables, num_heads),
            mask=causal_paged_mask(offsets_mx, query_len, block_tables.shape[1] * block_size),
            cascade=cascade,
            hooked=hooked,
        )


class PagedLayerCache:
    """What one mlx-lm attention layer sees as its `cache` during a batched forward.

    `kind` is the layer's attention kind: a sliding window or a chunk limits which of the
    sequence's keys its queries see (all of them stay in the pool: the prefix cache and
    other layers share the blocks)."""

    def __init__(self, storage: PagedKVStorage, layer: int, batch: BatchLayout, kind: LayerKind | None = None):
        self.storage = storage
        self.layer = layer
        self.batch = batch
        kind = kind or LayerKind(Kind.FULL)
        self.window = kind.span if kind.kind is Kind.WINDOW else 0
        self.chunk = kind.span if kind.kind is Kind.CHUNK else 0

    @property
    def offset(self) -> mx.array:
        return self.batch.offsets

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        # Routed attention applies the layer's own window (see `attention`); the mask the
        # model would build is never used.
        if self.batch.hooked:
            return None
        if window_size is not None or self.window or self.chunk:
            raise ValueError("windowed attention needs attention routed to the paged cache")
        return self.batch.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        storage, batch = self.storage, self.batch
        storage.write(self.layer, keys, values, batch.write_rows)
        if batch.hooked:
            return keys, values  # attention reads the pool itself, in `attention`
        bs = storage.block_size
        return (
            gather_blocks(storage.keys[self.layer], batch.tiles, bs),
            gather_blocks(storage.values[self.layer], batch.tiles, bs),
        )

    def attention(self, queries: mx.array, scale: float, sinks: mx.array | None = None) -> mx.array:
        storage, batch = self.storage, self.batch
        pool_k, pool_v = storage.keys[self.layer], storage.values[self.layer]
        if batch.ragged is not None:
            return ragged_attention(queries, pool_k, pool_v, batch.ragged, scale,
                                    window=self.window, chunk=self.chunk, sinks=sinks)
        if self.window or self.chunk or sinks is not None:
            raise ValueError("windowed attention and sinks run in the ragged pass only")
        if batch.cascade is not None:
            return cascade_decode_attention(queries, pool_k, pool_v, batch.cascade, storage.block_size, scale)
        return gathered_attention(queries, pool_k, pool_v, batch.tiles, batch.mask, storage.block_size, scale)


class MultiPoolLayerCache(PagedLayerCache):
    """One layer's cache for a pass whose rows keep their KV in different pools (runs of
    consecutive rows; `--quantized-kv-start`: float-pool sequences and quantized-pool ones):
    each run writes and attends its own pool, so one forward pass - one read of the weights
    - serves them all.  Needs the attention hook: the model never sees gathered keys of two
    widths."""

    def __init__(self, parts: list[PagedLayerCache], rows: list[int], offsets: mx.array):
        self.parts, self.offsets = parts, offsets
        self.bounds = [(sum(rows[:i]), sum(rows[: i + 1])) for i in range(len(rows))]

    @property
    def offset(self) -> mx.array:
        return self.offsets

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return None  # attention is routed (see PagedLayerCache.make_mask)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        for part, (lo, hi) in zip(self.parts, self.bounds):
            part.update_and_fetch(keys[lo:hi], values[lo:hi])
        return keys, values

    def attention(self, queries: mx.array, scale: float, sinks: mx.array | None = None) -> mx.array:
        return mx.concatenate([part.attention(queries[lo:hi], scale, sinks) for part, (lo, hi) in zip(self.parts, self.bounds)])


def install_attention_hook(model) -> bool:
    """Route the attention of the model's layers to `PagedLayerCache.attention` when their
    cache is paged, leaving every other use of the model (mlx-lm's own caches) untouched.

    mlx-lm model modules import `scaled_dot_product_attention` from `models.base` by name;
    replacing that name in each module the model is built from is the one seam through
    which paged attention can run without modifying the models.  Returns whether any
    module was hooked.
    """
    hooked = False
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(name)
        original = getattr(module, "scaled_dot_product_attention", None)
        if original is None:
            continue
        if getattr(original, "_omlx_paged", False):
            hooked = True
            continue

        def routed(queries, keys, values, cache, scale, mask, sinks=None, _original=original):
            if isinstance(cache, PagedLayerCache):
                return cache.attention(queries, scale, sinks)
            return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

        routed._omlx_paged = True
        module.scaled_dot_product_attention = routed
        hooked = True
    return hooked
