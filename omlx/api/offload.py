"""The CPU work a request brings with it, run off the event loop in a bounded pool.

Rendering a chat template, tokenizing a prompt, decoding an image, running a vision
processor and compiling a grammar all take time in proportion to what the client sent.  On
the event loop, one 20 MiB body would hold every other client for seconds; here it holds one
worker thread.  Two lanes keep small requests from queueing behind big ones: a request whose
body is small runs in a lane of its own, so a burst of hostile bodies can fill the large
lane, never the small one.  The large lane has a bound on the work it accepts: past it, a
new large job is answered 503 (529 on Anthropic's routes) with Retry-After at once instead
of piling up.

Threads are enough for that work (bench/hostile_body_bench.py measures it): HF fast
tokenizers release the GIL while they encode, and the work that holds it (Jinja over a huge
body, Pillow's decode setup) runs in slices the interpreter hands back to the event loop
every few milliseconds; the prompt-length bound (omlx.api.prompt_bound) makes sure a body
that cannot fit is never tokenized in full.  Parsing JSON is the exception: orjson holds the
GIL for the whole document (about 50 ms for 20 MiB here), so from a thread it would stall the
loop just the same.  A large body is parsed in a worker process instead: streamed into a
spool file that the worker reads (`parse_json_file`, omlx.api.body_spool), and refused there
when its prompt cannot fit its model (omlx.api.prompt_limits), so only a body that may be
served comes back as a parsed value.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from .errors import overloaded

# A job whose input (request body, text, image bytes) is below this runs in the small lane.
SMALL_JOB_BYTES = 256 << 10
# Niceness of the large lane's threads (see lower_thread_priority).
LARGE_LANE_NICENESS = 10
# Request bodies from this size on are parsed in a worker process (below it, orjson takes
# under a millisecond and the round trip would cost more than it saves).
PROCESS_JSON_BYTES = 1 << 20


class OffloadPool:
    """Two thread pools (small and large jobs) and the bound on queued large jobs."""

    def __init__(self, large_workers: int | None = None, small_workers: int = 2,
                 max_large_jobs: int | None = None, retry_after_s: float = 2.0):
        cores = os.cpu_count() or 2
        # More threads than cores only adds GIL contention for the Python parts of the work.
        self.large_workers = large_workers or max(2, min(8, cores))
        self.small_workers = small_workers
        # Running plus waiting: a few rounds of the pool's width, so a burst of big (but
        # legitimate) prompts queues briefly, and a flood of them is told to come back.
        self.max_large_jobs = max_large_jobs or 4 * self.large_workers
        self.retry_after_s = retry_after_s
        self._large = ThreadPoolExecutor(self.large_workers, thread_name_prefix="omlx-prep",
                                         initializer=lower_thread_priority)
        self._small = ThreadPoolExecutor(small_workers, thread_name_prefix="omlx-prep-small")
        self._lock = threading.Lock()
        self._large_jobs = 0  # accepted and not yet finished (a cancelled wait does not end the job)
        self._processes: ProcessPoolExecutor | None = None  # JSON workers: see start_processes

    @property
    def large_jobs(self) -> int:
        return self._large_jobs

    async def run(self, fn: Callable[..., Any], *args, size: int | None = 0, **kwargs) -> Any:
        """`fn(*args, **kwargs)` in a worker; `size` is the bytes of input it scales with
        (None: unknown, treated as large)."""
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if size is not None and size < SMALL_JOB_BYTES:
            return await loop.run_in_executor(self._small, call)
        with self._lock:
            if self._large_jobs >= self.max_large_jobs:
                raise overloaded(f"the server is already preparing {self._large_jobs} large requests; "
                                 "retry shortly", self.retry_after_s)
            self._large_jobs += 1
        try:
            future = self._large.submit(call)
        except BaseException:
            self._job_done(None)
            raise
        future.add_done_callback(self._job_done)  # counts the job until it ends, even if its waiter left
        return await asyncio.wrap_future(future)

    def _job_done(self, _future) -> None:
        with self._lock:
            self._large_jobs -= 1

    async def parse_json(self, raw: bytes, max_depth: int):
        """`(True, value)` or `(False, message for the client)` for a JSON document nested at
        most `max_depth` deep; a large one is parsed in a worker process (counted as a large
        job), a small one right here."""
        from .json_child import loads

        if len(raw) < PROCESS_JSON_BYTES:
            return loads(raw, max_depth)
        return await self._in_worker_process(loads, raw, max_depth)

    async def parse_json_file(self, path: str, max_depth: int, limits=None):
        """`parse_json` of a body spooled to `path` (omlx.api.body_spool): the worker process
        reads the file itself, so the body is not copied through the pipe, and with `limits`
        (omlx.api.json_child.PromptLimits) refuses a prompt that cannot fit its model
        there, so such a body never comes back to the server either."""
        from .json_child import loads_file

        return await self._in_worker_process(loads_file, path, max_depth, limits)

    async def _in_worker_process(self, fn, *args):
        """`fn(*args)` in a JSON worker process, counted as a large job; here, if the workers
        broke (one killed for memory?), and the next body starts new ones."""
        with self._lock:
            if self._large_jobs >= self.max_large_jobs:
                raise overloaded(f"the server is already preparing {self._large_jobs} large requests; "
                                 "retry shortly", self.retry_after_s)
            self._large_jobs += 1
            processes = self._process_pool()
        try:
            future = processes.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):
            self._job_done(None)
            with self._lock:
                if self._processes is processes:
                    self._processes = None
            return fn(*args)
        future.add_done_callback(self._job_done)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            with self._lock:
                if self._processes is processes:
                    self._processes = None
            return fn(*args)

    def _process_pool(self) -> ProcessPoolExecutor:
        """The JSON workers (call with the lock held), started if they are not."""
        from .json_child import start_worker

        if self._processes is None:
            # spawn: a fresh interpreter, never a fork of a process with MLX's threads.
            self._processes = ProcessPoolExecutor(self.small_workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=start_worker, initargs=(os.getpid(),))
        return self._processes

    def start_processes(self) -> None:
        """Start the JSON workers now, from a thread of their own, so the first large body
        does not wait for an interpreter to start (and the event loop never forks)."""
        from .json_child import loads

        def start() -> None:
            with self._lock:
                processes = self._process_pool()
            try:
                processes.submit(loads, b"0", 1)
            except (BrokenProcessPool, RuntimeError):
                pass

        threading.Thread(target=start, name="omlx-json-workers", daemon=True).start()

    def stop_processes(self) -> None:
        """End the JSON workers, waiting for them (and any body they are parsing): the
        server's processes end with it.  A later large body starts new ones."""
        with self._lock:
            processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown(wait=True)
            _stop_resource_tracker()

    def shutdown(self) -> None:
        self._large.shutdown(wait=False, cancel_futures=True)
        self._small.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker (started for the workers' queues) would outlive the
    server by a moment; end it with them (it starts again if anything needs it)."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        try:
            stop()
        except Exception:  # already gone, or another version's internals: it ends with us anyway
            pass


def lower_thread_priority() -> None:
    """A large-lane thread's initializer: below the engine and the event loop for the CPU, so
    a flood of big bodies slows their own answers rather than everyone's (Linux, where a
    thread has a niceness of its own; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICENESS)
    except OSError:
        pass


_pool: OffloadPool | None = None
_pool_lock = threading.Lock()


def offload_pool() -> OffloadPool:
    """The process's pool (one per server: it is sized from the machine, not per app)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = OffloadPool()
            _pool.start_processes()
        return _pool


async def offload(fn: Callable[..., Any], *args, size: int | None = 0, **kwargs) -> Any:
    """Run `fn` in the process's pool (see OffloadPool.run)."""
    return await offload_pool().run(fn, *args, size=size, **kwargs)


async def parse_json(raw: bytes, max_depth: int):
    """`(True, value)` or `(False, message)` (see OffloadPool.parse_json)."""
    return await offload_pool().parse_json(raw, max_depth)


async def parse_json_file(path: str, max_depth: int, limits=None):
    """`(True, value)` or `(False, message or TooLong)` of a spooled body (see
    OffloadPool.parse_json_file)."""
    return await offload_pool().parse_json_file(path, max_depth, limits)
