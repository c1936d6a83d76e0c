"""All MCP connections of one config: started with the server, stopped with it, and the
registry of the tools they offer (`<server>__<tool>`)."""

from __future__ import annotations

import asyncio
import logging

from .client import MCPServerConnection, Timing
from .config import MCPConfig
from .tools import MCPTool

log = logging.getLogger("omlx.mcp")


class MCPManager:
    def __init__(self, config: MCPConfig, timing: Timing = Timing(), expose_tools: bool = True):
        self.config = config
        self.expose_tools = expose_tools  # offer the tools to models in generation requests
        self.connections = {server.name: MCPServerConnection(server, timing) for server in config.servers}

    @property
    def max_tool_calls(self) -> int:
        return self.config.max_tool_calls

    def start(self) -> None:
        """Start every enabled server's connection task; returns at once (a server that is
        slow to start never holds up the HTTP server or the other MCP servers)."""
        for connection in self.connections.values():
            connection.start()
        log.info("MCP: %d server(s) configured from %s", len(self.connections), self.config.path or "(inline)")

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.connections.values()))

    def servers(self) -> list[dict]:
        return [c.status() for c in self.connections.values()]

    def tools(self) -> list[MCPTool]:
        """The tools of every connected server, in config order."""
        return [tool for c in self.connections.values() if c.state == "connected" for tool in c.tools]

    def tool(self, qualified_name: str) -> MCPTool | None:
        return next((t for t in self.tools() if t.qualified_name == qualified_name), None)

    def connection(self, server: str) -> MCPServerConnection | None:
        return self.connections.get(server)

    def summary(self) -> dict:
        """For /health."""
        states = [c.state for c in self.connections.values()]
        return {"servers": len(states), "connected": states.count("connected"), "tools": len(self.tools())}
