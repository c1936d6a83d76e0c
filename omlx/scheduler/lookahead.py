"""Overlapped decode steps: the next step's graph is built and queued while this one computes.

A decode step's Python work - scheduling, building ~450 graph nodes, reading the sampled
tokens back, emitting them - ran while MLX's stream thread waited for it: on a one-stream
decode of a small model that was a quarter of the step.  Here, when a step is nothing but
plain decodes, the engine builds the next step on the tokens this one is still sampling
(lazy arrays, never read back first) and queues it behind it, then reads this step's tokens
and emits them while the next one computes.  mlx-lm's generate loop overlaps one stream the
same way; this does it for a batch.

What a step built ahead assumes, and what happens when it does not hold:
- every sequence goes on: one that ends on this step's token (a stop token, a stop string
  the server aborts on) had its next row computed for nothing; the row is dropped when it
  completes, and its KV write landed past the sequence's last computed token, in a block
  that was never hashed (blocks are released at the finish, and anything that reuses them is
  queued after the write).  A sequence that surely ends on this token (its max_tokens or the
  context length) gets no row ahead.
- nothing else wants the step: a waiting request (its prefill), a draft to verify, a
  constraint or penalty that needs the token on the host, logprobs, state / window / vision
  layers, a second pool, another rank: then no step is built ahead and the engine schedules
  as before.  Prompt-lookup speculation drafts from tokens the host has read, so a pipelined
  sequence cannot draft: after each step the engine asks whether one would, and if so the
  pipeline stops there and the next step is scheduled (and drafted) normally.
- every sequence gets the block slot for its next token without preempting anyone;
  otherwise no step is built ahead.

The tokens are the same as without overlap (tests/test_lookahead.py): the same graph, fed the
same token values, sampled by `Sampler.sample_lazy`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from .sequence import MAIN_POOL, Sequence, SequenceStatus
from .step import ScheduledRow, SchedulerOutput


@dataclass
class Launched:
    """A step whose graph is queued, its tokens not yet read back."""

    out: SchedulerOutput
    seqs: list[Sequence]
    ids: mx.array  # each row's sampled token, lazy


class Lookahead:
    """The engine's overlapped steps (one per engine; engine thread only)."""

    def __init__(self, engine):
        self.engine = engine
        self.inflight: Launched | None = None
        # The step in flight completes before any other is built: a sequence in it would
        # draft (speculation drafts from tokens read back).
        self.hold = False
        self.steps_ahead = 0  # steps built ahead and queued behind the step before
        self.rows_dropped = 0  # rows computed ahead for sequences that had ended

    def take(self) -> Launched | None:
        """The step in flight, if one of its rows still belongs to a running sequence (one
        whose sequences all ended or were aborted is dropped: its writes are queued anyway)."""
        launched, self.inflight = self.inflight, None
        if launched is None:
            return None
        if not any(seq.status is SequenceStatus.RUNNING for seq in launched.seqs):
            self.rows_dropped += len(launched.seqs)
            self.hold = False
            return None
        return launched

    # ------------------------------------------------------------------ eligibility
    def runner_allows(self) -> bool:
        engine, runner = self.engine, self.engine.runner
        return (runner.ragged and runner.state is None and runner.window is None and runner.vision is None
                and not runner.replica and engine.float_pool is None and "execute" not in vars(runner))

    def eligible(self, out: SchedulerOutput) -> bool:
        """Whether a scheduled step can be launched lazily: plain decodes only."""
        if out.empty or out.kv_ops or not self.runner_allows():
            return False
        scheduled = self.engine.scheduler.scheduled
        for row in out.rows:
            if row.prefill or row.draft or row.want_logits != 1 or row.fan_out != 1 or row.pool != MAIN_POOL:
                return False
            if not self.engine.sampler.samples_lazily(scheduled(row.request_id, row.index)):
                return False
        return True

    # ------------------------------------------------------------------ launching
    def launch(self, out: SchedulerOutput, seqs: list[Sequence], fed: mx.array | None = None) -> Launched:
        runner = self.engine.runner
        logits = runner.decode_pass(out.rows, fed)
        ids = self.engine.sampler.sample_lazy(logits, seqs)
        mx.async_eval(ids)
        return Launched(out, seqs, ids)

    def launch_ahead(self, current: Launched) -> Launched | None:
        """The step after `current`, fed `current`'s tokens unread, if it may be built now."""
        engine = self.engine
        scheduler = engine.scheduler
        if not self.runner_allows() or (scheduler.waiting and len(scheduler.running) < scheduler.config.max_num_seqs):
            return None  # a prompt can be admitted: the next step is scheduled (with its prefill)
        rows, seqs, picks = [], [], []
        for k, seq in enumerate(current.seqs):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            # This step's token is appended unless it stops the sequence; one that surely
            # ends on it (its length) gets no row ahead.
            if (seq.num_output_tokens + 1 >= seq.request.max_tokens
                    or seq.num_tokens + 1 >= engine.max_model_len):
                continue
            pool = scheduler.pool_of(seq)
            if pool.blocks_needed(seq, 2) and not pool.allocate(seq, 2):
                return None  # no slot without preempting: the next step is scheduled normally
            rows.append(ScheduledRow(
                request_id=seq.request_id, index=seq.index, pool=seq.pool, start=seq.num_computed_tokens + 1,
                tokens=[0], block_table=list(seq.block_table), want_logits=1))
            seqs.append(seq)
            picks.append(k)
        if not rows:
            return None
        scheduler.steps += 1
        out = SchedulerOutput(step=scheduler.steps, rows=rows, pool_blocks=[p.num_blocks for p in scheduler.pools])
        fed = current.ids if len(picks) == len(current.seqs) else current.ids[mx.array(picks)]
        self.steps_ahead += 1
        return self.launch(out, seqs, fed)

    # ------------------------------------------------------------------ completing
    def complete(self, launched: Launched):
        """Read a launched step's tokens back and apply them; rows whose sequence ended (or
        was aborted) meanwhile are dropped.  Returns the scheduler's events."""
        engine = self.engine
        started = time.perf_counter()
        tokens = launched.ids.tolist()
        engine.profile.add("compute", time.perf_counter() - started)
        live, live_tokens = [], {}
        for row, seq, token in zip(launched.out.rows, launched.seqs, tokens):
            if (seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != row.start
                    or seq.num_tokens != row.start + 1):
                self.rows_dropped += 1
                continue
            live_tokens[len(live)] = token
            live.append(seq)
        with engine.profile.phase("postprocess"):
            events = engine.scheduler.postprocess(live, [1] * len(live), live_tokens)
        return events

    def would_draft(self, seqs: list[Sequence]) -> bool:
        """Whether speculation would draft for one of these sequences now (it cannot while
        they are pipelined: drafts come from tokens read back)."""
        speculator = self.engine.scheduler.speculator
        if speculator is None or not speculator.active or not speculator.drafter.immediate:
            return False
        return any(seq.status is SequenceStatus.RUNNING and speculator.would_draft(seq) for seq in seqs)

    def stats(self) -> dict:
        return {"steps_ahead": self.steps_ahead, "rows_dropped": self.rows_dropped}
