"""Stopping `omlx serve` cleanly on SIGTERM or SIGINT.

The order:
1. aiohttp stops listening and closes idle connections (its own signal handling);
2. the `on_shutdown` hook here starts the grace period: streams in flight keep going;
3. when it runs out (or at a second signal) every engine ends its requests with an error
   event, which each API family renders as its own final event (OpenAI's error chunk,
   Anthropic's `overloaded_error`, the Responses `error` event), and the handlers return;
4. aiohttp waits for the handlers (the grace period plus a margin for those final events);
5. `on_cleanup` unloads every model: engine threads joined, disk-tier writes flushed;
6. run_app closes the loop and joins the executor threads (response-store writes are done);
7. `exit_process` ends the process.

Why the process leaves through `os._exit` at the very end: MLX keeps a per-thread compile
cache whose destructor, run when an OS thread that called an `mx.compile`d function ends
(every engine thread: mlx-lm's activations are compiled), re-enters Python to drop its
references.  `Thread.join` returns before the OS thread has run those destructors, so such a
thread can still be ending while the interpreter finalizes; taking the GIL then makes it call
`pthread_exit` inside a noexcept C++ destructor, and the process aborts with "terminate
called without an active exception" (exit status 134, a crash to any supervisor).  Once
everything above is flushed and joined, interpreter finalization has nothing left to do for
the server, so it is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from omlx.models.loaded import LoadedModel
from omlx.models.pool import ModelPool

log = logging.getLogger("omlx.server")

# After the grace period, how long handlers get to write their final event and return.
FINAL_EVENT_MARGIN_S = 5.0


class GracefulStop:
    def __init__(self, pool: ModelPool, grace_s: float):
        self.pool = pool
        self.grace_s = grace_s
        self.ended = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def handler_timeout_s(self) -> float:
        """How long aiohttp waits for handlers in flight before cancelling them."""
        return self.grace_s + FINAL_EVENT_MARGIN_S

    def install(self, app: web.Application) -> None:
        app.on_shutdown.append(self._begin)

    async def _begin(self, _app) -> None:
        loop = asyncio.get_running_loop()
        busy = self._requests_in_flight()
        log.info("stopping: no new connections; %d request(s) in flight get %gs to finish "
                 "(a second signal ends them now)", busy, self.grace_s)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.end_requests, "a second signal")
            except (NotImplementedError, RuntimeError):  # no signals here (Windows, a thread)
                pass
        self._timer = loop.call_later(self.grace_s, self.end_requests, "the grace period is over")

    def end_requests(self, why: str) -> None:
        """End every request still in flight with an error event its client understands."""
        if self.ended:
            return
        self.ended = True
        if self._timer is not None:
            self._timer.cancel()
        busy = self._requests_in_flight()
        if busy:
            log.warning("stopping: %s; ending %d request(s) still in flight", why, busy)
        for model in self._engines():
            model.fail_all()

    def _engines(self) -> list[LoadedModel]:
        return [m for m in self.pool.loaded.values() if m.generates]

    def _requests_in_flight(self) -> int:
        return sum(m.requests_in_flight for m in self._engines())


def exit_process(code: int = 0) -> None:
    """End the process now, everything having been flushed and joined (see the module doc)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
