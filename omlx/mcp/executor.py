"""Run one MCP tool call: find the tool, check the arguments against its input schema, call
it with its server's timeout, and turn the result into text a model (or a client) can read.

Whatever goes wrong once the arguments are valid (the tool reports an error, the server is
down or too slow) is a result with `is_error` set, never an exception: the model is told and
can try something else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import jsonschema
import orjson

from .client import ServerUnavailable
from .manager import MCPManager
from .tools import MCPTool

log = logging.getLogger("omlx.mcp")


class UnknownTool(LookupError):
    pass


class InvalidArguments(ValueError):
    pass


@dataclass
class ToolResult:
    tool_name: str
    content: str
    is_error: bool = False
    error_message: str | None = None

    def as_dict(self) -> dict:
        return {"tool_name": self.tool_name, "content": self.content, "is_error": self.is_error,
                "error_message": self.error_message}


class MCPExecutor:
    def __init__(self, manager: MCPManager):
        self.manager = manager

    def resolve(self, tool_name: str) -> MCPTool:
        tool = self.manager.tool(tool_name)
        if tool is None:
            known = ", ".join(t.qualified_name for t in self.manager.tools()) or "none: no MCP server is connected"
            raise UnknownTool(f"unknown MCP tool {tool_name!r} (tools: {known})")
        return tool

    @staticmethod
    def validate(tool: MCPTool, arguments) -> None:
        if not isinstance(arguments, dict):
            raise InvalidArguments(f"the arguments of {tool.qualified_name} must be a JSON object")
        try:
            validator = jsonschema.validators.validator_for(tool.input_schema)(tool.input_schema)
            error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        except jsonschema.exceptions.SchemaError as exc:
            log.warning("MCP tool %s has an invalid input schema (%s); arguments not checked",
                        tool.qualified_name, exc.message)
            return
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            raise InvalidArguments(f"invalid arguments for {tool.qualified_name}"
                                   f"{' at ' + where if where else ''}: {error.message}")

    async def execute(self, tool_name: str, arguments) -> ToolResult:
        """Raises UnknownTool / InvalidArguments before anything runs; the rest is a result."""
        tool = self.resolve(tool_name)
        self.validate(tool, arguments)
        connection = self.manager.connection(tool.server)
        timeout = connection.config.timeout
        try:
            result = await connection.call_tool(tool.name, arguments, timeout)
        except (TimeoutError, asyncio.TimeoutError):
            message = f"the MCP tool {tool_name} did not answer within {timeout:g} s"
            return ToolResult(tool_name, message, True, message)
        except ServerUnavailable as exc:
            return ToolResult(tool_name, str(exc), True, str(exc))
        except Exception as exc:  # a protocol error from the server (MCPError) or the SDK
            message = f"the MCP tool {tool_name} failed: {exc}"
            log.warning("%s", message)
            return ToolResult(tool_name, message, True, message)
        text = result_text(result)
        if result.is_error:
            return ToolResult(tool_name, text, True, text or "the tool reported an error")
        return ToolResult(tool_name, text)

    async def execute_for_model(self, tool_name: str, arguments) -> ToolResult:
        """As `execute`, but a call the model got wrong (unknown tool, bad arguments) is an
        error result too: the model sees what was wrong."""
        try:
            return await self.execute(tool_name, arguments)
        except (UnknownTool, InvalidArguments) as exc:
            return ToolResult(tool_name, str(exc), True, str(exc))


def result_text(result) -> str:
    """A CallToolResult's content as text: text blocks as they are, text resources' text,
    other media named; structured content as JSON when there is nothing else."""
    parts = []
    for block in result.content:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        elif kind in ("image", "audio"):
            parts.append(f"[{kind}: {block.mime_type}]")
    if not parts and result.structured_content is not None:
        parts.append(orjson.dumps(result.structured_content).decode())
    return "\n".join(parts)
