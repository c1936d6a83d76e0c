"""The one loop that streams a turn to a client as server-sent events, for every family.

    opening ─► for each ChoiceStep of the turn: the family's events
               (nothing for the keepalive interval: a prefill-progress comment + the family's
               keepalive event) ─► closing (finish, usage, terminator)
    an engine failure ─► the family's error event(s), and the stream ends there

The pump owns everything that is not wire format: the stream's headers, the client write
timeout (sse.open_stream: a client that stops reading is dropped), keepalives, progress,
turning an EngineFailure into an event instead of a broken reply, and handing the turn's
usage to the closing.  Each family's module only says how its events look (`EventFormat`).
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Protocol

from aiohttp import web

from . import sse
from .assistant_turn import ChoiceStep
from .generation import EngineFailure, Usage

log = logging.getLogger(__name__)


class TurnSource(Protocol):
    """What the pump reads: AssistantTurn, TextTurn or the MCP ServerToolLoop."""

    usage: Usage

    def steps(self): ...


class EventFormat(Protocol):
    """One family's SSE wire format.  Each method returns the bytes to send (b"" for none)."""

    def opening(self) -> bytes: ...

    def keepalive(self) -> bytes:
        """An event clients count as activity (agents' idle timers ignore SSE comments)."""

    def step(self, step: ChoiceStep) -> bytes: ...

    async def closing(self, usage: Usage) -> bytes:
        """The end of a turn that ran to completion; async: a family may store the result."""

    def failure(self, exc: EngineFailure) -> bytes: ...


async def pump(request: web.Request, source: TurnSource, fmt: EventFormat) -> web.StreamResponse:
    response = await sse.open_stream(request)
    try:
        await _stream(request, response, source, fmt)
    except ConnectionError as exc:
        # The client went away (or stopped reading past the write timeout): closing the
        # turn's steps above aborted its request.  An everyday event for a server of many
        # agents, so one line, not aiohttp's "Error handling request" traceback; the
        # transport is closed so a stalled reader's half-written stream ends here too.
        log.info("stream to %s ended early: %s", request.remote, exc or type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
    return response


async def _stream(request: web.Request, response: web.StreamResponse, source: TurnSource,
                  fmt: EventFormat) -> None:
    await _send(response, fmt.opening())
    try:
        steps = sse.with_keepalive(source.steps(), sse.keepalive_interval(request))
        async with aclosing(steps) as items:
            async for step in items:
                if step is None:  # nothing for a while: a long prefill, a wait, a slow tool
                    await _send(response, sse.progress_comment(request) + fmt.keepalive())
                else:
                    await _send(response, fmt.step(step))
    except EngineFailure as exc:
        await _send(response, fmt.failure(exc))
        return
    await _send(response, await fmt.closing(source.usage))


async def _send(response: web.StreamResponse, data: bytes) -> None:
    if data:
        await response.write(data)
