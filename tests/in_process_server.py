"""The omlx app served in the test's own process (aiohttp's TestServer), for tests that need
its objects at hand rather than a separate `omlx serve` (tests/omlx_process.py)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from aiohttp.test_utils import TestServer

from omlx.server import ServerConfig, create_app


@asynccontextmanager
async def running_app(config: ServerConfig):
    """The app for `config`, listening on a free local port until the block ends."""
    server = TestServer(create_app(config))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()
