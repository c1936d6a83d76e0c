"""The engine for models the paged KV pool cannot hold, over mlx-lm's own caches.

`FallbackEngine` is a drop-in for `LLMEngine` (the same methods and views, the same events):
the model pool builds it when `LLMEngine` raises `UnsupportedLayout` (a `CacheList`, a
`ConcatenateKVCache`, a `RotatingKVCache` that keeps tokens, a cache type mlx-lm adds later,
attention the paged engine cannot route).  What it keeps of the paged engine: continuous
batching (requests join and leave between steps), every decode of a step in one forward pass
where the caches batch (see fallback_runner), prompts prefilled in chunks within the step's
token budget so a long prompt never stalls the decodes for its whole length, max_num_seqs,
the same sampler and the same end-of-request rules (emission).  What it has not: paged KV,
a prefix cache (every prompt is computed in full), speculative decoding, KV quantization, the
disk tier, images.

Memory: each sequence's caches grow as mlx-lm grows them, and a decode batch pads every row
to its longest.  The engine projects what its running sequences will hold after the next
step, asks the memory budget for it (growing in doublings, like the paged pool), and when
the budget says no, preempts the newest sequence (its caches are dropped; it recomputes its
prompt and output later), as the paged scheduler does when it runs out of blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from omlx.allocator_caches import release_freed

from .emission import emit_token
from .engine import EngineConfig, default_kv_cache_bytes, parameter_bytes
from .engine_stats import EngineStats, StepCounters
from .fallback_runner import FallbackRunner, cache_kinds
from .parallel_sampling import request_finished
from .engine_requests import EngineRequests
from .request import FinishReason, GenerationRequest, RequestRejected, TokenEvent, check_prompt_length
from .sampler import Sampler
from .sequence import Sequence, SequenceStatus
from .step_profile import StepProfile

log = logging.getLogger("omlx.engine")


@dataclass
class FallbackQueues:
    """The queues, as `LLMEngine.scheduler` shows them to the async bridge and the stats."""

    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # admitted, in admission order
    num_preemptions: int = 0
    speculator: None = None  # no speculative decoding here

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


@dataclass(frozen=True)
class TokenCapacity:
    """`LLMEngine.blocks` as the server reads it (the most tokens one sequence can hold):
    here a "block" is one token."""

    max_usable_blocks: int
    block_size: int = 1


class FallbackEngine(EngineRequests):
    def __init__(
        self, model, config: EngineConfig, context_window: int, reason: str = "",
        kv_budget: Callable[[int], bool] | None = None, label: str | None = None, vision=None,
    ):
        """`reason`: why the paged engine does not serve this model (shown in the status).
        `kv_budget(n)` is asked before the caches may grow by `n` bytes (see module doc)."""
        self.model = model
        self.config = config
        self.reason = reason or "the paged engine does not hold this model's caches"
        self.max_model_len = min(config.max_model_len or context_window, context_window)
        self.max_kv_bytes = config.kv_cache_bytes or default_kv_cache_bytes(parameter_bytes(model))
        self.kv_budget = kv_budget
        self.granted = 0  # bytes the memory budget has given these caches (kv_budget)
        self.runner = FallbackRunner(model, vision)
        self.footprint = self.runner.footprint
        self.blocks = TokenCapacity(self.footprint.most_tokens(self.max_kv_bytes, self.max_model_len))
        # What the cap holds in all (kv_stats): sequences' tokens, by the same estimate.
        self._capacity_tokens = self.footprint.most_tokens(self.max_kv_bytes, self.max_model_len * config.max_num_seqs)
        self.scheduler = FallbackQueues()
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        self._stepping: set[str] | None = None
        self.counters = StepCounters()
        self.profile = StepProfile()
        self.layer_kinds = cache_kinds(model)
        log.info(
            "%s: served by the fallback engine (%s); caches %s; limits: %s", label or "model", self.reason,
            ", ".join(f"{k} x{n}" for k, n in self.layer_kinds.items()), "; ".join(self.limits),
        )
        self.stats = EngineStats.of(self)

    # ------------------------------------------------------------------ what it is
    @property
    def limits(self) -> list[str]:
        limits = ["no paged KV", "no prefix cache (every prompt is computed in full)", "no speculative decoding",
                  "no KV quantization", "no disk KV cache", "prompts prefilled one sequence per forward pass"]
        if not self.runner.batched:
            limits.append(f"decodes one sequence per forward pass ({self.runner.batch_problem})")
        if self.runner.vision is not None and getattr(self.runner.vision, "mrope", False):
            limits.append("text prompts only (no images: multimodal RoPE positions are not served here)")
        return limits

    def serving_info(self) -> dict:
        return {
            "engine": "fallback",
            "reason": self.reason,
            "layer_kinds": self.layer_kinds,
            "batched_decode": self.runner.batched,
            "limits": self.limits,
        }

    # ------------------------------------------------------------------ memory
    @property
    def kv_bytes(self) -> int:
        return self.runner.nbytes

    @property
    def pool_grown(self) -> bool:
        return self.granted > 0

    def shrink_pool(self) -> int:
        """Give back what the memory budget granted, when no request is in flight (the caches
        are all gone then); returns those bytes.  Engine thread."""
        if self.sequences or self.scheduler.has_work:
            return 0
        freed, self.granted = self.granted, 0
        release_freed()  # the caches' buffers to the system, past MLX's cache and malloc's free lists
        return freed

    def kv_stats(self) -> dict:
        """The paged engine's KV statistics, in tokens (one token a block), no prefix cache."""
        used = sum(min(s.num_computed_tokens, s.num_tokens) for s in list(self.scheduler.running))
        capacity = self._capacity_tokens
        return {
            "engine": "fallback", "block_size": 1, "total_blocks": capacity, "max_blocks": capacity,
            "free_blocks": max(0, capacity - used), "used_blocks": used, "cached_blocks": 0,
            "prefix_cache_query_tokens": 0, "prefix_cache_hit_tokens": 0, "prefix_cache_hit_rate": 0.0,
            "bytes": self.kv_bytes, "max_bytes": self.max_kv_bytes, "granted_bytes": self.granted,
            "growths": 0,
        }

    def _projected_bytes(self, seqs: list[Sequence]) -> int:
        """What these sequences' caches hold after the next step (one more token each)."""
        return self.footprint.batch_bytes([s.num_tokens + 1 for s in seqs], padded=self.runner.batched)

    def _reserve(self, nbytes: int) -> bool:
        """Whether the caches may hold `nbytes`: within the cap, and granted by the memory
        budget (asked for doublings, so it is not asked every step)."""
        if nbytes > self.max_kv_bytes:
            return False
        if nbytes <= self.granted:
            return True
        if self.kv_budget is None:
            self.granted = nbytes
            return True
        for target in dict.fromkeys((min(self.max_kv_bytes, max(nbytes, 2 * self.granted)), nbytes)):
            if self.kv_budget(target - self.granted):
                self.granted = target
                return True
        return False

    # ------------------------------------------------------------------ requests
    def check(self, request: GenerationRequest) -> None:
        """Raise RequestRejected if the request could never be served."""
        n = check_prompt_length(request, self.max_model_len)
        if request.multimodal is not None and (self.runner.vision is None or getattr(self.runner.vision, "mrope", False)):
            raise RequestRejected("this model is served by the fallback engine, which takes text prompts only")
        total = min(n + request.max_tokens, self.max_model_len)
        if total > self.blocks.max_usable_blocks:
            raise RequestRejected(
                f"the request needs the caches of {total} tokens (about "
                f"{self.footprint.bytes_for(total) / 2**20:.0f} MiB), more than this model's KV cache cap "
                f"({self.max_kv_bytes / 2**20:.0f} MiB, {self.blocks.max_usable_blocks} tokens)"
            )

    def add_request(self, request: GenerationRequest) -> None:
        seq = self._register(request)
        self.scheduler.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ the step
    def step(self) -> list[tuple[str, TokenEvent]]:
        self._stepping = None
        with self.profile.phase("schedule"):
            ended = self._fit_memory()
            decodes = list(self.runner.decoding)
            chunks = self._prefill_chunks(self.config.max_num_batched_tokens - len(decodes))
            if not decodes and not chunks and self.scheduler.waiting and not self.scheduler.running:
                ended += self._out_of_memory([self.scheduler.waiting[0]])  # it cannot fit even alone
        self._stepping = {s.request_id for s in decodes} | {s.request_id for s, _ in chunks}
        if not decodes and not chunks:
            self.publish_stats()
            return ended
        sampled, logits = self.runner.forward(decodes, chunks, self.profile)
        with self.profile.phase("postprocess"):
            for seq in decodes:
                seq.num_computed_tokens += 1
            for seq, n in chunks:
                seq.num_computed_tokens += n
            siblings = self._fork(sampled)
        tokens, logprobs = [], []
        if sampled:
            rows = list(range(len(sampled))) + [sampled.index(parent) for parent, _ in siblings]
            logits = logits if not siblings else logits[mx.array(rows)]
            with self.profile.phase("sample"):
                tokens, logprobs = self.sampler.sample(logits, sampled + [child for _, child in siblings])
        with self.profile.phase("postprocess"):
            events = self._apply(sampled + [child for _, child in siblings], tokens, logprobs)
        self.counters.prefill_tokens += sum(n for _, n in chunks)
        self.counters.steps += 1
        self.profile.steps += 1
        self.publish_stats()
        return ended + events

    def publish_stats(self) -> None:
        """The snapshot readers on other threads see (engine thread); the paged engine's kind."""
        self.stats = EngineStats.of(self)

    def _prefill_chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """This step's prompt chunks within `budget` tokens: sequences part-way through
        their prompts first, then new arrivals while slots and memory last."""
        queues = self.scheduler
        chunks = []
        for seq in queues.running:
            if budget <= 0:
                break
            if not self.runner.is_decoding(seq):
                n = min(seq.num_pending_tokens, budget)
                chunks.append((seq, n))
                budget -= n
        while queues.waiting and budget > 0 and len(queues.running) < self.config.max_num_seqs:
            seq = queues.waiting[0]
            if not self._reserve(self._projected_bytes(queues.running + [seq])):
                break  # it waits for memory (finished sequences give theirs back)
            queues.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            queues.running.append(seq)
            n = min(seq.num_pending_tokens, budget)
            chunks.append((seq, n))
            budget -= n
        return chunks

    def _fit_memory(self) -> list[tuple[str, TokenEvent]]:
        """Make the running sequences' next step fit the memory budget: preempt the newest
        while it does not; a sequence that does not fit alone ends."""
        running = self.scheduler.running
        while running and not self._reserve(self._projected_bytes(running)):
            if len(running) == 1:
                return self._out_of_memory(list(running))
            self._preempt(running[-1])
        return []

    def _preempt(self, seq: Sequence) -> None:
        """Drop a sequence's caches and send it back to the head of the queue: it recomputes
        its prompt and output when it is admitted again."""
        self.runner.release([seq])
        self.scheduler.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.scheduler.waiting.appendleft(seq)
        self.scheduler.num_preemptions += 1

    def _fork(self, sampled: list[Sequence]) -> list[tuple[Sequence, Sequence]]:
        """n > 1: a request sampling its first token forks into n sequences, each continuing
        from the same prompt (its own copy of the caches) with its own random stream
        (seed + index); they sample from the same logits row.  Returns (parent, child) pairs."""
        pairs = []
        for parent in sampled:
            request = parent.request
            if request.n <= 1 or parent.group is not None or parent.num_output_tokens:
                continue
            group = [parent]
            for index in range(1, request.n):
                child = Sequence(request, index=index)
                child.num_computed_tokens = parent.num_computed_tokens
                child.status = SequenceStatus.RUNNING
                child.scheduled_at = parent.scheduled_at
                child.reported_cache_hit = True  # the request's first event is index 0's
                self.runner.fork(parent, child)
                self.scheduler.running.append(child)
                group.append(child)
                pairs.append((parent, child))
            for member in group:
                member.group = group
        return pairs

    def _apply(self, seqs: list[Sequence], tokens: list[int], logprobs: list) -> list[tuple[str, TokenEvent]]:
        """Each sampled token's event; sequences that end leave, those whose prompt has just
        gone in start decoding."""
        out, ended, joining = [], [], []
        for seq, token, entry in zip(seqs, tokens, logprobs):
            event = emit_token(seq, token, entry, self.max_model_len)
            if event.token_id is not None:
                self.counters.generated_tokens += 1
            if event.finish_reason is not None:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, event.finish_reason
                ended.append(seq)
            elif not self.runner.is_decoding(seq):
                joining.append(seq)
            out.append((seq.request_id, event))
        self._finish(ended, None)
        self.runner.join(joining)
        for seq in ended:
            if request_finished(seq):
                self.sequences.pop(seq.request_id, None)
        return out

    def _finish(self, seqs: list[Sequence], reason: FinishReason | None) -> None:
        """Take sequences out of the queues and free their caches (`reason`: set it too)."""
        queues = self.scheduler
        for seq in seqs:
            if seq.status is SequenceStatus.WAITING:
                try:
                    queues.waiting.remove(seq)
                except ValueError:
                    pass
            elif seq in queues.running:
                queues.running.remove(seq)
            if reason is not None and seq.status is not SequenceStatus.FINISHED:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.runner.release(seqs)

    # ------------------------------------------------------------------ failures
    def _out_of_memory(self, seqs: list[Sequence]) -> list[tuple[str, TokenEvent]]:
        message = (
            f"out of KV cache memory: the request's caches would need more than the "
            f"{self.granted / 2**20:.0f} MiB the memory budget lets this model have (cap "
            f"{self.max_kv_bytes / 2**20:.0f} MiB; other models hold the rest); retry later or lower max_tokens"
        )
        out = self._fail([seq.request_id for seq in seqs], message, "kv_cache_exhausted")
        log.warning("%d request(s) ended: %s", len(out), message)
        return out

    def close(self) -> None:
        """Nothing to flush: the fallback keeps no disk tier."""

    def _end(self, members: list[Sequence], reason: FinishReason) -> None:
        self._finish(members, reason)

