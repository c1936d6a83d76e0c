"""Memory this process has freed that its allocators still hold: capped, reported, given back.

Two allocators stand between omlx's arrays and the system.  MLX keeps freed buffers in a
cache of its own for reuse; `mx.set_cache_limit` bounds it (MLX's default is 32 MiB on the
Linux CPU backend and the device's memory limit on a GPU), and `configure_mlx_cache` sets that
bound once from the model memory budget.  Beneath MLX on Linux, glibc's malloc keeps what MLX
frees in its arenas: a chunk below the mmap threshold (which glibc raises by itself, up to
32 MiB, each time a larger mmapped chunk is freed) goes back to a free list, not to the
system.  So `mx.clear_cache()` alone returns nothing to the system: a KV pool of 10 MiB layer
arrays replaced by one twice its size left the old 256 MiB resident for the rest of the
process (bench/soak.py, the 85M llama: that was most of its RSS growth).  `release_freed`
clears MLX's cache and then asks glibc to return its free pages (`malloc_trim(0)`), after
the events that free a lot at once: a model loaded (its float32 weights packed to bf16) or
unloaded, a KV pool resized.  `HeapTrimmer` gives back what serving scatters over the arenas:
when the server goes quiet, and under load when the RSS keeps growing.  Elsewhere (macOS,
musl) the trim is a no-op and MLX's cache is cleared as before.  Where omlx.process_tuning
preloaded tcmalloc (or jemalloc) in glibc's place, the same calls release that allocator's free
pages and read its counters instead (omlx.malloc_control), and /health names the allocator.
`/health` reports both caches (`process.allocator_caches`): bytes held, the bound, and what
trims gave back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import time
from typing import Callable

from omlx import malloc_control, process_tuning

log = logging.getLogger("omlx.memory")

# MLX's buffer cache may hold at most this fraction of the model memory budget (and never
# more than MLX's own default): freed activation buffers worth keeping for the next step,
# not a second KV pool.
MLX_CACHE_BUDGET_FRACTION = 1 / 64
MLX_CACHE_FLOOR_BYTES = 32 << 20
# Under load, trim malloc's arenas when the RSS has grown this much since the last trim
# (HeapTrimmer), checking this often: more than the freed chunks a busy engine reuses step
# after step (about 45 MiB at 16 clients on an 85M model), so a steady load does not churn.
TRIM_STEP_BYTES = 64 << 20
TRIM_INTERVAL_S = 2.0
# ...and once each time no request has held a model for this long.
TRIM_QUIET_S = 4.0


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):  # musl and other C libraries
        return None
    return libc


_LIBC = _load_libc()  # glibc itself (tests tune it with mallopt); trims go through _MALLOC
# What serves malloc here (glibc's, or tcmalloc preloaded by omlx.process_tuning): trims and
# heap figures go through it, so what /health says is true of the allocator that runs.
_MALLOC = malloc_control.current()
_ALLOCATOR = process_tuning.allocator_info()
_lock = threading.Lock()
_released = {"count": 0, "bytes": 0, "seconds": 0.0}  # trims done, the resident bytes they gave back, their time
_mlx_cache_limit: int | None = None


def configure_mlx_cache(memory_budget: int | None) -> int | None:
    """Bound MLX's buffer cache by the model memory budget (at most MLX's own default);
    returns the limit set, or None where MLX is not importable."""
    global _mlx_cache_limit
    try:
        import mlx.core as mx
    except ImportError:
        return None
    default = mx.set_cache_limit(0)  # answers the limit it replaces; set again just below
    limit = default
    if memory_budget:
        limit = min(default, max(MLX_CACHE_FLOOR_BYTES, int(memory_budget * MLX_CACHE_BUDGET_FRACTION)))
    mx.set_cache_limit(limit)
    _mlx_cache_limit = limit
    log.info("MLX buffer cache limit %.0f MiB (MLX's default %.0f MiB)", limit / 2**20, default / 2**20)
    return limit


def release_freed() -> int:
    """Give MLX's cached buffers and malloc's free pages back to the system; returns the
    resident bytes that went (0 where unknown).  Costs a few ms per hundred MiB of free
    chunks: call it after something big was freed, not on every step."""
    mx = sys.modules.get("mlx.core")  # a process that never loaded MLX has no cache to clear
    if mx is not None:
        try:
            mx.clear_cache()
        except Exception:  # an allocator without a cache to clear
            pass
    return trim_heap()


def resident_bytes() -> int | None:
    """This process's resident set now (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_heap() -> int:
    """Every arena's free pages back to the system (glibc's malloc_trim(0), jemalloc's purge;
    MLX's cache untouched); returns the resident bytes that went."""
    if _MALLOC is None or not _MALLOC.releases:
        return 0
    with _lock:  # one trim at a time: a second one meanwhile would find nothing to do
        before, started = resident_bytes() or 0, time.perf_counter()
        _MALLOC.release()
        _released["seconds"] += time.perf_counter() - started
        released = max(0, before - (resident_bytes() or 0))
        _released["count"] += 1
        _released["bytes"] += released
    if released >= 16 << 20:
        log.info("gave %.0f MiB of freed memory back to the system", released / 2**20)
    return released


def allocator_stats() -> dict:
    """The allocators' caches for /health: what each holds, its bound, what was given back."""
    out: dict = {}
    mx = sys.modules.get("mlx.core")  # only once something has imported it
    if mx is not None:
        out["mlx"] = {"active_bytes": mx.get_active_memory(), "cache_bytes": mx.get_cache_memory(),
                      "cache_limit_bytes": _mlx_cache_limit, "peak_bytes": mx.get_peak_memory()}
    heap = _MALLOC.stats() if _MALLOC is not None else None
    if heap is not None:
        out["malloc"] = {**heap, "trims": _released["count"], "trimmed_bytes": _released["bytes"],
                         "trim_seconds": round(_released["seconds"], 4)}
    out["allocator"] = _ALLOCATOR  # which malloc the figures above are of
    return out


class HeapTrimmer:
    """Trims malloc's arenas when the server has gone quiet, and under load whenever the RSS
    has grown by `step_bytes` since the last trim.

    Under load the arenas fill with freed chunks that are too scattered for malloc to give
    back by itself (activations of every batch size, request bodies, token lists): the soak
    saw 50 MiB more of them after two minutes at 16 clients.  While requests run, much of
    that is reused step after step, so trimming it would only fault it back in; the growth
    rule keeps it within `step_bytes` of where it was.  Once no request holds a model for
    `quiet_s`, one trim gives the rest back (each quiet spell once).  Reading the RSS is
    cheap and a trim costs milliseconds.  `quiet_since()` answers when the last request
    ended (on any clock), or None while one runs; `rss` and `trim` are injectable for tests."""

    def __init__(self, quiet_since: Callable[[], float | None] | None = None, *,
                 step_bytes: int = TRIM_STEP_BYTES, interval_s: float = TRIM_INTERVAL_S,
                 quiet_s: float = TRIM_QUIET_S, clock: Callable[[], float] | None = None,
                 rss: Callable[[], int | None] | None = None, trim: Callable[[], int] = trim_heap):
        self.quiet_since = quiet_since
        self.step_bytes = step_bytes
        self.interval_s = interval_s
        self.quiet_s = quiet_s
        self._clock = clock or time.monotonic
        self._rss = rss or resident_bytes
        self._trim = trim
        self.mark: int | None = None  # the RSS after the last trim (or the lowest seen since)
        self._trimmed_quiet: float | None = None  # the quiet spell already trimmed for

    def check(self) -> int:
        """Trim if the server has been quiet long enough or the RSS grew past the mark;
        returns the bytes given back (blocking)."""
        rss = self._rss()
        if rss is None:
            return 0
        if self.mark is None or rss < self.mark:
            self.mark = rss  # a model unloaded, a pool shrunk: growth counts from here
        quiet = self.quiet_since() if self.quiet_since is not None else None
        settled = quiet is not None and quiet != self._trimmed_quiet and self._clock() - quiet >= self.quiet_s
        if not settled and rss - self.mark < self.step_bytes:
            return 0
        if settled:
            self._trimmed_quiet = quiet
        released = self._trim()
        self.mark = self._rss() or rss - released
        return released

    async def run(self) -> None:
        """Check every `interval_s`, off the event loop, until cancelled."""
        if _MALLOC is None or not _MALLOC.releases:
            return  # nothing to trim with under this allocator
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # never let the watch die of one failed read
                log.exception("heap trim check failed")
