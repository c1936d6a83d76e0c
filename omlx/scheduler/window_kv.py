"""Sliding-window layers' KV, bounded by the window (Gemma 3, gpt-oss, OLMo 3...).

A windowed layer's query at position p reads keys in (p - window, p] only.  Kept in the main
pool, those layers would hold every block of a sequence like full attention does; here they
get a pool of their own, so a sequence's KV in them is bounded by its window:

- Sequences keep one block table (the main pool's *logical* blocks: the prefix cache, its
  hashes and the full-attention layers use it as before).  A logical block gets a physical
  block in the window pool when a pass writes it (`prepare`), and a sequence holds the
  physical blocks its next query can still reach; once its window has moved past one
  (`settle`, after each step), the sequence lets it go.
- A physical block nobody holds stays mapped while its logical block is in the prefix cache
  (least recently used first to go), so a resent conversation finds the window it resumes at;
  an unhashed one is unmapped at once.  A logical block reused for other tokens is unmapped
  (`BlockManager.on_evict`).
- A cached prefix is usable up to a point only if the window before it is still there:
  `usable_prefix` cuts the hit back to the longest such point (the blocks may also come back
  from the window pool's own disk tier).

The pool grows (doubling, under the shared memory budget) up to what every running sequence's
window needs, twice over, so running sequences never wait for it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import numpy as np

from dataclasses import replace

from .block_manager import SCRATCH_BLOCK, BlockManager
from .disk import DiskKVCache
from .kv_cache import KVLayout, PagedKVStorage
from .layer_kinds import Kind, LayerKind

log = logging.getLogger("omlx.engine")


class WindowPoolExhausted(MemoryError):
    pass


def split_window_layers(layout: KVLayout, kinds: list[LayerKind]) -> tuple[KVLayout | None, KVLayout]:
    """(the window pool's layout, the main pool's) for a model with both sliding-window and
    other attention layers; (None, layout) when there is nothing to split."""
    window = sum(1 for k in kinds if k.kind is Kind.WINDOW)
    rest = sum(1 for k in kinds if k.kind.attends) - window
    if not window or not rest:
        return None, layout
    return replace(layout, num_layers=window), replace(layout, num_layers=rest)


class WindowKV:
    stats_key = "window"

    def __init__(self, layout: KVLayout, window: int, block_size: int, max_seqs: int, max_rows: int,
                 kv_bits: int | None, group_size: int, kv_budget: Callable[[int], bool] | None):
        """`window`: the widest window of the layers kept here; `max_rows`: the most tokens a
        sequence feeds in one pass (its window needs that many more)."""
        self.window = window
        self.block_size = block_size
        # Blocks one running sequence may hold: its window, the rows of one pass, a partial
        # block at each end.
        self.blocks_per_seq = -(-(window + max_rows) // block_size) + 2
        self.max_blocks = 2 * max_seqs * self.blocks_per_seq + 1
        initial = min(self.max_blocks, 4 * self.blocks_per_seq + 1)
        self.storage = PagedKVStorage(layout, initial, block_size, kv_bits, group_size)
        self.kv_budget = kv_budget
        self.phys_of: dict[int, int] = {}  # logical block -> physical block
        self.logical_of: dict[int, int] = {}
        self.refs = np.zeros(initial, dtype=np.int32)
        # Unheld physical blocks, next to be taken first: unmapped ones in front, cached ones
        # (still mapped) behind them, least recently used first.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, initial))
        self.held: dict[int, set[int]] = {}  # id(sequence) -> logical blocks it holds
        self.blocks: BlockManager | None = None  # the main pool's, set by the engine
        self.disk = None  # the window pool's own disk tier (a DiskKVCache over `storage`)
        self.growths = 0
        self.disk_loads = 0

    def attach(self, blocks: BlockManager, disk=None) -> None:
        """Follow the main pool's blocks; `disk`: (directory, identity, cap bytes, label) of a
        disk tier for the window pool, or None."""
        self.blocks = blocks
        blocks.on_evict = self.on_evict
        blocks.on_publish = self.publish
        if disk:
            directory, identity, cap_bytes, label = disk
            try:
                self.disk = DiskKVCache(directory, identity, self.storage, cap_bytes, label=label)
            except OSError as exc:
                log.warning("sliding-window KV disk cache disabled: %s", exc)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    # ------------------------------------------------------------------ capacity
    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @property
    def max_bytes(self) -> int:
        return self.max_blocks * self.storage.bytes_per_block

    def _grow(self) -> bool:
        current = self.storage.num_blocks
        target = min(self.max_blocks, 2 * current)
        if target <= current:
            return False
        extra = (target - current) * self.storage.bytes_per_block
        if self.kv_budget is not None and not self.kv_budget(extra):
            return False
        self.storage.grow(target)
        self.refs = np.concatenate([self.refs, np.zeros(target - current, dtype=np.int32)])
        for block in range(target - 1, current - 1, -1):
            self.free[block] = None
            self.free.move_to_end(block, last=False)
        self.growths += 1
        return True

    def _take(self) -> int:
        """A physical block to write: an empty one, else grow, else the least recently used
        cached one."""
        if self.free:
            first = next(iter(self.free))
            if first not in self.logical_of:
                del self.free[first]
                return first
        if self._grow():
            return self._take()
        if not self.free:
            raise WindowPoolExhausted(
                "the sliding-window KV pool is full and the memory budget lets it grow no further")
        block, _ = self.free.popitem(last=False)
        self._unmap(block)
        return block

    def _unmap(self, phys: int) -> None:
        logical = self.logical_of.pop(phys, None)
        if logical is not None:
            del self.phys_of[logical]

    # ------------------------------------------------------------------ holding
    def _hold(self, seq_key: int, logical: int) -> None:
        held = self.held.setdefault(seq_key, set())
        if logical in held:
            return
        phys = self.phys_of[logical]
        if self.refs[phys] == 0:
            self.free.pop(phys, None)
        self.refs[phys] += 1
        held.add(logical)

    def _let_go(self, logical: int) -> None:
        phys = self.phys_of.get(logical)
        if phys is None:
            return
        self.refs[phys] -= 1
        assert self.refs[phys] >= 0, "window block released twice"
        if self.refs[phys] == 0:
            if self.blocks is not None and self.blocks.block_hash[logical] is not None:
                self.free[phys] = None  # cached: kept, most recently used last
            else:
                self._unmap(phys)
                self.free[phys] = None
                self.free.move_to_end(phys, last=False)

    def release(self, seq) -> None:
        """A sequence ended or was preempted: it holds nothing any more."""
        for logical in self.held.pop(id(seq), ()):
            self._let_go(logical)

    def on_evict(self, logical: int) -> None:
        """The main pool is reusing logical block `logical` for other tokens: its window KV
        is no one's any more."""
        phys = self.phys_of.get(logical)
        if phys is None:
            return
        if self.refs[phys]:
            # Only a sequence that lost the block from its table can still hold it (settle
            # drops those after each step); it must not keep another's KV.
            for held in self.held.values():
                held.discard(logical)
            self.refs[phys] = 0
        self._unmap(phys)
        self.free.pop(phys, None)
        self.free[phys] = None
        self.free.move_to_end(phys, last=False)

    # ------------------------------------------------------------------ a pass
    def reach(self, position: int) -> int:
        """The first logical block a query at `position` reads."""
        return max(0, position - self.window + 1) // self.block_size

    def prepare(self, seqs: list, counts: list[int]) -> list[np.ndarray]:
        """Before a pass: physical blocks for every logical block its rows write, held by
        their sequences; returns each sequence's window table: its logical table mapped, the
        scratch block where nothing is kept.  (Blocks out of a sequence's reach keep their
        mapping in its table, so sequences sharing a prefix have identical rows there: the
        attention kernel reads a shared prefix through one of them, and skips what is out of
        each query's window.)"""
        bs = self.block_size
        tables = []
        for seq, n in zip(seqs, counts):
            start = seq.num_computed_tokens
            table = seq.block_table
            for i in range(self.reach(start), -(-(start + n) // bs)):
                logical = table[i]
                if logical not in self.phys_of:
                    if i * bs < start:
                        # Rows this pass reads but that are not here: usable_prefix keeps
                        # admissions from ever getting here.
                        raise AssertionError(f"window block {i} of {seq!r} is missing")
                    phys = self._take()
                    self.phys_of[logical] = phys
                    self.logical_of[phys] = logical
                self._hold(id(seq), logical)
            tables.append(np.array([self.phys_of.get(b, SCRATCH_BLOCK) for b in table], dtype=np.int32))
        return tables

    def settle(self, seqs: list) -> None:
        """After a step: each sequence lets go of the blocks its next query cannot reach (and of
        any its table no longer has: a rejected draft's)."""
        for seq in seqs:
            held = self.held.get(id(seq))
            if not held:
                continue
            table = seq.block_table
            keep = set(table[self.reach(seq.num_computed_tokens):])
            for logical in [b for b in held if b not in keep]:
                held.discard(logical)
                self._let_go(logical)

    def copy_block(self, seq, src_logical: int, dst_logical: int) -> None:
        """`dst_logical` (a fresh block of `seq`) gets a copy of `src_logical`'s window KV."""
        src = self.phys_of.get(src_logical)
        if src is None:
            return
        phys = self._take()
        self.phys_of[dst_logical] = phys
        self.logical_of[phys] = dst_logical
        self._hold(id(seq), dst_logical)
        self.storage.copy_blocks([src], [phys])

    def copy_partial(self, seq, src_logical: int, dst_logical: int) -> bool:
        """The window KV of a new sequence's next block, copied from `src_logical`'s
        (partial_prefix); False, copying nothing, when this pool no longer has it."""
        if src_logical not in self.phys_of:
            return False
        try:
            self.copy_block(seq, src_logical, dst_logical)
        except WindowPoolExhausted:
            return False
        return True

    # ------------------------------------------------------------------ admission
    def admit(self, seq, blocks, hit: int) -> int:
        return self.usable_prefix(seq, hit)

    def fork(self, parent, child, copied: tuple[int, int] | None) -> None:
        if copied is not None:
            self.copy_block(child, *copied)

    def after_step(self, plan, seqs: list) -> None:
        self.settle(seqs)

    def usable_prefix(self, seq, hit: int) -> int:
        """Of `hit` cached tokens, the most a new sequence can resume from: the window before
        the resume point must still be here (or come back from the disk tier).  The sequence
        holds those blocks from now on."""
        bs = self.block_size
        end = hit // bs
        key = id(seq)
        while end > 0:
            needed = range(self.reach(end * bs), end)
            if all(self._present(seq, i) for i in needed):
                break
            self.release(seq)  # what this candidate held; a shorter prefix is tried
            end -= 1
        if end * bs < hit:
            self.blocks.keep_prefix(seq, end)
        held = self.held.get(key, set())
        for logical in [b for b in held if b not in set(seq.block_table)]:
            held.discard(logical)
            self._let_go(logical)
        return end * bs

    def _present(self, seq, i: int) -> bool:
        """Whether logical block i of `seq` has its window KV here (loading it from the disk
        tier if it can); held by the sequence when it does, so nothing evicts it meanwhile."""
        logical = seq.block_table[i]
        if logical not in self.phys_of and not self._load(seq, i):
            return False
        self._hold(id(seq), logical)
        return True

    def _load(self, seq, i: int) -> bool:
        if self.disk is None or i >= len(seq.block_hashes):
            return False
        h = seq.block_hashes[i]
        if h not in self.disk:
            return False
        try:
            phys = self._take()
        except WindowPoolExhausted:
            return False
        if not self.disk.load(h, phys):
            self.free[phys] = None
            self.free.move_to_end(phys, last=False)
            return False
        self.phys_of[seq.block_table[i]] = phys
        self.logical_of[phys] = seq.block_table[i]
        self.disk_loads += 1
        return True

    def publish(self, h: bytes, logical: int) -> None:
        """The main pool published a block in the prefix cache: write its window KV behind."""
        phys = self.phys_of.get(logical)
        if self.disk is not None and phys is not None:
            self.disk.publish(h, phys)

    def stats(self) -> dict:
        held = int((self.refs > 0).sum())
        return {
            "window": self.window, "layers": self.storage.layout.num_layers,
            "total_blocks": self.storage.num_blocks - 1, "max_blocks": self.max_blocks - 1,
            "held_blocks": held, "cached_blocks": len(self.phys_of) - held,
            "bytes": self.nbytes, "max_bytes": self.max_bytes, "growths": self.growths,
            "bytes_per_sequence_max": self.blocks_per_seq * self.storage.bytes_per_block,
            **({"disk": self.disk.stats(), "disk_loads": self.disk_loads} if self.disk is not None else {}),
        }
