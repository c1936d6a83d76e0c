"""One model's engine: the synchronous step loop, and the asyncio bridge in front of it.

`LLMEngine.step()` runs one scheduler iteration (a batched prefill pass for this step's
prompt chunks and a batched decode pass for every running sequence) and returns each
request's new token.  `AsyncEngine` runs those steps on a dedicated thread, so MLX never
blocks the event loop, and hands tokens back to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import mlx.core as mx
import numpy as np

from .block_manager import BlockManager
from .disk_cache import DiskKVCache
from .kv_cache import KVLayout, PagedKVStorage
from .request import FinishReason, GenerationRequest, TokenEvent
from .runner import ModelRunner
from .parallel_sampling import fork_siblings, request_finished, request_sequences
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .step_profile import StepProfile

log = logging.getLogger("omlx.engine")


# A growable pool starts this big (or at its cap, if smaller) and doubles on demand.
INITIAL_KV_BYTES = 256 << 20


@dataclass
class EngineConfig:
    block_size: int = 32
    # The most memory this model's KV pool may grow to.  None: what is left of the memory
    # budget after the weights, with a margin (`default_kv_cache_bytes`).  The pool starts
    # at `initial_kv_bytes` and grows as requests need blocks, each time only if the memory
    # budget (`LLMEngine(kv_budget=...)`) has room.
    kv_cache_bytes: int | None = None
    initial_kv_bytes: int = INITIAL_KV_BYTES
    num_blocks: int | None = None  # a fixed pool of exactly this many blocks (tests)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's own context window
    kv_bits: int | None = None  # 4 or 8: store KV blocks quantized (mx.quantize layout)
    kv_group_size: int = 64
    # With kv_bits: keep a sequence's KV in the model's dtype until this many of its tokens
    # are computed, then quantize it (mlx-lm's --quantized-kv-start).  0: quantized from the
    # first token.  Above 0 the engine keeps a second, float pool for those sequences.
    quantized_kv_start: int = 0
    num_float_blocks: int | None = None  # a fixed float pool of this many blocks (tests)
    # The prefix cache's disk tier: full blocks are also written under this directory
    # (one subdirectory per model identity) and loaded back by later requests, also after a
    # restart.  None turns it off.
    kv_cache_dir: str | None = None
    kv_disk_bytes: int = 10 << 30  # size cap of one model's disk tier; LRU files go first
    prefix_cache: bool = True  # False: every prompt is computed from scratch (measurements)


class RequestRejected(ValueError):
    """A request that can never run (too long for the context or the KV pool)."""


class LLMEngine:
    def __init__(
        self, model, config: EngineConfig, context_window: int, scope: bytes = b"",
        kv_budget: Callable[[int], bool] | None = None, label: str | None = None,
    ):
        """`kv_budget(n)` is asked before the KV pool grows by `n` bytes and answers whether
        the memory budget has room (and takes it); None: growth is bounded by the cap only.
        `label` names the model in the KV disk tier (default: from `scope`); when it opens,
        directories kept for the same label under another identity are removed."""
        self.model = model
        self.config = config
        self.kv_budget = kv_budget
        layout = KVLayout.probe(model)
        block_size = config.block_size
        kv_bits, group_size = quantization_for(layout, config.kv_bits, config.kv_group_size)
        self.quantized_kv_start = config.quantized_kv_start if kv_bits is not None else 0
        if config.quantized_kv_start and kv_bits is None:
            log.info("quantized_kv_start=%d has no effect: the KV cache is not quantized", config.quantized_kv_start)
        if self.quantized_kv_start < 0:
            raise ValueError(f"quantized_kv_start must be >= 0, got {self.quantized_kv_start}")
        two_pools = self.quantized_kv_start > 0
        initial_bytes = config.initial_kv_bytes
        if config.num_blocks:
            num_blocks = max_blocks = config.num_blocks
        else:
            cap = config.kv_cache_bytes or default_kv_cache_bytes(parameter_bytes(model))
            if two_pools:
                # The float pool only ever holds sequences' first `quantized_kv_start` tokens:
                # at most that for every sequence slot (plus cached prefixes), and never more
                # than half the cap; the quantized pool may grow to the rest.  The two start
                # at half the usual initial size each.
                float_bpb = PagedKVStorage.bytes_per_token(layout) * block_size
                slots = config.max_num_seqs * -(-self.quantized_kv_start // block_size) + 1
                float_cap = min(cap // 2, slots * float_bpb)
                cap -= float_cap
                initial_bytes //= 2
            max_blocks = PagedKVStorage.blocks_for_budget(layout, block_size, cap, kv_bits, group_size)
            num_blocks = min(max_blocks, PagedKVStorage.blocks_for_budget(
                layout, block_size, initial_bytes, kv_bits, group_size
            ))
        self.storage = PagedKVStorage(layout, num_blocks, block_size, kv_bits, group_size)
        # With two pools the main (quantized) pool's prefix hashes are scoped by the threshold:
        # its blocks past it were computed reading quantized KV, so they differ from blocks of
        # the same tokens in an engine that quantizes from another point.
        main_scope = (scope or b"omlx") + (b"|quantized_kv_start=%d" % self.quantized_kv_start if two_pools else b"")
        self.blocks = BlockManager(
            num_blocks, block_size, scope=main_scope, prefix_cache=config.prefix_cache, max_blocks=max_blocks
        )
        if max_blocks > num_blocks:
            self.blocks.grower = self._grow_pool
        self.initial_blocks = num_blocks
        self.float_storage: PagedKVStorage | None = None
        self.float_blocks: BlockManager | None = None
        self.initial_float_blocks = 0
        if two_pools:
            if config.num_blocks:
                float_blocks = max_float_blocks = config.num_float_blocks or config.num_blocks
            else:
                max_float_blocks = PagedKVStorage.blocks_for_budget(layout, block_size, float_cap)
                float_blocks = min(max_float_blocks, PagedKVStorage.blocks_for_budget(layout, block_size, initial_bytes))
            self.float_storage = PagedKVStorage(layout, float_blocks, block_size)
            self.initial_float_blocks = float_blocks
            self.float_blocks = BlockManager(
                float_blocks, block_size, scope=scope or b"omlx", prefix_cache=config.prefix_cache,
                max_blocks=max_float_blocks,
            )
            if max_float_blocks > float_blocks:
                self.float_blocks.grower = self._grow_float_pool
        self.pool_growths = 0
        self.disk = self._open_disk(model, scope, label, self.storage, self.blocks, suffix=main_scope[len(scope or b"omlx"):])
        self.float_disk = None
        if two_pools:
            self.float_disk = self._open_disk(model, scope, label, self.float_storage, self.float_blocks, suffix=b"")
        self.max_model_len = min(config.max_model_len or context_window, context_window)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            self.blocks,
            float_blocks=self.float_blocks,
            quantized_kv_start=self.quantized_kv_start,
            copy_blocks=self._quantize_blocks if two_pools else None,
        )
        self.runner = ModelRunner(model, self.storage)
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self.profile = StepProfile()
        self.runner.profile = self.profile
        log.info(
            "KV pool: %d blocks x %d tokens (%.1f MiB%s), %d layers, %s%s",
            num_blocks, block_size, self.storage.nbytes / 2**20,
            f", may grow to {max_blocks} blocks / {self.max_kv_bytes / 2**20:.0f} MiB" if max_blocks > num_blocks else "",
            layout.num_layers, layout.dtype,
            f", quantized to {kv_bits} bits (groups of {group_size})" if kv_bits else "",
        )
        if two_pools:
            log.info(
                "KV kept in %s for each sequence's first %d tokens: float pool of %d blocks (%.1f MiB%s)",
                layout.dtype, self.quantized_kv_start, self.float_blocks.num_blocks,
                self.float_storage.nbytes / 2**20,
                f", may grow to {self.float_blocks.max_blocks} blocks" if self.float_blocks.max_blocks > self.float_blocks.num_blocks else "",
            )

    def _open_disk(self, model, scope: bytes, label: str | None, storage, blocks, suffix: bytes):
        """The disk tier of one pool (None if off or unavailable).  The quantized pool of a
        two-pool engine gets its own label, so that neither pool's directory counts as the
        other's outdated identity."""
        config = self.config
        if not config.kv_cache_dir:
            return None
        if suffix and label:
            label = f"{label} ({suffix.decode().lstrip('|')})"
        try:
            disk = DiskKVCache(
                config.kv_cache_dir, (scope or weights_fingerprint(model)) + suffix, storage, config.kv_disk_bytes,
                label=label,  # the model's name in the disk tier: its older identities are removed
            )
        except OSError as exc:
            log.warning("KV disk cache disabled: %s", exc)
            return None
        blocks.disk = disk
        log.info("KV disk cache: %s (%d blocks, cap %.1f GiB)", disk.dir, disk.num_blocks, config.kv_disk_bytes / 2**30)
        return disk

    def _quantize_blocks(self, src: list[int], dst: list[int]) -> None:
        """A float sequence reached quantized_kv_start: its float blocks, quantized, into the main pool."""
        self.storage.copy_blocks_from(self.float_storage, src, dst)

    # ------------------------------------------------------------------ KV memory
    @property
    def max_kv_bytes(self) -> int:
        total = self.blocks.max_blocks * self.storage.bytes_per_block
        if self.float_blocks is not None:
            total += self.float_blocks.max_blocks * self.float_storage.bytes_per_block
        return total

    @property
    def kv_bytes(self) -> int:
        """The KV memory held now (both pools with quantized_kv_start)."""
        if self.float_storage is None:
            return self.storage.nbytes
        return self.storage.nbytes + self.float_storage.nbytes

    def _grow_pool(self, needed: int, storage: PagedKVStorage | None = None, blocks: BlockManager | None = None) -> bool:
        """Add at least `needed` blocks to the pool: double it if the budget allows, else
        just what is needed.  Runs on the engine thread between steps."""
        storage = storage or self.storage
        blocks = blocks or self.blocks
        current = storage.num_blocks
        room = blocks.max_blocks - current
        if room <= 0:
            return False
        for extra in dict.fromkeys((min(room, max(current, needed)), min(room, needed))):
            if self.kv_budget is not None and not self.kv_budget(extra * storage.bytes_per_block):
                continue
            started = time.perf_counter()
            storage.grow(current + extra)
            blocks.add_blocks(extra)
            self.pool_growths += 1
            log.info("KV %spool grew %d -> %d blocks (%.0f MiB) in %.0f ms",
                     "float " if storage is self.float_storage else "", current, current + extra,
                     storage.nbytes / 2**20, (time.perf_counter() - started) * 1e3)
            return True
        return False

    def _grow_float_pool(self, needed: int) -> bool:
        return self._grow_pool(needed, self.float_storage, self.float_blocks)

    @property
    def pool_grown(self) -> bool:
        """Whether a pool is bigger than it started (so `shrink_pool` has something to give)."""
        if self.storage.num_blocks > self.initial_blocks:
            return True
        return self.float_storage is not None and self.float_storage.num_blocks > self.initial_float_blocks

    def shrink_pool(self) -> int:
        """Give back what the pools grew beyond their initial sizes, if no request is in
        flight (their blocks then hold only cached prefixes); returns the bytes freed.
        Engine thread."""
        if self.sequences or self.scheduler.has_work:
            return 0
        freed = 0
        pools = [(self.storage, self.blocks, self.initial_blocks)]
        if self.float_storage is not None:
            pools.append((self.float_storage, self.float_blocks, self.initial_float_blocks))
        for storage, blocks, target in pools:
            if storage.num_blocks <= target:
                continue
            before = storage.nbytes
            blocks.truncate(target)
            storage.shrink(target)
            freed += before - storage.nbytes
        if freed:
            log.info("KV pool shrank to its initial size (%.0f MiB freed)", freed / 2**20)
        return freed

    def kv_stats(self) -> dict:
        if self.float_blocks is None:
            return {
                **self.blocks.stats(),
                "bytes": self.storage.nbytes,
                "max_bytes": self.max_kv_bytes,
                "growths": self.pool_growths,
            }
        # Two pools: the top-level counts are both pools' together; `pools` has each.
        pools = {
            "float": {**self.float_blocks.stats(), "bytes": self.float_storage.nbytes,
                      "max_bytes": self.float_blocks.max_blocks * self.float_storage.bytes_per_block},
            "quantized": {**self.blocks.stats(), "bytes": self.storage.nbytes,
                          "max_bytes": self.blocks.max_blocks * self.storage.bytes_per_block},
        }
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
        n = len(request.prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {n} tokens, but this model's context window is "
                f"{self.max_model_len} tokens (and at least one must be left to generate)"
            )
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
        self.check(request)
        if request.request_id in self.sequences:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        seq = Sequence(request)
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)
        # The disk tier reads its prefix ahead while it waits (with two pools: from the pool
        # its prefix will come from).
        if self.float_blocks is None or len(seq.token_ids) > self.quantized_kv_start:
            self.blocks.prefetch(seq)
        if self.float_blocks is not None:
            self.float_blocks.prefetch(seq)

    def abort(self, request_id: str) -> TokenEvent | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None or request_finished(seq):
            return None
        for member in request_sequences(seq):  # every completion of an n > 1 request
            self.scheduler.finish(member, FinishReason.ABORT)
        return TokenEvent(token_id=None, finish_reason=FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ the step
    def step(self) -> list[tuple[str, TokenEvent]]:
        with self.profile.phase("schedule"):
            batch = self.scheduler.schedule()
        # Requests that can never get their blocks end here (the batch is empty then, unless
        # a float sequence found the quantized pool too small for it: the rest still run).
        ended = self._out_of_memory() if self.scheduler.out_of_memory else []
        if batch.empty:
            return ended
        events: list[tuple[Sequence, TokenEvent]] = []
        for rows in self._passes(batch):
            for part, float_rows in self._by_pool(rows):
                seqs = [s for s, _ in part]
                counts = [n for _, n in part]
                # A prefill chunk samples when it reaches the prompt's end; a decode always.
                want = [s.num_computed_tokens + n == s.num_tokens for s, n in part]
                events += self._run(seqs, counts, want, float_rows)
        self.stats.prefill_tokens += sum(n for _, n in batch.prefills)
        self.stats.steps += 1
        self.profile.steps += 1
        out = ended
        for seq, event in events:
            if event.token_id is not None:
                self.stats.generated_tokens += 1
            if event.finish_reason is not None and request_finished(seq):
                self.sequences.pop(seq.request_id, None)
            out.append((seq.request_id, event))
        return out

    def _passes(self, batch) -> list[list[tuple[Sequence, int]]]:
        """The forward passes of a step: one ragged pass for everything when the runner can
        (decodes and prefill chunks side by side, weights read once); else prefill chunks
        grouped by length (they are padded), then the decodes."""
        decodes = [(s, 1) for s in batch.decodes]
        if self.runner.ragged:
            return [batch.prefills + decodes]
        return prefill_groups(batch.prefills) + ([decodes] if decodes else [])

    def _by_pool(self, rows: list[tuple[Sequence, int]]):
        """With two pools: a pass's rows, float-pool rows first, and how many those are (one
        pass serves both pools when the model's attention is routed to the cache; else one
        pass per pool).  Returns [(rows, how many of them are float rows)]."""
        if self.float_blocks is None:
            return [(rows, 0)]
        floats = [r for r in rows if r[0].in_float_pool]
        if not floats:
            return [(rows, 0)]
        if len(floats) == len(rows):
            return [(rows, len(rows))]
        rest = [r for r in rows if not r[0].in_float_pool]
        if self.runner.hooked:
            return [(floats + rest, len(floats))]
        return [(floats, len(floats)), (rest, 0)]

    def _run(self, seqs: list[Sequence], counts: list[int], want: list[bool], float_rows: int = 0):
        if float_rows == len(seqs):
            logits = self.runner.forward(seqs, counts, want, self.float_storage)
        elif float_rows:
            logits = self.runner.forward(seqs, counts, want, float_storage=self.float_storage, float_rows=float_rows)
        else:
            logits = self.runner.forward(seqs, counts, want)
        sampled: dict[int, int] = {}
        siblings: list[Sequence] = []
        if logits is not None:
            rows = [i for i, w in enumerate(want) if w]
            sampling = [seqs[i] for i in rows]
            # n > 1: a request sampling its first token forks; its siblings share the row.
            logits, siblings = fork_siblings(self.scheduler, logits, sampling, [counts[i] for i in rows])
            with self.profile.phase("sample"):
                tokens = self.sampler(logits, sampling + siblings)
            sampled = dict(zip(rows, tokens))
        with self.profile.phase("postprocess"):
            events = self.scheduler.postprocess(seqs, counts, sampled)
        for sibling, token in zip(siblings, tokens[len(rows) :] if siblings else ()):
            events += self.scheduler.postprocess([sibling], [0], {0: token})
        return events

    def _out_of_memory(self) -> list[tuple[str, TokenEvent]]:
        """End the requests the scheduler found can never get their KV blocks."""
        out = []
        pool = self.blocks
        message = (
            f"out of KV cache memory: the request needs more than the {pool.usable_blocks} blocks "
            f"of {pool.block_size} tokens the pool holds, and the memory budget lets it grow no "
            "further (other models hold the rest); retry later or lower max_tokens"
        )
        for seq in self.scheduler.out_of_memory:
            if self.sequences.pop(seq.request_id, None) is None:
                continue
            for member in request_sequences(seq):
                self.scheduler.finish(member, FinishReason.ERROR)
            out.append((seq.request_id, TokenEvent(None, FinishReason.ERROR, error=message,
                                                   error_code="kv_cache_exhausted")))
        self.scheduler.out_of_memory.clear()
        log.warning("%d request(s) ended: %s", len(out), message)
        return out

    def close(self) -> None:
        """Flush the disk tier's pending writes (graceful shutdown)."""
        for disk in (self.disk, self.float_disk):
            if disk is not None:
                disk.close()

    def fail_all(self, message: str) -> list[tuple[str, TokenEvent]]:
        """After an internal error: end every request with an error, releasing its blocks."""
        out = []
        for request_id, seq in list(self.sequences.items()):
            for member in request_sequences(seq):
                self.scheduler.finish(member, FinishReason.ERROR)
            out.append((request_id, TokenEvent(None, FinishReason.ERROR, error=message)))
        self.sequences.clear()
        return out


def parameter_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def default_kv_cache_bytes(weights_bytes: int, memory_budget: int | None = None) -> int:
    """The KV cap when none is set: what the memory budget (by default 3/4 of physical
    memory) leaves after the weights, less a safety margin (a tenth of the budget, at
    least 1 GiB) for activations and the allocator's slack; never below the initial pool."""
    from omlx.settings import default_model_memory_bytes

    budget = memory_budget or default_model_memory_bytes()
    margin = max(budget // 10, 1 << 30)
    return max(INITIAL_KV_BYTES, budget - weights_bytes - margin)


def weights_fingerprint(model) -> bytes:
    """Identity of a model's weights for engines built without a scope (tests): parameter
    names, shapes, dtypes and a sample of each tensor's values."""
    from mlx.utils import tree_flatten

    digest = hashlib.blake2b(digest_size=16)
    for name, value in tree_flatten(model.parameters()):
        digest.update(f"{name}:{value.shape}:{value.dtype}".encode())
        sample = value.reshape(-1)[:64]
        if sample.dtype == mx.bfloat16:
            sample = sample.astype(mx.float32)
        digest.update(np.array(sample).tobytes())
    return b"weights:" + digest.digest()


def quantization_for(layout: KVLayout, kv_bits: int | None, group_size: int) -> tuple[int | None, int]:
    """The KV quantization a model can take: the asked group size, else a smaller one that
    divides its head dim; a model that takes none keeps a float pool, said in the log."""
    if kv_bits is None:
        return None, group_size
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    for size in (group_size, 64, 32):
        if size <= group_size and layout.key_dim % size == 0 and layout.value_dim % size == 0:
            return kv_bits, size
    log.warning(
        "KV quantization needs a head dim divisible by 32; this model's is %d, so its KV "
        "cache stays in %s", layout.key_dim, layout.dtype,
    )
    return None, group_size


def prefill_groups(prefills: list[tuple[Sequence, int]], max_padding: float = 0.25):
    """Split prefill chunks into forward passes whose rows have similar lengths.

    Rows of one pass are padded to its longest chunk; a 500-token chunk next to a 12-token
    one would nearly double the work, while one pass per chunk would re-read the weights for
    each.  Chunks are grouped, longest first, while padding stays under `max_padding`.
    """
    groups: list[list[tuple[Sequence, int]]] = []
    real = 0
    for seq, n in sorted(prefills, key=lambda p: p[1], reverse=True):
        if groups:
            group = groups[-1]
            longest = group[0][1]
            if longest * (len(group) + 1) <= (1 + max_padding) * (real + n):
                group.append((seq, n))
                real += n
                continue
        groups.append([(seq, n)])
        real = n
    return groups


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0


_ADD, _ABORT, _STOP, _SHRINK = "add", "abort", "stop", "shrink"


class AsyncEngine:
    """Runs an LLMEngine on its own thread; many asyncio clients submit and stream from it."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams between the loop and the thread
        self._thread = threading.Thread(target=self._loop, name="omlx-engine", daemon=True)
        self._stopped = False
        self.busy_since: float | None = None
        self._thread.start()

    # ------------------------------------------------------------------ client side
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield the request's TokenEvents; leaving early (a disconnect) aborts it at once."""
        self.engine.check(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request.request_id] = (loop, events)
        self._send(_ADD, request)
        finished = False
        unfinished = request.n  # an n > 1 request ends when its last completion does
        try:
            while True:
                event = await events.get()
                if event.finish_reason is not None:
                    unfinished -= 1
                finished = unfinished == 0 or event.error is not None or event.finish_reason is FinishReason.ABORT
                yield event
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self._send(_ABORT, request.request_id)

    def abort(self, request_id: str) -> None:
        self._send(_ABORT, request_id)

    def shutdown(self) -> None:
        self._send(_STOP, None)
        self._thread.join(timeout=10)
        self.engine.close()  # pending disk-tier writes land before the process goes

    def shrink_pool(self) -> "concurrent.futures.Future[int]":
        """Ask the engine thread to shrink an idle pool (see LLMEngine.shrink_pool); the
        future holds the bytes freed (0 if requests were in flight)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped or not self._thread.is_alive():
            done.set_result(0)
        else:
            self._send(_SHRINK, done)
        return done

    def _send(self, kind: str, payload) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            events = self._drain_inbox()
            if self._stopped:
                for request_id in list(engine.sequences):
                    engine.abort(request_id)
                return
            if not engine.has_work:
                self.busy_since = None
                self._deliver(events)
                self._wake.wait()
                continue
            if self.busy_since is None:
                self.busy_since = time.monotonic()
            try:
                events += engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, stay alive
                log.exception("engine step failed")
                events += engine.fail_all(f"internal engine error: {exc}")
            self._deliver(events)

    def _drain_inbox(self) -> list[tuple[str, TokenEvent]]:
        events = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return events
            if kind == _ADD:
                try:
                    self.engine.add_request(payload)
                except Exception as exc:
                    events.append(
                        (payload.request_id, TokenEvent(None, FinishReason.ERROR, error=str(exc)))
                    )
            elif kind == _ABORT:
                event = self.engine.abort(payload)
                if event is not None:
                    events.append((payload, event))
            elif kind == _SHRINK:
                try:
                    payload.set_result(self.engine.shrink_pool())
                except Exception as exc:
                    log.exception("shrinking the KV pool failed")
                    payload.set_exception(exc)
            elif kind == _STOP:
                self._stopped = True

    def _deliver(self, events: list[tuple[str, TokenEvent]]) -> None:
        if not events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, event in events:
                target = self._streams.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed; nobody is listening any more
                pass


def _put_all(items) -> None:
    for events, event in items:
        events.put_nowait(event)
