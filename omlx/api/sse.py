"""Server-sent events over aiohttp."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web

from omlx.serving_limits import limits_of

try:
    from asyncio import timeout as _timeout
except ImportError:  # Python 3.10: aiohttp depends on async_timeout there
    from async_timeout import timeout as _timeout

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}


class _TimedStream(web.StreamResponse):
    """A stream whose writes give up after `write_timeout` seconds: a client that stops
    reading (its socket buffer full) is dropped like one that disconnected, so its request
    is aborted and its engine slot freed instead of being held for as long as it stalls."""

    def __init__(self, write_timeout: float, **kwargs):
        super().__init__(**kwargs)
        self._write_timeout = write_timeout

    async def write(self, data) -> None:
        try:
            async with _timeout(self._write_timeout):
                await super().write(data)
        except asyncio.TimeoutError:
            raise ConnectionResetError(f"the client read nothing for {self._write_timeout:g}s") from None


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = _TimedStream(limits_of(request.app).client_write_timeout_s, status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    return response


def keepalive_interval(request: web.Request) -> float:
    return limits_of(request.app).sse_keepalive_s


def data_event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def named_event(event: str, payload: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"

# A bare comment for streams whose readers are browsers (the admin log stream): EventSource
# skips it, and it keeps proxies from closing a quiet connection.  The API families' streams
# send events their clients count instead (see sse_pump).
KEEPALIVE = b": keepalive\n\n"

# The request's running GenerationStream, set by Serving.start.
GENERATION_KEY: web.RequestKey = web.RequestKey("omlx.generation", object)


def progress_comment(request: web.Request) -> bytes:
    """`: keepalive N/M`, the prompt tokens prefilled so far out of all, as mlx_lm.server
    reports prompt progress.  A comment: every SSE client skips it, so it goes next to (not
    instead of) each family's keepalive event, which clients' idle timers do count."""
    stream = request.get(GENERATION_KEY)
    if stream is None:
        return b""
    done, total = stream.prompt_progress()
    return b": keepalive %d/%d\n\n" % (done, total)


async def with_keepalive(events, interval: float, ping=None):
    """Items of the async iterator `events`; `ping` (default None) whenever `interval` seconds
    pass without one, so a long prefill does not look like a dead connection to the client.

    Closing this generator (a disconnect) cancels the pending item and closes `events`.
    """
    iterator = events.__aiter__()
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ping
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
