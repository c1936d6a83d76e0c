"""A small MCP server for the tests, written with the `mcp` SDK: run it as
`python tools_server.py stdio`, `python tools_server.py http PORT` (streamable HTTP) or
`python tools_server.py sse PORT`.

Its tools: add (two integers), echo (text), slow (sleeps), fail (a tool error), getenv, pid
(the server's process id, so a test can kill it)."""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("omlx-test-tools")


@server.tool(description="Add two integers and return the sum.")
def add(a: int, b: int) -> str:
    return str(a + b)


@server.tool(description="Return the text it is given, prefixed with 'echo: '.")
def echo(text: str) -> str:
    return f"echo: {text}"


@server.tool(description="Sleep for the given number of seconds, then answer 'done'.")
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


@server.tool(description="Always fails with a tool error.")
def fail(reason: str) -> str:
    raise ToolError(f"failed on purpose: {reason}")


@server.tool(description="The value of an environment variable in this MCP server ('' when unset).")
def getenv(name: str) -> str:
    return os.environ.get(name, "")


@server.tool(description="The process id of this MCP server.")
def pid() -> str:
    return str(os.getpid())


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run("stdio")
    elif sys.argv[1] == "sse":
        server.run("sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
