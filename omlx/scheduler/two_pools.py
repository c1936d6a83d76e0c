"""Two KV pools: a float one for sequences under `--quantized-kv-start`, the quantized main one.

With `--kv-bits` and `--quantized-kv-start N` a sequence's KV stays in a float pool until N of
its tokens are computed, then moves, whole, to the quantized pool (mlx-lm's
`maybe_quantize_kv_cache`).  The move is made at exactly N computed tokens: prefill chunks of a
float sequence stop there, and the move happens before the next step.  Where the KV changes
form is then a property of the sequence, not of how its prompt happened to be chunked in a
batch, so the tokens are the same whatever else runs (mlx-lm itself converts after its prefill
chunk or decode step that crosses N, which for a prompt longer than N is later than token N).
A request whose cached quantized prefix already covers N tokens starts in the quantized pool
directly.  The moves of a step are KV operations of its SchedulerOutput (`migrations`).
"""

from __future__ import annotations

from .request import FinishReason
from .sequence import FLOAT_POOL, MAIN_POOL, Sequence, SequenceStatus


class TwoPoolMoves:
    """Mixed into the Scheduler: admission and moves across its `blocks` (main, quantized)
    and `float_blocks` pools."""

    def _prefetching(self, seq: Sequence) -> bool:
        if self.float_blocks is not None and self.float_blocks.prefetching(seq):
            return True
        return self.blocks.prefetching(seq)

    def _match_prefix(self, seq: Sequence) -> int:
        """Give a fresh sequence its cached prefix; returns the tokens reused, or -1 when it
        must wait (its float prefix reaches the threshold but the quantized pool is full)."""
        hit = self.blocks.match_prefix(seq)
        if self.float_blocks is None:
            return hit
        if hit >= self.quantized_kv_start:
            self._drop_read_ahead(seq)
            return hit
        # Under the threshold the tokens are computed in float: quantized blocks covering
        # fewer than `quantized_kv_start` tokens are of no use (they stay cached).
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.pool = FLOAT_POOL
        hit = self.float_blocks.match_prefix(seq)
        if hit >= self.quantized_kv_start:
            moved = self._migrate(seq)
            self._flush_moves()
            if not moved:
                return -1
        return hit

    def _drop_read_ahead(self, seq: Sequence) -> None:
        """The float pool's disk read-ahead for a sequence that will not read from it."""
        if self.float_blocks is not None and self.float_blocks.disk is not None:
            self.float_blocks.disk.release(seq.arrival)

    def _migrate_running(self) -> None:
        """Move every running float sequence that has reached the threshold to the quantized
        pool.  When that pool has no room, the newest sequences in it are preempted; when
        none is newer, the sequence itself waits (preempted, its float blocks cached) for
        older ones to finish - or, with none running there, ends: it cannot fit at all."""
        start = self.quantized_kv_start
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or not seq.in_float_pool:
                continue
            if seq.num_computed_tokens < start:
                continue
            while not self._migrate(seq):
                victim = self._newer_in_main_pool(seq)
                if victim is not None:
                    self._preempt(victim)
                elif any(not s.in_float_pool for s in self.running):
                    self._preempt(seq)
                    break
                else:
                    self.finish(seq, FinishReason.ERROR)
                    self.out_of_memory.append(seq)
                    break
        self._flush_moves()

    def _newer_in_main_pool(self, seq: Sequence) -> Sequence | None:
        index = self.running.index(seq)
        for other in reversed(self.running[index + 1 :]):
            if not other.in_float_pool:
                return other
        return None

    def _migrate(self, seq: Sequence) -> bool:
        """Quantize a float sequence's blocks into the main pool (sharing blocks it caches
        under the same prefix) and release the float ones, which stay cached for others."""
        adopted = self.blocks.adopt(seq.token_ids, seq.num_computed_tokens, seq.request, seq)
        if adopted is None:
            return False
        table, hashes, fresh = adopted
        old = seq.block_table
        self._copies[0].extend(old[i] for i in fresh)
        self._copies[1].extend(table[i] for i in fresh)
        self._moved.append(seq)
        self.float_blocks.free(seq)
        seq.pool = MAIN_POOL
        seq.block_table, seq.block_hashes, seq.num_hashed_blocks = table, hashes, len(hashes)
        self.num_migrations += 1
        return True

    def _flush_moves(self) -> None:
        """Copy this step's moved blocks, then publish the full ones in the prefix cache (the
        disk tier snapshots a block when it is published, so not before it is written)."""
        src, dst = self._copies
        if src:
            self.copy_blocks(src, dst)
            self._kv_ops.migrations.extend(zip(src, dst))
        for seq in self._moved:
            if seq.status is SequenceStatus.RUNNING and not seq.in_float_pool:
                self.blocks.cache_full_blocks(seq)
        self._copies = ([], [])
        self._moved = []
