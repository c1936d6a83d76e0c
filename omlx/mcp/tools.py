"""One MCP tool as this server exposes it: named `<server>__<tool>` (oMLX's convention), so
tools of different MCP servers never clash, and offered to models as an OpenAI function tool."""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "__"


def qualified_name(server: str, tool: str) -> str:
    return f"{server}{SEPARATOR}{tool}"


@dataclass(frozen=True)
class MCPTool:
    server: str
    name: str  # the tool's own name on its MCP server
    description: str
    input_schema: dict

    @property
    def qualified_name(self) -> str:
        return qualified_name(self.server, self.name)

    def listing(self) -> dict:
        """Its entry in GET /v1/mcp/tools."""
        return {"name": self.qualified_name, "description": self.description, "server": self.server,
                "parameters": self.input_schema}

    def function_tool(self) -> dict:
        """The OpenAI chat function tool a model is offered."""
        function = {"name": self.qualified_name, "parameters": self.input_schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def from_sdk(server: str, tool) -> MCPTool:
    """From an `mcp` SDK Tool (its inputSchema is a JSON schema object)."""
    schema = tool.input_schema if hasattr(tool, "input_schema") else tool.inputSchema
    schema = dict(schema) if isinstance(schema, dict) else {"type": "object", "properties": {}}
    schema.setdefault("type", "object")
    return MCPTool(server, tool.name, tool.description or "", schema)
