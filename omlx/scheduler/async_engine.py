"""The asyncio bridge: an `LLMEngine` stepping on its own thread, many clients streaming from it.

MLX work never runs on the event loop.  Clients post typed messages to the engine thread's
inbox; the thread applies them between steps, runs a step while there is work, and hands each
request's `TokenEvent`s back to the loop that asked (`call_soon_threadsafe`, one call per loop
per step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from .engine import LLMEngine
from .request import FinishReason, GenerationRequest, TokenEvent

log = logging.getLogger("omlx.engine")


# ---------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class AddRequest:
    request: GenerationRequest


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class ShrinkPool:
    """Give back what the KV pool grew, if idle; `done` gets the bytes freed."""

    done: concurrent.futures.Future


@dataclass(frozen=True)
class FailAll:
    """End every request in flight with an error (`code` says why: e.g. a shutdown)."""

    message: str
    code: str


@dataclass(frozen=True)
class Stop:
    pass


Message = AddRequest | AbortRequest | ShrinkPool | FailAll | Stop

SHUTDOWN_MESSAGE = "the server is shutting down; the request was ended before it finished"
QUEUE_TIMEOUT_MESSAGE = "the request waited in the queue longer than the server's queue timeout; retry later"


class AsyncEngine:
    """Runs an LLMEngine on its own thread; many asyncio clients submit and stream from it."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams and _queued between the loop and the thread
        # Requests not yet scheduled (reserved by the API layer or waiting in the scheduler's
        # queue), with the monotonic time past which they may wait no longer (None: no limit).
        self._queued: dict[str, float | None] = {}
        self._in_scheduler_queue: set[str] = set()  # engine thread only: added, not yet scheduled
        self._thread = threading.Thread(target=self._loop, name="omlx-engine", daemon=True)
        self._stopped = False
        self.busy_since: float | None = None
        self._thread.start()

    # ------------------------------------------------------------------ client side
    @property
    def requests_in_flight(self) -> int:
        """Requests some client is streaming from."""
        return len(self._streams)

    @property
    def queued_requests(self) -> int:
        """Requests submitted (or reserved) that the scheduler has not started yet."""
        return len(self._queued)

    def reserve(self, request_id: str, queue_deadline: float | None = None) -> None:
        """Count a request as queued before it is submitted, so that an admission check and
        the submission cannot be overtaken by other requests in between; past
        `queue_deadline` (time.monotonic()) a request still queued ends with the error code
        "queue_timeout".  `release` (or the end of `generate`) gives the place back."""
        with self._lock:
            self._queued[request_id] = queue_deadline

    def release(self, request_id: str) -> None:
        with self._lock:
            self._queued.pop(request_id, None)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield the request's TokenEvents; leaving early (a disconnect) aborts it at once.

        The request was checked where it was built (omlx.api.generation.build_request, the
        rerankers: LoadedModel.check), so it is not checked again here; whatever the engine's
        add_request still refuses comes back as an error event (see _drain_inbox)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request.request_id] = (loop, events)
            self._queued.setdefault(request.request_id, None)
        self._send(AddRequest(request))
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
                self._queued.pop(request.request_id, None)
            if not finished:
                self._send(AbortRequest(request.request_id))

    def abort(self, request_id: str) -> None:
        self._send(AbortRequest(request_id))

    def fail_all(self, message: str = SHUTDOWN_MESSAGE, code: str = "server_shutting_down") -> None:
        """End every request in flight with an error event (the API layer turns `code` into
        its family's error); used when a stop's grace period runs out."""
        self._send(FailAll(message, code))

    def shutdown(self) -> None:
        self._send(Stop())
        self._thread.join(timeout=10)
        self.engine.close()  # pending disk-tier writes land before the process goes

    def shrink_pool(self) -> "concurrent.futures.Future[int]":
        """Ask the engine thread to shrink an idle pool (see LLMEngine.shrink_pool); the
        future holds the bytes freed (0 if requests were in flight)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped or not self._thread.is_alive():
            done.set_result(0)
        else:
            self._send(ShrinkPool(done))
        return done

    def _send(self, message: Message) -> None:
        self._inbox.put(message)
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            events = self._drain_inbox()
            if self._stopped:
                # Anyone still streaming hears why, instead of waiting for a token forever.
                self._deliver(events + self._fail_all(SHUTDOWN_MESSAGE, "server_shutting_down"))
                return
            if not engine.has_work:
                self.busy_since = None
                engine.publish_stats()  # what the requests applied between steps changed
                self._deliver(events)
                self._wake.wait()
                continue
            if self.busy_since is None:
                self.busy_since = time.monotonic()
            try:
                events += engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, stay alive
                events += self._step_failed(exc)
            events += self._follow_queue()
            self._deliver(events)

    def _drain_inbox(self) -> list[tuple[str, TokenEvent]]:
        events = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return events
            match message:
                case AddRequest(request):
                    try:
                        self.engine.add_request(request)
                        self._in_scheduler_queue.add(request.request_id)
                    except Exception as exc:
                        events.append((request.request_id, TokenEvent(None, FinishReason.ERROR, error=str(exc))))
                case AbortRequest(request_id):
                    event = self.engine.abort(request_id)
                    if event is not None:
                        events.append((request_id, event))
                case ShrinkPool(done):
                    try:
                        done.set_result(self.engine.shrink_pool())
                    except Exception as exc:
                        log.exception("shrinking the KV pool failed")
                        done.set_exception(exc)
                case FailAll(message, code):
                    events += self._fail_all(message, code)
                case Stop():
                    self._stopped = True

    def _step_failed(self, exc: Exception) -> list[tuple[str, TokenEvent]]:
        if not _is_out_of_memory(exc):
            log.exception("engine step failed")
            return self.engine.fail_all(f"internal engine error: {exc}")
        # An allocation MLX could not make: the requests of this step end with a capacity
        # error (retry later, or ask for less), the allocator's cache goes back, and the
        # engine serves on; requests still queued keep their place.
        events = self.engine.fail_step(f"out of memory while running this request: {exc}")
        log.error("out of memory during an engine step (%s); ended the %d request(s) of that step", exc, len(events))
        for request_id, event in events:
            event.error_code = "out_of_memory"
            self._in_scheduler_queue.discard(request_id)
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:  # an allocator without a cache to clear
            pass
        return events

    def _fail_all(self, message: str, code: str) -> list[tuple[str, TokenEvent]]:
        events = self.engine.fail_all(message)
        for _, event in events:
            event.error_code = code
        self._in_scheduler_queue.clear()
        return events

    def _follow_queue(self) -> list[tuple[str, TokenEvent]]:
        """After a step: requests that left the scheduler's queue are no longer queued; those
        still in it past their queue deadline end with a "queue_timeout" error."""
        if not self._in_scheduler_queue:
            return []
        waiting = {seq.request_id for seq in self.engine.scheduler.waiting}
        now = time.monotonic()
        expired = []
        with self._lock:
            for request_id in list(self._in_scheduler_queue):
                if request_id not in waiting:
                    self._in_scheduler_queue.discard(request_id)
                    self._queued.pop(request_id, None)
                    continue
                deadline = self._queued.get(request_id)
                if deadline is not None and now > deadline:
                    expired.append(request_id)
        events = []
        for request_id in expired:
            self._in_scheduler_queue.discard(request_id)
            if self.engine.abort(request_id) is not None:
                events.append((request_id, TokenEvent(None, FinishReason.ERROR, error=QUEUE_TIMEOUT_MESSAGE,
                                                       error_code="queue_timeout")))
        return events

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


def _is_out_of_memory(exc: Exception) -> bool:
    """MLX reports a failed allocation as a RuntimeError naming malloc or memory."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("malloc" in text or "out of memory" in text
                                              or "unable to allocate" in text)


def _put_all(items) -> None:
    for events, event in items:
        events.put_nowait(event)
