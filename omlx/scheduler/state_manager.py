"""The scheduler's side of recurrent-state layers: slots follow sequences, snapshots follow
the prefix cache.

A sequence holds a state slot from admission until it finishes or is preempted (a preempted
sequence is recomputed, as its KV is, mostly from the prefix cache).  Its cached prefix is only
usable up to a point where a state snapshot exists: `admit` cuts the prefix the block manager
matched back to the longest such point and starts the slot from that snapshot.
"""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from .block_manager import BlockManager
from .state_cache import StateLayout, StatePlan, StatePool, StateSnapshots

log = logging.getLogger("omlx.engine")


class StateManager:
    stats_key = "state"
    exact_fork = True  # a sibling cannot recompute its parent's state from shared blocks

    def __init__(self, layout: StateLayout, slots: int, block_size: int, interval: int, snapshot_bytes: int):
        """`interval`: tokens between snapshots (a multiple of `block_size`; 0: none, and no
        prefix reuse for this model)."""
        self.pool = StatePool(layout, slots)
        self.block_size = block_size
        self.interval = interval
        self.snapshots = StateSnapshots(snapshot_bytes)
        self.disk = None  # StateDisk: snapshots also kept beside the KV disk tier's blocks
        self.reused_tokens = 0
        self.rollbacks = 0  # drafts partly rejected, their rows taken back out of the state

    # ------------------------------------------------------------------ admission
    def admit(self, seq, blocks: BlockManager, hit: int) -> int:
        """Give a newly admitted sequence its slot.  `hit`: tokens of cached prefix the block
        manager gave it; returns what is usable of it: the longest prefix ending where a
        snapshot was taken (the rest of the matched blocks go back to the cache)."""
        usable, snapshot = 0, None
        if hit and self.interval:
            per = self.interval // self.block_size
            for k in range(hit // self.block_size // per * per, 0, -per):
                snapshot = self._snapshot(seq.block_hashes[k - 1])
                if snapshot is not None:
                    usable = k * self.block_size
                    break
        if usable < hit:
            blocks.keep_prefix(seq, usable // self.block_size)
        self.pool.allocate(seq, snapshot)
        self.reused_tokens += usable
        return usable

    def _snapshot(self, block_hash: bytes):
        snapshot = self.snapshots.get(block_hash)
        if snapshot is None and self.disk is not None:
            snapshot = self.disk.get(block_hash)
            if snapshot is not None:
                self.snapshots.put(block_hash, snapshot)
        return snapshot

    def release(self, seq) -> None:
        self.pool.free(seq)

    def fork(self, parent, child, copied=None) -> None:
        """An n > 1 sibling continues from its parent's state (its KV is handled by the caller)."""
        self.pool.allocate(child)
        self.pool.copy(parent, child)

    def after_step(self, plan: StatePlan | None, seqs: list) -> None:
        self.commit(plan, seqs)

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes + self.snapshots.nbytes

    @property
    def max_bytes(self) -> int:
        return self.pool.nbytes + self.snapshots.cap_bytes

    # ------------------------------------------------------------------ after a pass
    def commit(self, plan: StatePlan | None, seqs: list) -> None:
        """Keep the snapshots the pass took, under the prefix hash of the block ending at each
        (hashes are there once the pass's postprocess has published its full blocks)."""
        if plan is None:
            return
        for (index, position), state in plan.snapshots.items():
            seq = seqs[index]
            k = position // self.block_size
            if 0 < k <= len(seq.block_hashes):
                self.snapshots.put(seq.block_hashes[k - 1], state)
                if self.disk is not None:
                    self.disk.put(seq.block_hashes[k - 1], state)
        plan.snapshots.clear()

    def take_back(self, plan: StatePlan, index: int, seq, keep: int) -> None:
        """A sequence verified a draft and kept only its first `keep` rows: its state becomes
        the state before the pass advanced by those rows (each state layer replayed on the
        inputs it saw for them; nothing else of the model runs again)."""
        if not self.pool.has_slot(seq):
            return  # it finished on the way
        slot = mx.array([self.pool.slot(seq)], dtype=mx.int32)
        classes = self.pool.layout.classes
        for layer, (replay, before, inputs) in enumerate(plan.replays[index]):
            cache = classes[layer](len(before)) if classes else ArraysCache(len(before))
            cache.cache = list(before)
            replay(inputs[:, :keep], cache)
            for array, new in zip(self.pool.arrays[layer], cache.cache):
                array[slot] = new
        self.rollbacks += 1

    def stats(self) -> dict:
        return {
            "slots": self.pool.capacity, "used_slots": self.pool.used_slots, "bytes": self.pool.nbytes,
            "bytes_per_sequence": self.pool.layout.bytes_per_slot, "layers": self.pool.layout.num_layers,
            "snapshot_interval": self.interval, "reused_tokens": self.reused_tokens, "rollbacks": self.rollbacks, **self.snapshots.stats(),
            **({"disk": self.disk.stats()} if self.disk is not None else {}),
        }

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
