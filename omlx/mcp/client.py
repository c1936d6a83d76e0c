"""One MCP server's connection, kept alive in its own task.

The task connects (spawning a stdio server or opening an HTTP session through the `mcp`
SDK), initializes, lists the tools, then pings the server now and then.  The tool list is
listed again when the server says it changed (`notifications/tools/list_changed`) and every
`tools_refresh` seconds, for servers that change it without saying so.  Any failure (a
command that does not start, a server that crashes, hangs or drops the connection) is
recorded as the connection's state and error, and the task tries again after a backoff that
doubles up to a cap.  Nothing here blocks the caller: `start` only creates the task, and a
tool call waits at most its timeout.

The SDK's transports are anyio context managers that must be entered and left in the same
task, which is why each connection lives in one task for its whole life, and why shutdown is
a request to that task (`stop`) rather than a cancel from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import anyio

from .config import MCPServerConfig
from .tools import MCPTool, from_sdk

log = logging.getLogger("omlx.mcp")


@dataclass(frozen=True)
class Timing:
    """How often a connection checks on its server and how it backs off; tests shorten them."""

    ping_interval: float = 15.0
    # Connecting, listing tools and pings wait at least this long, whatever a server's
    # (per tool call) `timeout`: stdio servers started through npx / uvx may install
    # themselves first, and a busy machine starts processes slowly.
    min_session_timeout: float = 30.0
    first_backoff: float = 1.0
    max_backoff: float = 60.0
    stop_grace: float = 10.0  # how long a closing connection may take before it is cancelled
    tools_refresh: float = 300.0  # list the tools again this often, notified or not


class ServerUnavailable(Exception):
    """The MCP server is not connected (it failed, crashed, or is still starting)."""


class MCPServerConnection:
    def __init__(self, config: MCPServerConfig, timing: Timing = Timing()):
        self.config = config
        self.timing = timing
        self.state = "disabled" if not config.enabled else "idle"
        self.error: str | None = None
        self.tools: list[MCPTool] = []
        self.attempts = 0
        self._session = None
        self._task: asyncio.Task | None = None
        self._scope: anyio.CancelScope | None = None  # the current connection attempt's
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()  # a call saw the connection break: reconnect now
        self._tools_changed = asyncio.Event()  # the server said its tool list changed

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def session_timeout(self) -> float:
        return max(self.config.timeout, self.timing.min_session_timeout)

    def status(self) -> dict:
        return {"name": self.name, "state": self.state, "transport": self.config.transport,
                "tools_count": len(self.tools), "error": self.error}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.config.enabled and self._task is None:
            self.state = "connecting"
            self._task = asyncio.create_task(self._run(), name=f"mcp:{self.name}")

    async def stop(self) -> None:
        """Close the session and the server process (stdio) and end the task."""
        self._stopping.set()
        if self._scope is not None:
            # Interrupts a connection attempt or the watch at once; the SDK's transports then
            # close in shielded scopes (a stdio server is asked to exit, then terminated).
            self._scope.cancel()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.timing.stop_grace)
            except (asyncio.TimeoutError, Exception):
                task.cancel()  # the last resort: a transport that would not close in time
                with contextlib.suppress(BaseException):
                    await task
        if self.config.enabled:
            self.state = "closed"
        self.tools = []

    async def _run(self) -> None:
        backoff = self.timing.first_backoff
        while not self._stopping.is_set():
            self.attempts += 1
            connected = False
            try:
                with anyio.CancelScope() as self._scope:
                    if self._stopping.is_set():
                        self._scope.cancel()  # stop() came before this attempt had a scope
                    async with self._connected():
                        connected = True
                        backoff = self.timing.first_backoff
                        await self._watch()
            except Exception as exc:  # the SDK raises exception groups from its task groups
                if self._stopping.is_set():
                    break
                self.error = _describe(exc)
                log.warning("MCP server %r %s: %s; retrying in %g s", self.name,
                            "failed" if connected else "could not be started", self.error, backoff)
            finally:
                self._session, self._scope = None, None
            if self._stopping.is_set():
                break
            if self.error is None:
                self.error = "the connection closed"
            self.state = "failed"
            self.tools = []
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self.timing.max_backoff)
            if not self._stopping.is_set():
                self.state = "connecting"

    @contextlib.asynccontextmanager
    async def _connected(self):
        """A session, open and initialized, its tools listed."""
        from mcp import ClientSession

        async with self._transport() as streams, anyio.create_task_group() as forwarding:
            read, write = streams[0], streams[1]
            # The session does not say when its server went away (a crashed stdio process, a
            # dropped HTTP stream) until the next request fails: relay what the transport
            # reads and notice the end of it at once.
            relay_in, relay_out = anyio.create_memory_object_stream(0)
            forwarding.start_soon(self._relay, read, relay_in)
            async with ClientSession(relay_out, write, message_handler=self._on_message) as session:
                await asyncio.wait_for(session.initialize(), self.session_timeout)
                self._tools_changed.clear()  # before listing: a change during the listing counts
                tools = await asyncio.wait_for(self._list_tools(session), self.session_timeout)
                self._session, self.tools = session, tools
                self._lost.clear()
                self.state, self.error = "connected", None
                log.info("MCP server %r connected (%s): %d tools", self.name, self.config.transport, len(tools))
                yield session
            forwarding.cancel_scope.cancel()

    async def _on_message(self, message) -> None:
        """The SDK's notification hook.  It runs on the session's receive path, so it only
        flags the change: the watch lists the tools again (a request from here would wait on
        the very loop that must read its answer)."""
        from mcp.types import ToolListChangedNotification

        if isinstance(message, ToolListChangedNotification):
            self._tools_changed.set()

    async def _relist_tools(self) -> None:
        self._tools_changed.clear()
        tools = await asyncio.wait_for(self._list_tools(self._session), self.session_timeout)
        before = {t.qualified_name for t in self.tools}
        self.tools = tools
        after = {t.qualified_name for t in tools}
        if before != after:
            log.info("MCP server %r tools changed: %d tools (added %s, removed %s)", self.name, len(tools),
                     sorted(after - before) or "none", sorted(before - after) or "none")

    async def _relay(self, read, relay_in) -> None:
        async with relay_in:
            async for item in read:
                await relay_in.send(item)
        if not self._stopping.is_set():
            self.error = self.error or "the server closed the connection"
            self._lost.set()

    async def _list_tools(self, session) -> list[MCPTool]:
        from mcp.types import PaginatedRequestParams

        tools, cursor = [], None
        while True:
            result = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools += [from_sdk(self.name, t) for t in result.tools]
            cursor = result.next_cursor
            if not cursor:
                return tools

    async def _watch(self) -> None:
        """Return when asked to stop; raise when the server stops answering; keep the tool
        list current meanwhile."""
        listed = time.monotonic()
        while not self._stopping.is_set():
            events = (self._stopping, self._lost, self._tools_changed)
            waiters = [asyncio.ensure_future(event.wait()) for event in events]
            await asyncio.wait(waiters, timeout=self.timing.ping_interval, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if self._stopping.is_set():
                return
            if self._lost.is_set():
                raise ConnectionError(self.error or "the connection to the server was lost")
            try:
                if self._tools_changed.is_set() or time.monotonic() - listed >= self.timing.tools_refresh:
                    await self._relist_tools()
                    listed = time.monotonic()
                else:
                    await asyncio.wait_for(self._session.send_ping(), self.session_timeout)
            except asyncio.TimeoutError:
                raise ConnectionError(f"no answer within {self.session_timeout:g} s") from None

    def _transport(self):
        config = self.config
        if config.transport == "stdio":
            from mcp import StdioServerParameters, stdio_client

            # The SDK gives the process a minimal environment (HOME, PATH, SHELL, ...) plus
            # the server's `env`: this server's own secrets (an API key) never reach it.
            params = StdioServerParameters(command=config.command, args=list(config.args),
                                           env=dict(config.env) or None, cwd=config.cwd)
            return stdio_client(params)
        if config.transport == "sse":
            from mcp.client.sse import sse_client

            return sse_client(config.url, headers=config.headers or None, timeout=config.timeout)
        return _streamable_http(config)

    # ------------------------------------------------------------------ calls
    async def call_tool(self, name: str, arguments: dict, timeout: float):
        """The SDK's CallToolResult; ServerUnavailable when not connected, TimeoutError when
        the server takes longer than `timeout`."""
        session = self._session
        if session is None or self.state != "connected":
            raise ServerUnavailable(f"MCP server {self.name!r} is not connected ({self.state}"
                                    f"{': ' + self.error if self.error else ''})")
        try:
            return await asyncio.wait_for(session.call_tool(name, arguments), timeout)
        except asyncio.TimeoutError:
            raise
        except Exception as exc:
            if _is_disconnect(exc):
                self.error = _describe(exc)
                self._lost.set()  # the watcher reconnects
                raise ServerUnavailable(f"MCP server {self.name!r} disconnected: {self.error}") from None
            raise


@contextlib.asynccontextmanager
async def _streamable_http(config: MCPServerConfig):
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with create_mcp_http_client(headers=config.headers or None) as http:
        async with streamable_http_client(config.url, http_client=http) as streams:
            yield streams


def _is_disconnect(exc: BaseException) -> bool:
    from mcp.shared.exceptions import MCPError
    from mcp.types import CONNECTION_CLOSED

    if isinstance(exc, MCPError):
        return exc.error.code == CONNECTION_CLOSED
    return isinstance(exc, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream,
                            ConnectionError, EOFError))


def _describe(exc: BaseException) -> str:
    """A one-line reason, digging into the exception groups anyio task groups raise."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
