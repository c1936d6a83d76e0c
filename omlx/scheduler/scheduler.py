"""Waiting and running queues; `schedule()` picks each step's work, `postprocess()` applies it.

Each step every running sequence that has a token to decode gets one, and the rest of the
per-step token budget goes to prefill chunks (sequences part-way through their prompt
first, then new arrivals in order).  A long prompt therefore delays the others by at most
one chunk.  When the pool has no block for a decode, the most recently admitted sequence
is preempted: its blocks are released (its full ones stay in the prefix cache) and it goes
back to the front of the queue, to be recomputed - mostly from the cache - later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import FinishReason, TokenEvent
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    # Tokens fed to the model per step: decodes first, prefill chunks with the rest.
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Sequences ended because they can never get the KV blocks they need (see
        # `_unstick`); the engine reports them and clears the list.
        self.out_of_memory: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens

        # Decodes: one token each, in admission order, preempting from the back when full.
        decoders = [s for s in self.running if not s.is_prefilling]
        for seq in decoders:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below while making room for an earlier sequence
            while not self.blocks.allocate(seq, 1):
                victim = self._pick_victim(exclude=seq, scheduled=batch.decodes)
                if victim is None:
                    # Nothing left to preempt: this sequence waits for blocks itself.
                    self._preempt(seq)
                    break
                self._preempt(victim)
            else:
                batch.decodes.append(seq)
                budget -= 1

        # Prefill chunks for sequences already admitted.
        for seq in self.running:
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.is_prefilling:
                n = self._prefill_chunk(seq, budget)
                if n:
                    batch.prefills.append((seq, n))
                    budget -= n

        # Admit new sequences while budget, slots and blocks last.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not batch.empty and self.blocks.prefetching(seq):
                # Its prefix is still being read ahead from disk: admitting it now would
                # stall this step's other sequences on those reads.  A later step, then.
                break
            hit = self.blocks.match_prefix(seq)
            n = self._prefill_chunk(seq, budget)
            if n == 0:
                # Waiting sequences hold no blocks: two of them each holding part of what
                # the other needs would wait forever.  The prefix stays cached.
                self.blocks.free(seq)
                seq.num_computed_tokens = 0
                break
            if not seq.reported_cache_hit:
                seq.cached_prompt_tokens = hit
                self.blocks.record_prefix_lookup(seq.num_prompt_tokens, hit)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        if batch.empty and self.has_work:
            self._unstick()
        return batch

    def _unstick(self) -> None:
        """Work is pending but nothing could be scheduled: the blocks are all held by
        sequences part-way through their prompts, or one sequence alone needs more blocks than
        the pool has and the memory budget will not let it grow.  Preempting the newest lets
        the others go on; a sequence that cannot progress alone never will, and ends."""
        if len(self.running) > 1:
            self._preempt(self.running[-1])
            return
        seq = self.running[0] if self.running else self.waiting[0]
        self.finish(seq, FinishReason.ERROR)
        self.out_of_memory.append(seq)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Reserve blocks for the next prefill chunk (shrunk to what the free blocks hold);
        0 if none could be had.  The chunk that reaches the last pending token yields a sample.
        """
        n = min(seq.num_pending_tokens, budget)
        while n > 0 and not self.blocks.allocate(seq, n):
            # Shrink to what the free blocks can hold (whole blocks past the last one).
            free_slots = self.blocks.num_free_blocks * self.blocks.block_size
            tail = len(seq.block_table) * self.blocks.block_size - seq.num_computed_tokens
            fit = free_slots + tail
            n = fit if fit < n else 0
        return n

    def _pick_victim(self, exclude: Sequence, scheduled: list[Sequence]) -> Sequence | None:
        """The most recently admitted running sequence not already in this step's batch."""
        for seq in reversed(self.running):
            if seq is not exclude and not any(seq is s for s in scheduled):
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ postprocess
    def postprocess(
        self, seqs: list[Sequence], num_new_tokens: list[int], sampled: dict[int, int]
    ) -> list[tuple[Sequence, TokenEvent]]:
        """Advance each scheduled sequence; `sampled[i]` is the token for `seqs[i]` if any."""
        events = []
        for i, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
            seq.num_computed_tokens += n
            self.blocks.cache_full_blocks(seq)
            token = sampled.get(i)
            if token is None:
                continue
            event = TokenEvent(token_id=token, index=seq.index)
            if seq.step_logprobs is not None:
                event.logprob, event.top_logprobs = seq.step_logprobs
                seq.step_logprobs = None
            if not seq.reported_cache_hit:
                event.cached_prompt_tokens = seq.cached_prompt_tokens
                seq.reported_cache_hit = True
            request = seq.request
            if token in request.stop_token_ids:
                event.token_id = None
                event.finish_reason = FinishReason.STOP
            else:
                seq.token_ids.append(token)
                if seq.constraint is not None and seq.constraint.finished:
                    event.finish_reason = FinishReason.STOP  # its grammar is complete
                elif seq.num_output_tokens >= request.max_tokens or seq.num_tokens >= self.config.max_model_len:
                    event.finish_reason = FinishReason.LENGTH
            if event.finish_reason is not None:
                self.finish(seq, event.finish_reason)
            events.append((seq, event))
        return events

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
