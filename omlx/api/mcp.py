"""MCP routes: GET /v1/mcp/servers, GET /v1/mcp/tools, POST /v1/mcp/execute (oMLX's shapes).

Without an MCP config every route answers 503: the feature is not set up on this server.
"""

from __future__ import annotations

from aiohttp import web

from omlx.mcp.executor import InvalidArguments, MCPExecutor, UnknownTool
from omlx.mcp.manager import MCPManager

from .errors import APIError, invalid
from .wire import dumps as _dumps
from .wire import read_json

MCP = web.AppKey("mcp", MCPManager)


def mcp_of(app: web.Application) -> MCPManager | None:
    return app.get(MCP)


def _manager(request: web.Request) -> MCPManager:
    manager = mcp_of(request.app)
    if manager is None:
        raise APIError("MCP is not configured on this server (start it with --mcp-config FILE)", 503,
                       "service_unavailable", None, "mcp_not_configured")
    return manager


class MCPRoutes:
    def register(self, app: web.Application) -> None:
        app.router.add_get("/v1/mcp/servers", self.servers)
        app.router.add_get("/v1/mcp/tools", self.tools)
        app.router.add_post("/v1/mcp/execute", self.execute)

    async def servers(self, request: web.Request) -> web.Response:
        return web.json_response({"servers": _manager(request).servers()}, dumps=_dumps)

    async def tools(self, request: web.Request) -> web.Response:
        tools = [t.listing() for t in _manager(request).tools()]
        return web.json_response({"tools": tools, "count": len(tools)}, dumps=_dumps)

    async def execute(self, request: web.Request) -> web.Response:
        manager = _manager(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object: {\"tool_name\": ..., \"arguments\": {...}}")
        name = body.get("tool_name", body.get("tool"))  # oMLX accepts either
        if not isinstance(name, str) or not name:
            raise invalid("'tool_name' must be the name of an MCP tool (see GET /v1/mcp/tools)", "tool_name")
        arguments = body.get("arguments")
        if arguments is None:
            arguments = {}
        executor = MCPExecutor(manager)
        try:
            result = await executor.execute(name, arguments)
        except UnknownTool as exc:
            raise APIError(str(exc), 404, "invalid_request_error", "tool_name", "tool_not_found") from None
        except InvalidArguments as exc:
            raise invalid(str(exc), "arguments", "invalid_arguments") from None
        return web.json_response(result.as_dict(), dumps=_dumps)
