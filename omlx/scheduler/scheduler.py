"""Waiting and running queues; `schedule()` picks each step's work, `update_from_output()`
applies what the runner made of it.

A step is a contract in plain data (omlx.scheduler.step): `schedule()` returns a
`SchedulerOutput` - the rows of the pass and the KV operations made on the pools - and
`update_from_output()` takes the runner's `RunnerOutput` (sampled tokens, log-probabilities,
accepted draft lengths) and turns it into each request's events.

Each step every running sequence that has a token to decode gets one, and the rest of the
per-step token budget goes to prefill chunks (sequences part-way through their prompt
first, then new arrivals in order).  A long prompt therefore delays the others by at most
one chunk.  When the pool has no block for a decode, the most recently admitted sequence
is preempted: its blocks are released (its full ones stay in the prefix cache) and it goes
back to the front of the queue, to be recomputed - mostly from the cache - later.

With `--kv-bits` and `--quantized-kv-start N` there are two pools (see two_pools).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .emission import emit_token
from .layer_managers import LayerManagers
from .multimodal import needs_vision
from .partial_prefix import PartialPrefix, computes_shared_blocks
from .request import FinishReason, TokenEvent
from .sequence import MAIN_POOL, Sequence, SequenceStatus
from .step import KVOps, RunnerOutput, ScheduledRow, SchedulerOutput
from .two_pools import TwoPoolMoves


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    # Tokens fed to the model per step: decodes first, prefill chunks with the rest.
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096
    # Prompts whose images go through the vision tower in one step.  The tower's cost lands
    # on the step's decodes (their next token waits for it), so image prompts are taken in
    # one per step, each in the step after the last, instead of all at once.
    max_vision_prompts_per_step: int = 1
    # The most rows a step may hold and still run the model's cheap decode form (a dual-form
    # model reads its stored 4-bit codes up to this many rows, packed bf16 - 2.5x the bytes -
    # past it: omlx.models.dual_form); None: no such form.  Drafts are capped to stay within
    # it when the step would otherwise fit.
    cheap_rows: int | None = None


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    # (decode, draft rows reserved) where a drafter that needs a pass (a draft model) fills them.
    draft_rows: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler(TwoPoolMoves):
    def __init__(
        self, config: SchedulerConfig, blocks: BlockManager,
        float_blocks: BlockManager | None = None, quantized_kv_start: int = 0,
        copy_blocks: Callable[[list[int], list[int]], None] | None = None,
        speculator=None,
    ):
        self.config = config
        # The managers of layer kinds with storage of their own (sliding windows, recurrent
        # state: omlx.scheduler.layer_managers), and how whole blocks are copied within a pool
        # (n > 1 forks), both given by the engine.
        self.layers = LayerManagers([])
        self.copy_within: Callable[[int, list[int], list[int]], None] | None = None
        # Token-granular reuse of the block after a new sequence's cached full blocks (None:
        # whole blocks only, as a measurement's baseline).
        self.partial_prefix: PartialPrefix | None = PartialPrefix()
        # Speculative decoding (omlx.scheduler.speculation.Speculator), or None: decoding
        # sequences then get one row each.
        self.speculator = speculator
        self.blocks = blocks
        # The float pool for sequences under `quantized_kv_start` tokens (None: one pool), and
        # how blocks are copied (quantized) from it into the main pool, given by the engine.
        self.float_blocks = float_blocks
        self.pools = [blocks] if float_blocks is None else [blocks, float_blocks]  # by MAIN_POOL / FLOAT_POOL
        self.quantized_kv_start = quantized_kv_start
        self.copy_blocks = copy_blocks
        self.num_migrations = 0
        # This step's moves, copied together (one scatter per pool array, not one per
        # sequence) before anything can reuse the float blocks they come from.
        self._copies: tuple[list[int], list[int]] = ([], [])
        self._moved: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Sequences ended because they can never get the KV blocks they need (see
        # `_unstick`); the engine reports them and clears the list.
        self.out_of_memory: list[Sequence] = []
        # The step contract: steps scheduled, the KV operations made since the last step's
        # output, and the sequences of the step in flight by (request id, completion index).
        self.steps = 0
        self._kv_ops = KVOps()
        self._scheduled: dict[tuple[str, int], Sequence] = {}
        self.profile = None  # the engine's StepProfile (a draft model's pass is timed)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def pool_of(self, seq: Sequence) -> BlockManager:
        return self.pools[seq.pool]

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        """The next step: prompt chunks first, then decodes (with their drafts).  Timed in
        the engine's profile as "schedule", a draft model's pass apart as "draft"."""
        with self._phase("schedule"):
            batch = self._pick()
        speculator = self.speculator
        if speculator is not None and not speculator.drafter.immediate:
            if batch.draft_rows:
                with self._phase("draft"):
                    speculator.draft([s for s, _ in batch.draft_rows], [k for _, k in batch.draft_rows])
        with self._phase("schedule"):
            return self._output(batch)

    def _phase(self, name: str):
        return self.profile.phase(name) if self.profile is not None else _no_phase()

    def forget_scheduled(self) -> None:
        """The step in flight was applied outside `update_from_output` (omlx.scheduler.lookahead)."""
        self._scheduled = {}

    def scheduled(self, request_id: str, index: int = 0) -> Sequence:
        """A sequence of the step in flight (for the runner's sampler, and its layer managers)."""
        return self._scheduled[(request_id, index)]

    def _output(self, batch: ScheduledBatch) -> SchedulerOutput:
        self.steps += 1
        for pool_index, pool in enumerate(self.pools):
            for block, block_hash in pool.take_disk_loads():
                self._kv_ops.disk_loads.append((pool_index, block, block_hash))
        out = SchedulerOutput(step=self.steps, pool_blocks=[p.num_blocks for p in self.pools])
        self._scheduled = {}
        chunks = [(s, n, True) for s, n in batch.prefills] + [(s, 1 + len(s.draft), False) for s in batch.decodes]
        for seq, n, prefill in chunks:
            want = logit_rows(seq, n)
            out.rows.append(ScheduledRow(
                request_id=seq.request_id, index=seq.index, pool=seq.pool, start=seq.num_computed_tokens,
                tokens=seq.tokens_to_feed(seq.num_computed_tokens, n), block_table=list(seq.block_table),
                want_logits=want, draft=list(seq.draft), prefill=prefill,
                fan_out=self._fan_out(seq) if want == 1 and not seq.draft else 1))
            self._scheduled[(seq.request_id, seq.index)] = seq
        if out.rows:
            # An empty step runs nowhere: its KV operations wait for the next step that runs.
            out.kv_ops, self._kv_ops = self._kv_ops, KVOps()
        return out

    def _fan_out(self, seq: Sequence) -> int:
        """n > 1: a request about to sample its first token gets its other completions now,
        as sequences that sample from its logits row this step and take their share of its
        blocks once the row is computed (see parallel_sampling)."""
        request = seq.request
        if request.n <= 1 or seq.group is not None or seq.num_output_tokens:
            return 1
        group = [seq] + [Sequence(request, index=index) for index in range(1, request.n)]
        for member in group:
            member.group = group
            self._scheduled[(seq.request_id, member.index)] = member
        return request.n

    def _pick(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        if self.float_blocks is not None:
            self._migrate_running()

        # Decodes: one token each, in admission order, preempting from the back when full.
        decoders = [s for s in self.running if not s.is_prefilling]
        for seq in decoders:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below while making room for an earlier sequence
            pool = self.pool_of(seq)
            while not pool.allocate(seq, 1):
                victim = self._pick_victim(exclude=seq, scheduled=batch.decodes, pool=pool)
                if victim is None:
                    # Nothing left to preempt: this sequence waits for blocks itself.
                    self._preempt(seq)
                    break
                self._preempt(victim)
            else:
                batch.decodes.append(seq)
                budget -= 1
        if self.speculator is not None and batch.decodes:
            budget -= self._reserve_drafts(batch, budget)

        # Prefill chunks for sequences already admitted.
        vision_room = self.config.max_vision_prompts_per_step
        for seq in self.running:
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.is_prefilling:
                vision = needs_vision(seq, min(seq.num_pending_tokens, budget))
                if vision and vision_room <= 0:
                    continue  # its images are encoded in a later step
                n = self._prefill_chunk(seq, budget)
                vision_room -= bool(vision and n)
                if n:
                    batch.prefills.append((seq, n))
                    budget -= n

        # Admit new sequences while budget, slots and blocks last.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not batch.empty and self._prefetching(seq):
                # Its prefix is still being read ahead from disk: admitting it now would
                # stall this step's other sequences on those reads.  A later step, then.
                break
            if not batch.empty and self.partial_prefix is not None and computes_shared_blocks(
                    seq, self.running, self.pool_of(seq).block_size):
                # A sequence ahead of it is computing the prompt they share: it takes those
                # blocks from the cache once they are there instead of computing them too.
                break
            hit = self._match_prefix(seq)
            if hit >= 0:
                hit = self.layers.admit(seq, self.pool_of(seq), hit)
            if hit >= 0:
                hit += self._extend_partial(seq)
            vision = hit >= 0 and needs_vision(seq, min(seq.num_pending_tokens, budget))
            if vision and vision_room <= 0:
                self._release(seq)  # it keeps its place at the head of the queue
                break
            n = self._prefill_chunk(seq, budget) if hit >= 0 else 0
            vision_room -= bool(vision and n)
            if n == 0:
                # Waiting sequences hold no blocks: two of them each holding part of what
                # the other needs would wait forever.  The prefix stays cached.
                self._release(seq)
                break
            if not seq.reported_cache_hit:
                seq.cached_prompt_tokens = hit
                self.pool_of(seq).record_prefix_lookup(seq.num_prompt_tokens, hit)
            self.waiting.popleft()
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        if batch.empty and self.has_work:
            self._unstick()
        return batch

    def _extend_partial(self, seq: Sequence) -> int:
        """The tokens a new sequence shares past its cached full blocks, copied from a block
        that has them (see partial_prefix); 0 where that cannot apply: a window pool copies
        its part of the block too, recurrent state resumes only at its snapshots."""
        if self.partial_prefix is None or self.copy_within is None:
            return 0
        if self._kv_ops.migrations:
            # Another rank applies copies before migrations: a block moved this step must
            # not be a copy's source there before it is written.
            return 0
        limit = seq.num_tokens - 1 - seq.num_computed_tokens  # the last token is always fed
        if seq.in_float_pool:  # a float sequence must reach its threshold by computing
            limit = min(limit, self.quantized_kv_start - 1 - seq.num_computed_tokens)
        if not self.layers.copy_partial_blocks:
            return 0

        def copy(src: int, dst: int) -> bool:
            if not self.layers.copy_partial(seq, src, dst):
                return False
            self._copy_block(seq.pool, src, dst)
            return True

        return self.partial_prefix.extend(seq, self.pool_of(seq), self.running, copy, limit)

    def _copy_block(self, pool: int, src: int, dst: int) -> None:
        """Copy a whole block within a pool now, and tell other ranks (a KV operation)."""
        self.copy_within(pool, [src], [dst])
        self._kv_ops.copies.append((pool, src, dst))

    def _reserve_drafts(self, batch: ScheduledBatch, budget: int) -> int:
        """Draft rows for this step's decodes, within the token budget (half of what is left
        when prompts are waiting for it) and the blocks free now: a draft never preempts
        anyone.  Returns the rows reserved."""
        prompts = bool(self.waiting or any(s.is_prefilling for s in self.running))
        if prompts:
            budget //= 2
        cheap = self.config.cheap_rows
        # The step fits the cheap decode form: a draft that took it past would make every row
        # of it read the expensive form's bytes, which pays only for a sequence whose drafts
        # are mostly accepted (Speculator.pays_past_cheap_rows).
        fits = cheap is not None and not prompts and len(batch.decodes) <= cheap
        cheap_room = cheap - len(batch.decodes) if fits else None
        reserved = 0
        for seq in batch.decodes:
            cap = min(self.speculator.config.max_draft_tokens, budget - reserved, self._draft_room(seq))
            if cheap_room is not None and not self.speculator.pays_past_cheap_rows(seq):
                cap = min(cap, cheap_room - reserved)
            k = self.speculator.plan(seq, cap)
            if k and not self.pool_of(seq).allocate(seq, 1 + k):
                seq.draft = []
                k = 0
            if k:
                batch.draft_rows.append((seq, k))
            reserved += k
        return reserved

    def _draft_room(self, seq: Sequence) -> int:
        """The most draft tokens a decode may verify without emitting past max_tokens or the
        context window, or crossing the float pool's threshold (where its KV moves)."""
        room = min(seq.request.max_tokens - seq.num_output_tokens, self.config.max_model_len - seq.num_tokens) - 1
        if seq.in_float_pool:
            room = min(room, self.quantized_kv_start - seq.num_computed_tokens - 1)
        return room

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
        if seq.in_float_pool:  # a float sequence stops at the threshold, where it moves
            n = min(n, self.quantized_kv_start - seq.num_computed_tokens)
        pool = self.pool_of(seq)
        while n > 0 and not pool.allocate(seq, n):
            # Shrink to what the free blocks can hold (whole blocks past the last one).
            free_slots = pool.num_free_blocks * pool.block_size
            tail = len(seq.block_table) * pool.block_size - seq.num_computed_tokens
            fit = free_slots + tail
            n = fit if fit < n else 0
        return n

    def _pick_victim(self, exclude: Sequence, scheduled: list[Sequence], pool: BlockManager) -> Sequence | None:
        """The most recently admitted running sequence not already in this step's batch
        whose blocks are in `pool` (freeing the other pool's would not help)."""
        for seq in reversed(self.running):
            if seq is not exclude and not any(seq is s for s in scheduled) and self.pool_of(seq) is pool:
                return seq
        return None

    def _release(self, seq: Sequence) -> None:
        """Give back all of a sequence's blocks (full ones stay cached); it holds no pool."""
        self.pool_of(seq).free(seq)
        self.layers.release(seq)
        seq.num_computed_tokens = 0
        seq.pool = MAIN_POOL
        seq.draft = []
        if self.speculator is not None:
            self.speculator.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def fork_exact(self, parent: Sequence, child: Sequence, computed: int) -> None:
        """An n > 1 sibling of a model with state layers starts exactly where its parent is:
        the parent's state, and its own copy of the parent's partial last block (the shared
        full blocks are already the child's, see BlockManager.fork)."""
        pool = self.pool_of(parent)
        tail = len(child.block_table)
        copied = None
        if computed > child.num_computed_tokens:
            if not pool.allocate(child, computed - child.num_computed_tokens):
                # No block for the copy: the sibling cannot start; it ends like any request
                # that cannot get its blocks.
                self.finish(child, FinishReason.ERROR)
                self.out_of_memory.append(child)
                return
            copied = (parent.block_table[tail], child.block_table[tail])
            self.copy_within(child.pool, [copied[0]], [copied[1]])
            self._kv_ops.copies.append((child.pool, *copied))
            child.num_computed_tokens = computed
        self.layers.fork(parent, child, copied)

    # ------------------------------------------------------------------ after the pass
    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> list[tuple[Sequence, TokenEvent]]:
        """Apply a step the runner has run: advance every row's sequence, emit its tokens,
        keep what a verified draft accepted, and start the n > 1 completions that forked."""
        seqs = [self._scheduled[(r.request_id, r.index)] for r in out.rows]
        plain = [k for k, row in enumerate(out.rows) if not row.draft]
        siblings = []
        for k in plain:
            if out.rows[k].fan_out > 1 and result.sampled[k]:
                siblings += self._fork(seqs[k], out.rows[k], result.sampled[k], result.logprobs[k])
        events = self.postprocess(
            [seqs[k] for k in plain], [out.rows[k].num_tokens for k in plain],
            {i: result.sampled[k][0] for i, k in enumerate(plain) if result.sampled[k]},
            {i: result.logprobs[k][0] for i, k in enumerate(plain) if result.sampled[k] and result.logprobs[k]})
        for k, row in enumerate(out.rows):
            if row.draft:
                events += self.apply_verified(seqs[k], result.sampled[k], result.logprobs[k])
        for sibling, token, logprobs in siblings:
            events += self.postprocess([sibling], [0], {0: token}, {0: logprobs} if logprobs is not None else None)
        for plan, part in result.local:
            self.layers.after_step(plan, [seqs[k] for k in part])
        self._scheduled = {}
        return events

    def _fork(self, seq: Sequence, row: ScheduledRow, tokens: list[int], logprobs) -> list:
        """The other completions of `seq`'s request take references on its prompt's blocks
        (a model with state layers: copies of its state and partial block, `fork_exact`).
        Returns (sibling, its first token, its logprobs) for each."""
        computed = seq.num_computed_tokens + row.num_tokens  # the whole prompt, once applied
        out = []
        for sibling, token, entry in zip(seq.group[1:], tokens[1:], (logprobs or [None] * len(tokens))[1:]):
            sibling.pool = seq.pool  # shares the pool its blocks are in
            self.pool_of(seq).fork(seq, sibling, computed)
            if self.layers.exact_fork:
                self.fork_exact(seq, sibling, computed)
            sibling.status = SequenceStatus.RUNNING
            sibling.reported_cache_hit = True  # the prompt's cache hit is reported once, by index 0
            self.running.append(sibling)
            out.append((sibling, token, entry))
        return out

    def postprocess(
        self, seqs: list[Sequence], num_new_tokens: list[int], sampled: dict[int, int],
        logprobs: dict[int, tuple] | None = None,
    ) -> list[tuple[Sequence, TokenEvent]]:
        """Advance each scheduled sequence; `sampled[i]` is the token for `seqs[i]` if any
        (and `logprobs[i]` its log-probabilities, where the request asks)."""
        events = []
        for i, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
            seq.num_computed_tokens += n
            self.pool_of(seq).cache_full_blocks(seq)
            token = sampled.get(i)
            if token is None:
                continue
            events.append((seq, self._emit(seq, token, (logprobs or {}).get(i))))
        return events

    def apply_verified(self, seq: Sequence, tokens: list[int], logprobs: list | None) -> list[tuple[Sequence, TokenEvent]]:
        """Advance a sequence that verified a draft this step: `tokens` are its accepted
        draft tokens and then the model's own (see verification).  The KV of the pending
        token and of each accepted draft token is kept; the rejected rows' KV is left where
        it was written, past `num_computed_tokens`, to be overwritten, and blocks holding
        only such rows go back to the pool.  Nothing unverified is ever hashed."""
        drafted = len(seq.draft)
        seq.draft = []
        if self.speculator is not None:
            self.speculator.record(seq, drafted, len(tokens) - 1)
        events = []
        for j, token in enumerate(tokens):
            seq.num_computed_tokens += 1  # the token this one was predicted after
            event = self._emit(seq, token, logprobs[j] if logprobs else None)
            if j == 0:
                event.drafted_tokens, event.accepted_tokens = drafted, len(tokens) - 1
            events.append((seq, event))
            if event.finish_reason is not None:
                return events  # finished: its blocks are already released
        pool = self.pool_of(seq)
        pool.trim(seq)
        pool.cache_full_blocks(seq)
        return events

    def _emit(self, seq: Sequence, token: int, logprobs) -> TokenEvent:
        """The event for one token a sequence produced; appends it or finishes the sequence."""
        event = emit_token(seq, token, logprobs, self.config.max_model_len)
        if event.finish_reason is not None:
            self.finish(seq, event.finish_reason)
        return event

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
        self.pool_of(seq).free(seq)
        self.layers.release(seq)
        self._drop_read_ahead(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def logit_rows(seq: Sequence, fed: int) -> int:
    """Logits rows a sequence needs from a pass that feeds it `fed` tokens: a draft's rows to
    verify, one to sample (a decode, or the prefill chunk reaching the prompt's end), or none."""
    if seq.draft:
        return 1 + len(seq.draft)
    return 1 if seq.num_computed_tokens + fed == seq.num_tokens else 0


@contextmanager
def _no_phase():
    yield
