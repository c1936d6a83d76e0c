"""A paged KV pool as one thing: its arrays, its blocks, its disk tier, its size.

`PagedKVStorage` holds every layer's key and value arrays; `BlockManager` hands out their
blocks (reference counts, the hash-chained prefix cache); `DiskKVCache` keeps full blocks on
disk past eviction and restarts.  A `KVPool` owns the three and the memory policy around them:
it starts small and grows (doubling, within its cap and only as far as the memory budget
shared by all models allows) when an allocation would fail or evict a cached prefix, and
shrinks back when its model is idle and another model needs the room.  An engine holds a
list of pools (one, or a float and a quantized one with `--quantized-kv-start`); a sequence
names the pool its blocks live in.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .block_manager import BlockManager
from .disk import DiskKVCache
from .kv_cache import KVLayout, PagedKVStorage

log = logging.getLogger("omlx.engine")


class KVPool:
    def __init__(
        self, name: str, layout: KVLayout, block_size: int, num_blocks: int, max_blocks: int, *,
        kv_bits: int | None = None, group_size: int = 64, scope: bytes = b"omlx", prefix_cache: bool = True,
        kv_budget: Callable[[int], bool] | None = None,
    ):
        """`kv_budget(n)` is asked before growing by `n` bytes and answers whether the memory
        budget has room (and takes it); None: growth is bounded by `max_blocks` only."""
        self.name = name
        self.storage = PagedKVStorage(layout, num_blocks, block_size, kv_bits, group_size)
        self.blocks = BlockManager(num_blocks, block_size, scope=scope, prefix_cache=prefix_cache,
                                   max_blocks=max_blocks)
        if max_blocks > num_blocks:
            self.blocks.grower = self.grow
        self.kv_budget = kv_budget
        self.initial_blocks = num_blocks
        self.growths = 0
        self.disk: DiskKVCache | None = None

    def open_disk(self, directory: str, identity: bytes, cap_bytes: int, label: str | None) -> DiskKVCache | None:
        """Put the disk tier behind this pool (None if the directory cannot be used)."""
        try:
            disk = DiskKVCache(directory, identity, self.storage, cap_bytes, label=label)
        except OSError as exc:
            log.warning("KV disk cache disabled: %s", exc)
            return None
        self.disk = self.blocks.disk = disk
        log.info("KV disk cache: %s (%d blocks, cap %.1f GiB)", disk.dir, disk.num_blocks, cap_bytes / 2**30)
        return disk

    # ------------------------------------------------------------------ size
    @property
    def block_size(self) -> int:
        return self.storage.block_size

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @property
    def max_bytes(self) -> int:
        return self.blocks.max_blocks * self.storage.bytes_per_block

    @property
    def grown(self) -> bool:
        return self.storage.num_blocks > self.initial_blocks

    def grow(self, needed: int) -> bool:
        """Add at least `needed` blocks: double the pool if the budget allows, else just what
        is needed.  Block ids are stable, so tables, the prefix cache and the disk tier are
        untouched.  Runs on the engine thread between steps."""
        current = self.storage.num_blocks
        room = self.blocks.max_blocks - current
        if room <= 0:
            return False
        for extra in dict.fromkeys((min(room, max(current, needed)), min(room, needed))):
            if self.kv_budget is not None and not self.kv_budget(extra * self.storage.bytes_per_block):
                continue
            started = time.perf_counter()
            self.storage.grow(current + extra)
            self.blocks.add_blocks(extra)
            self.growths += 1
            log.info("KV %s pool grew %d -> %d blocks (%.0f MiB) in %.0f ms", self.name, current, current + extra,
                     self.nbytes / 2**20, (time.perf_counter() - started) * 1e3)
            return True
        return False

    def shrink(self) -> int:
        """Back to the initial size (the caller made sure no sequence holds blocks: the rest
        only cache prefixes, which the disk tier may still have); returns the bytes freed."""
        if not self.grown:
            return 0
        before = self.nbytes
        self.blocks.truncate(self.initial_blocks)
        self.storage.shrink(self.initial_blocks)
        return before - self.nbytes

    def stats(self) -> dict:
        return {**self.blocks.stats(), "bytes": self.nbytes, "max_bytes": self.max_bytes}

    def close(self) -> None:
        """Flush the disk tier's pending writes."""
        if self.disk is not None:
            self.disk.close()
