"""An MCP server whose tool list changes: `add_tool(name, notify)` registers a new tool (it
answers '<name> ran') and, if `notify`, tells connected clients the list changed.  Run as
`python changing_server.py stdio`."""

from __future__ import annotations

import sys

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("omlx-test-changing")


@server.tool(description="Register a new tool with the given name.")
async def add_tool(name: str, ctx: Context, notify: bool = True) -> str:
    def added() -> str:
        return f"{name} ran"

    server.add_tool(added, name=name, description=f"A tool added at run time ({name}).")
    if notify:
        await ctx.session.send_tool_list_changed()
    return f"added {name}"


if __name__ == "__main__":
    server.run(sys.argv[1] if len(sys.argv) > 1 else "stdio")
