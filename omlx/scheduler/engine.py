"""One model's engine: requests in, one step at a time, tokens out.

`LLMEngine.step()` runs one scheduler iteration - every running sequence's next token and
this step's prompt chunks in one ragged forward pass - and returns each request's new token.
A step is three calls over plain data (omlx.scheduler.step): `Scheduler.schedule()` gives a
`SchedulerOutput`, `ModelRunner.execute()` makes a `RunnerOutput` of it, and
`Scheduler.update_from_output()` turns that into events.  After each step the engine publishes
an `EngineStats` snapshot for readers on other threads.  `async_engine.AsyncEngine` runs the
steps on a thread of their own for asyncio clients.
"""

from __future__ import annotations

import logging
from typing import Callable

from omlx.models import dual_form

from .block_manager import BlockManager
from .kv_cache import PagedKVStorage, install_attention_hook
from .engine_config import DRAFT_KV_CAP, INITIAL_KV_BYTES, EngineConfig  # noqa: F401 (re-exported)
from .kv_dtype import dtype_name, pool_layout
from .kv_pool import KVPool
from .kv_sizing import (  # noqa: F401 (re-exported)
    default_kv_cache_bytes, parameter_bytes, pool_plans, quantization_for, weights_fingerprint,
)
from .layer_kinds import Kind, UnsupportedLayout, describe, layer_kinds
from .layer_managers import LayerManagers
from .state_cache import probe_state_layers, route_state_layers
from .disk.state_files import StateDisk
from .self_check import check_paged_pass
from .state_manager import StateManager
from .window_kv import WindowKV, split_window_layers
from .engine_requests import EngineRequests
from .request import FinishReason, GenerationRequest, RequestRejected, TokenEvent, check_prompt_length
from .runner import ModelRunner, prefill_groups  # noqa: F401 (re-exported)
from .parallel_sampling import request_finished
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerConfig, logit_rows  # noqa: F401 (re-exported)
from .sequence import Sequence
from .draft_model import DraftModelDrafter
from .speculation import SpeculationConfig, Speculator
from .engine_stats import EngineStats, StepCounters
from .step_profile import StepProfile
from .lookahead import Lookahead
from .step import SchedulerOutput

log = logging.getLogger("omlx.engine")


class LLMEngine(EngineRequests):
    def __init__(
        self, model, config: EngineConfig, context_window: int, scope: bytes = b"",
        kv_budget: Callable[[int], bool] | None = None, label: str | None = None,
        vision=None, draft_model=None,
    ):
        """`scope` is the model's identity (its content; see omlx.models.content_hash): it
        scopes prefix hashes and names the disk tier's directory.  `kv_budget(n)` is asked
        before a KV pool grows by `n` bytes (see KVPool).  `label` names the model in the
        disk tier: its directories under an older identity are removed when it opens.
        `vision`: a vision-language model's per-pass input builder (omlx.vision.encoder).
        `draft_model`: a smaller model with the same tokenizer that drafts for speculative
        decoding (default: prompt lookup)."""
        self.model = model
        self.config = config
        # What each layer keeps (UnsupportedLayout for caches the pool cannot hold: the model
        # pool then serves the model with the fallback engine).
        self.kinds = layer_kinds(model)
        self._kinds_described = describe(self.kinds)  # in every stats snapshot: made once
        # The pools' dtype: the model's own, or bf16 where its matmuls run packed bf16 (kv_dtype).
        layout, self.kv_dtype_reason = pool_layout(model, config.kv_dtype)
        kv_bits, group_size = quantization_for(layout, config.kv_bits, config.kv_group_size)
        self.quantized_kv_start = config.quantized_kv_start if kv_bits is not None else 0
        if config.quantized_kv_start and kv_bits is None:
            log.info("quantized_kv_start=%d has no effect: the KV cache is not quantized", config.quantized_kv_start)
        if self.quantized_kv_start < 0:
            raise ValueError(f"quantized_kv_start must be >= 0, got {self.quantized_kv_start}")
        scope = scope or b"omlx"
        # Sliding-window layers in a pool of their own, bounded by the window (window_kv);
        # the main pool then holds the other attention layers.
        self.window = None
        window_layout, layout = split_window_layers(layout, self.kinds) if (
            config.window_kv and self.quantized_kv_start == 0) else (None, layout)
        if window_layout is not None:
            self.window = WindowKV(
                window_layout, max(k.span for k in self.kinds if k.kind is Kind.WINDOW), config.block_size,
                config.max_num_seqs, config.max_num_batched_tokens + config.num_draft_tokens + 1,
                kv_bits, group_size, kv_budget)
        # The main pool; with quantized_kv_start a float pool too (see _pool_plans).
        self.pools: list[KVPool] = []
        for name, bits, (num_blocks, max_blocks), pool_scope in pool_plans(config, model, layout, kv_bits, group_size, scope, self.quantized_kv_start):
            pool = KVPool(name, layout, config.block_size, num_blocks, max_blocks, kv_bits=bits,
                          group_size=group_size, scope=pool_scope, prefix_cache=config.prefix_cache,
                          kv_budget=kv_budget)
            if config.kv_cache_dir:
                # Each pool its own directory (and label), so neither counts as the other's
                # outdated identity.
                suffix = pool_scope[len(scope):]
                pool_label = f"{label} ({suffix.decode().lstrip('|')})" if suffix and label else label
                identity = (scope if scope != b"omlx" else weights_fingerprint(model)) + suffix
                pool.open_disk(config.kv_cache_dir, identity, config.kv_disk_bytes, pool_label)
            self.pools.append(pool)
        self.main_pool = self.pools[0]
        self.float_pool = self.pools[1] if len(self.pools) > 1 else None
        if self.window is not None:
            self.window.attach(self.blocks, config.kv_cache_dir and (
                config.kv_cache_dir, (scope if scope != b"omlx" else weights_fingerprint(model)) + b"|window",
                config.kv_disk_bytes, f"{label} (window)" if label else None))
        self.max_model_len = min(config.max_model_len or context_window, context_window)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                max_vision_prompts_per_step=config.max_vision_prompts_per_step,
                cheap_rows=dual_form.codes_rows(model),  # a dual-form model's codes form
            ),
            self.blocks,
            float_blocks=self.float_blocks,
            quantized_kv_start=self.quantized_kv_start,
            copy_blocks=self._quantize_blocks if self.float_pool is not None else None,
        )
        self.state = None
        self.layers = LayerManagers([m for m in (self.window,) if m is not None])
        try:
            self._attach_layers(model, config, vision)
        except UnsupportedLayout:
            self.close()  # the disk tiers it opened: the fallback engine may open them again
            raise
        # Draft rows are verified inside the one ragged pass; a padded model decodes plainly.
        if config.speculative and config.num_draft_tokens > 0 and self.runner.ragged:
            spec_config = SpeculationConfig(
                max_draft_tokens=config.num_draft_tokens,
                initial_draft_tokens=min(config.num_draft_tokens, SpeculationConfig.initial_draft_tokens),
            )
            drafter = None
            if draft_model is not None:
                # Its KV: what the main pool may grow to, scaled by the models' KV per token.
                draft_layout, _ = pool_layout(draft_model, config.kv_dtype)
                ratio = draft_layout.bytes_per_token / max(1, layout.bytes_per_token)
                kv_bytes = int(min(self.max_kv_bytes, DRAFT_KV_CAP) * ratio)
                drafter = DraftModelDrafter(draft_model, config.block_size, kv_bytes, label or "model",
                                            scope=b"draft:" + weights_fingerprint(draft_model), layout=draft_layout)
            self.scheduler.speculator = Speculator(spec_config, drafter)
        self.runner.vision = vision
        self.sampler = Sampler()
        # The runner samples on this rank: the scheduler's sequences carry each request's
        # sampling state (random streams, constraints).
        self.runner.sampler = self.sampler
        self.runner.resolve = self.scheduler.scheduled
        self.runner.pools = [pool.storage for pool in self.pools]
        self.sequences: dict[str, Sequence] = {}
        self._stepping: set[str] | None = None  # request ids of the step being run
        self.counters = StepCounters()
        # Plain decode steps overlapped with the next one's building (omlx.scheduler.lookahead).
        self.lookahead = Lookahead(self) if config.overlap_steps else None
        self.profile = StepProfile()
        self.runner.profile = self.profile
        self.scheduler.profile = self.profile
        self.stats = EngineStats.of(self)
        for pool in self.pools:
            log.info(
                "KV %s pool: %d blocks x %d tokens (%.1f MiB%s), %d layers, %s%s", pool.name,
                pool.storage.num_blocks, pool.block_size, pool.nbytes / 2**20,
                f", may grow to {pool.blocks.max_blocks} blocks / {pool.max_bytes / 2**20:.0f} MiB"
                if pool.blocks.max_blocks > pool.storage.num_blocks else "",
                layout.num_layers, f"{dtype_name(layout.dtype)} ({self.kv_dtype_reason})",
                f", quantized to {pool.storage.kv_bits} bits (groups of {group_size})" if pool.storage.kv_bits else
                (f", for each sequence's first {self.quantized_kv_start} tokens" if pool is self.float_pool else ""),
            )

    def _attach_layers(self, model, config: EngineConfig, vision) -> None:
        """State layers' slots, the runner, and the check that the paged pass computes what
        mlx-lm does (UnsupportedLayout when it cannot)."""
        if not install_attention_hook(model) and any(k.kind is not Kind.FULL for k in self.kinds):
            # Checked before state layers are routed: a refused model goes to the fallback
            # engine as mlx-lm built it.
            raise UnsupportedLayout("windowed or state layers need attention routed to the paged pool, "
                                    "and this model's attention could not be routed")
        self.state = self._state_manager(model, config)
        if self.state is not None and self.disk is not None and self.state.interval:
            # State snapshots live beside the main pool's blocks, capped at a quarter of its tier.
            self.state.disk = StateDisk(self.disk.dir, self.state.pool.layout, config.kv_disk_bytes // 4)
        self.layers = LayerManagers([m for m in (self.window, self.state) if m is not None])
        self.scheduler.layers = self.layers
        self.runner = ModelRunner(model, self.storage, self.kinds, self.state, self.window)
        self.scheduler.copy_within = lambda pool, src, dst: self.pools[pool].storage.copy_blocks(src, dst)
        self.runner.vision = vision  # text-only rows still take their positions from it (mRoPE)
        if self.runner.ragged:
            check_paged_pass(self)  # UnsupportedLayout if the model does not run right paged

    def _state_manager(self, model, config: EngineConfig) -> StateManager | None:
        """Slots and snapshots for the model's recurrent-state layers, if it has any."""
        if not any(k.kind is Kind.STATE for k in self.kinds):
            return None
        layout, receivers = probe_state_layers(model, self.kinds)
        route_state_layers(receivers)
        bs = config.block_size
        interval = -(-config.state_snapshot_tokens // bs) * bs if config.prefix_cache else 0
        manager = StateManager(layout, config.max_num_seqs, bs, interval, config.state_snapshot_bytes)
        log.info("state layers: %d (%s), %.1f KiB per sequence; snapshots every %d tokens, up to %.0f MiB",
                 layout.num_layers, ", ".join(sorted({type(m).__name__ for m in receivers})),
                 layout.bytes_per_slot / 1024, interval, config.state_snapshot_bytes / 2**20)
        return manager

    def serving_info(self) -> dict:
        """How this model is served: the paged engine, its layer kinds and what it cannot do."""
        limits = []
        if self.state is not None:
            limits.append(f"prefix cache resumes at state snapshots (every {self.state.interval} tokens)")
        if self.window is None and any(k.kind in (Kind.WINDOW, Kind.CHUNK) for k in self.kinds):
            limits.append("windowed layers keep every block of a sequence (the window is applied by attention)")
        return {"engine": "paged", "layer_kinds": describe(self.kinds), "limits": limits,
                "speculative_decoding": self.scheduler.speculator is not None,
                "overlap_steps": self.lookahead.stats() if self.lookahead is not None else None,
                "kv_dtype": dtype_name(self.storage.layout.dtype), "kv_dtype_reason": self.kv_dtype_reason}

    # Views of the pools that the scheduler, the server and tests use.
    @property
    def storage(self) -> PagedKVStorage:
        return self.main_pool.storage

    @property
    def blocks(self) -> BlockManager:
        return self.main_pool.blocks

    @property
    def disk(self):
        return self.main_pool.disk

    @property
    def float_storage(self) -> PagedKVStorage | None:
        return self.float_pool.storage if self.float_pool else None

    @property
    def float_blocks(self) -> BlockManager | None:
        return self.float_pool.blocks if self.float_pool else None

    @property
    def float_disk(self):
        return self.float_pool.disk if self.float_pool else None

    def _quantize_blocks(self, src: list[int], dst: list[int]) -> None:
        """A float sequence reached quantized_kv_start: its float blocks, quantized, into the main pool."""
        self.storage.copy_blocks_from(self.float_storage, src, dst)

    # ------------------------------------------------------------------ KV memory
    @property
    def max_kv_bytes(self) -> int:
        return sum(pool.max_bytes for pool in self.pools) + self.layers.max_bytes

    @property
    def kv_bytes(self) -> int:
        """The KV memory held now (all pools, the window pool, state slots and snapshots)."""
        return sum(pool.nbytes for pool in self.pools) + self.layers.nbytes

    @property
    def pool_growths(self) -> int:
        return sum(pool.growths for pool in self.pools)

    @property
    def pool_grown(self) -> bool:
        """Whether a pool is bigger than it started (so `shrink_pool` has something to give)."""
        return any(pool.grown for pool in self.pools)

    def shrink_pool(self) -> int:
        """Give back what the pools grew beyond their initial sizes, if no request is in
        flight (their blocks then hold only cached prefixes); returns the bytes freed.
        Engine thread."""
        if self.sequences or self.scheduler.has_work:
            return 0
        freed = sum(pool.shrink() for pool in self.pools)
        if freed:
            log.info("KV pool shrank to its initial size (%.0f MiB freed)", freed / 2**20)
        return freed

    def kv_stats(self) -> dict:
        stats = self._kv_pool_stats()
        stats["layer_kinds"] = self._kinds_described
        stats.update(self.layers.stats())
        partial = self.scheduler.partial_prefix
        if partial is not None:
            # Prompt tokens copied from a shared partial block (part of prefix_cache_hit_tokens).
            stats["prefix_cache_partial_tokens"] = partial.reused_tokens
        stats["bytes"], stats["max_bytes"] = self.kv_bytes, self.max_kv_bytes
        return stats

    def _kv_pool_stats(self) -> dict:
        if self.float_pool is None:
            return {**self.main_pool.stats(), "growths": self.pool_growths}
        # Two pools: the top-level counts are both pools' together; `pools` has each.
        pools = {pool.name: pool.stats() for pool in self.pools}
        out = dict(pools["quantized"])
        out.pop("disk", None)
        for key in ("total_blocks", "max_blocks", "free_blocks", "used_blocks", "cached_blocks",
                    "prefix_cache_query_tokens", "prefix_cache_hit_tokens"):
            out[key] = pools["float"][key] + pools["quantized"][key]
        queries = out["prefix_cache_query_tokens"]
        out["prefix_cache_hit_rate"] = out["prefix_cache_hit_tokens"] / queries if queries else 0.0
        if self.disk is not None:
            out["disk"] = pools["quantized"]["disk"]
        out.update(bytes=self.kv_bytes, max_bytes=self.max_kv_bytes, growths=self.pool_growths,
                   quantized_kv_start=self.quantized_kv_start, migrations=self.scheduler.num_migrations,
                   pools=pools)
        return out

    # ------------------------------------------------------------------ requests
    def check(self, request: GenerationRequest) -> None:
        """Raise RequestRejected if the request could never be served."""
        n = check_prompt_length(request, self.max_model_len)
        total_tokens = min(n + request.max_tokens, self.max_model_len)
        total_blocks = -(-total_tokens // self.blocks.block_size)
        if self.float_blocks is not None:
            # Its first quantized_kv_start tokens in the float pool, all of them in the
            # quantized one once past that.
            float_blocks = -(-min(total_tokens, self.quantized_kv_start) // self.blocks.block_size)
            if float_blocks > self.float_blocks.max_usable_blocks:
                raise RequestRejected(
                    f"the request needs {float_blocks} float KV blocks, more than the whole float "
                    f"KV pool ({self.float_blocks.max_usable_blocks} blocks of {self.blocks.block_size} tokens)"
                )
            if total_tokens <= self.quantized_kv_start:
                return
        if total_blocks > self.blocks.max_usable_blocks:
            raise RequestRejected(
                f"the request needs {total_blocks} KV blocks, more than the whole KV cache "
                f"({self.blocks.max_usable_blocks} blocks of {self.blocks.block_size} tokens)"
            )

    def add_request(self, request: GenerationRequest) -> None:
        seq = self._register(request)
        self.scheduler.add(seq)
        # The disk tier reads its prefix ahead while it waits (with two pools: from the pool
        # its prefix will come from).
        if self.float_blocks is None or len(seq.token_ids) > self.quantized_kv_start:
            self.blocks.prefetch(seq)
        if self.float_blocks is not None:
            self.float_blocks.prefetch(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ the step
    def step(self) -> list[tuple[str, TokenEvent]]:
        if self.scheduler.speculator is not None:
            # Draft rows are verified in the ragged pass only (a runner can lose it: tests
            # route attention away from the cache to compare the per-pool passes).
            self.scheduler.speculator.active = self.runner.ragged
        self._stepping = None
        launched = self.lookahead.take() if self.lookahead is not None else None
        if launched is not None:
            return self._step_overlapped(launched, [])
        out = self.scheduler.schedule()  # timed by the scheduler (a draft model's pass apart)
        # The requests this step runs: the ones a failed step ends (see fail_step).
        self._stepping = out.request_ids
        # Requests that can never get their blocks end here (the step is empty then, unless
        # a float sequence found the quantized pool too small for it: the rest still run).
        ended = self._out_of_memory() if self.scheduler.out_of_memory else []
        if out.empty:
            self.publish_stats()
            return ended
        if self.lookahead is not None and self.lookahead.eligible(out):
            seqs = [self.scheduler.scheduled(r.request_id, r.index) for r in out.rows]
            return self._step_overlapped(self.lookahead.launch(out, seqs), ended)
        result = self.runner.execute(out)
        with self.profile.phase("postprocess"):
            events = self.scheduler.update_from_output(out, result)
        return self._account(out, events, ended)

    def _step_overlapped(self, launched, ended: list) -> list[tuple[str, TokenEvent]]:
        """A launched step of plain decodes: the step after it is built and queued first
        (when it may be), then this one's tokens are read back and applied (lookahead)."""
        lookahead = self.lookahead
        self._stepping = launched.out.request_ids  # the step ahead's rows are some of these
        following = None if lookahead.hold else lookahead.launch_ahead(launched)
        events = lookahead.complete(launched)
        self.scheduler.forget_scheduled()
        # A sequence that would draft now cannot while pipelined: the step after the one
        # queued is scheduled normally.
        lookahead.hold = following is not None and lookahead.would_draft(following.seqs)
        lookahead.inflight = following
        return self._account(launched.out, events, ended)

    def _account(self, out: SchedulerOutput, events, ended: list) -> list[tuple[str, TokenEvent]]:
        """Count a step that ran and collect its events (and the requests that ended)."""
        self.counters.prefill_tokens += out.num_prefill_tokens
        self.counters.steps += 1
        self.profile.steps += 1
        for seq, event in events:
            if event.token_id is not None:
                self.counters.generated_tokens += 1
            if event.finish_reason is not None and request_finished(seq):
                self.sequences.pop(seq.request_id, None)
            ended.append((seq.request_id, event))
        self.publish_stats()
        return ended

    def publish_stats(self) -> None:
        """The snapshot readers on other threads see (engine thread)."""
        self.stats = EngineStats.of(self)

    def _out_of_memory(self) -> list[tuple[str, TokenEvent]]:
        """End the requests the scheduler found can never get their KV blocks."""
        pool = self.blocks
        message = (
            f"out of KV cache memory: the request needs more than the {pool.usable_blocks} blocks "
            f"of {pool.block_size} tokens the pool holds, and the memory budget lets it grow no "
            "further (other models hold the rest); retry later or lower max_tokens"
        )
        out = self._fail([seq.request_id for seq in self.scheduler.out_of_memory], message, "kv_cache_exhausted")
        self.scheduler.out_of_memory.clear()
        log.warning("%d request(s) ended: %s", len(out), message)
        return out

    def close(self) -> None:
        """Flush the disk tiers' pending writes (graceful shutdown)."""
        for pool in self.pools:
            pool.close()
        self.layers.close()

    def _end(self, members: list[Sequence], reason: FinishReason) -> None:
        for member in members:
            self.scheduler.finish(member, reason)

