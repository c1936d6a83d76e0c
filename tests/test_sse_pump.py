"""The SSE pump when the client goes away mid-stream: the turn's steps are closed (which aborts
its request), the handler returns normally, and aiohttp logs no "Error handling request"
traceback (a server of many agents sees disconnects all day)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from omlx.api.assistant_turn import ChoiceStep
from omlx.api.generation import Usage
from omlx.api.sse_pump import pump


class EndlessTurn:
    """Steps as fast as the pump takes them, until closed."""

    def __init__(self):
        self.usage = Usage()
        self.closed = asyncio.Event()
        self.sent = 0

    async def steps(self):
        try:
            while True:
                self.sent += 1
                yield ChoiceStep(index=0)
                await asyncio.sleep(0)
        finally:
            self.closed.set()


class Format:
    def opening(self) -> bytes:
        return b": open\n\n"

    def keepalive(self) -> bytes:
        return b": ping\n\n"

    def step(self, step: ChoiceStep) -> bytes:
        return b"data: " + b"x" * 4096 + b"\n\n"

    async def closing(self, usage: Usage) -> bytes:
        return b"data: [DONE]\n\n"

    def failure(self, exc) -> bytes:
        return b"data: failed\n\n"


async def test_a_client_that_goes_away_ends_the_turn_quietly(caplog):
    turn = EndlessTurn()
    returned = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await pump(request, turn, Format())
        returned.set()
        return response

    app = web.Application()
    app.router.add_post("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    caplog.set_level(logging.DEBUG)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"http://127.0.0.1:{port}/stream")
            async for line in response.content:
                if line.startswith(b"data: "):
                    break
            response.close()  # drop the connection while the server is still writing
        await asyncio.wait_for(turn.closed.wait(), 10)
        await asyncio.wait_for(returned.wait(), 10)
    finally:
        await runner.cleanup()
    assert turn.sent >= 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not any("Error handling request" in r.getMessage() for r in caplog.records)
