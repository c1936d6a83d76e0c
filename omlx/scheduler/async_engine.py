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
class Stop:
    pass


Message = AddRequest | AbortRequest | ShrinkPool | Stop


class AsyncEngine:
    """Runs an LLMEngine on its own thread; many asyncio clients submit and stream from it."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
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
            if not finished:
                self._send(AbortRequest(request.request_id))

    def abort(self, request_id: str) -> None:
        self._send(AbortRequest(request_id))

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
                message = self._inbox.get_nowait()
            except queue.Empty:
                return events
            match message:
                case AddRequest(request):
                    try:
                        self.engine.add_request(request)
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
                case Stop():
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
