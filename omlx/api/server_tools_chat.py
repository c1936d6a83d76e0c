"""Chat completions whose model may call MCP tools the server runs (see server_tools).

Chat completions have no place for calls the server makes itself, so they travel next to
the client's `tool_calls` under `mcp_tool_calls`, never in `tool_calls` (a client must not
mistake them for calls it has to make): streamed as one delta when the model makes the call,
`{"mcp_tool_calls": [{"index", "id", "type": "function", "server", "function": {"name",
"arguments"}}]}`, and one when its result is in, `{"mcp_tool_calls": [{"index", "content",
"is_error"}]}` (the SDKs' delta accumulation merges the two by index); the finished message
carries the merged list.  Text of every round streams as `content`, in order.
"""

from __future__ import annotations

from contextlib import aclosing

from aiohttp import web

from . import sse
from .generation import EngineFailure
from .output_parser import Reasoning, Text, ToolCallEvent
from .server_tools import ServerToolCall, ServerToolLoop, ServerToolResult
from .wire import dumps as _dumps


def _usage(loop: ServerToolLoop) -> dict:
    usage = loop.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class _Deltas:
    """Turns the loop's events into chat `delta` objects, numbering both kinds of calls."""

    def __init__(self):
        self.client_calls = 0
        self.server_calls: dict[str, int] = {}  # call id -> index in mcp_tool_calls

    def delta(self, event) -> dict:
        if isinstance(event, Text):
            return {"content": event.text}
        if isinstance(event, Reasoning):
            return {"reasoning_content": event.text}
        if isinstance(event, ToolCallEvent):
            call = event.call
            self.client_calls += 1
            return {"tool_calls": [{"index": self.client_calls - 1, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": call.arguments}}]}
        if isinstance(event, ServerToolCall):
            index = self.server_calls.setdefault(event.call.id, len(self.server_calls))
            return {"mcp_tool_calls": [dict(server_call(event), index=index)]}
        index = self.server_calls[event.call.id]
        return {"mcp_tool_calls": [dict(server_result(event), index=index)]}


def server_call(event: ServerToolCall) -> dict:
    call = event.call
    return {"id": call.id, "type": "function", "server": event.tool.server,
            "function": {"name": call.name, "arguments": call.arguments}}


def server_result(event: ServerToolResult) -> dict:
    return {"content": event.result.content, "is_error": event.result.is_error}


async def chat_with_server_tools(request: web.Request, running, loop: ServerToolLoop) -> web.StreamResponse:
    options = running.request
    request_id = running.stream.request.request_id
    created = running.stream.created
    model = running.loaded.model_id
    if options.stream:
        return await _stream(request, loop, options, request_id, created, model)
    text, reasoning, client_calls, server_calls = [], [], [], {}
    try:
        async with aclosing(loop.events()) as events:
            async for event in events:
                if isinstance(event, Text):
                    text.append(event.text)
                elif isinstance(event, Reasoning):
                    reasoning.append(event.text)
                elif isinstance(event, ToolCallEvent):
                    call = event.call
                    client_calls.append({"id": call.id, "type": "function",
                                         "function": {"name": call.name, "arguments": call.arguments}})
                elif isinstance(event, ServerToolCall):
                    server_calls[event.call.id] = server_call(event)
                else:
                    server_calls[event.call.id].update(server_result(event))
    except EngineFailure as exc:
        raise exc.api_error() from None
    content = "".join(text)
    message: dict = {"role": "assistant", "content": content if content or not client_calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if client_calls:
        message["tool_calls"] = client_calls
    if server_calls:
        message["mcp_tool_calls"] = list(server_calls.values())
    body = {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": loop.finish_reason()}],
        "usage": _usage(loop),
    }
    return web.json_response(body, dumps=_dumps)


async def _stream(request, loop: ServerToolLoop, options, request_id: str, created: int, model: str):
    def chunk(delta: dict, finish_reason=None) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    response = await sse.open_stream(request)
    await response.write(sse.data_event(chunk({"role": "assistant", "content": ""})))
    deltas = _Deltas()
    # While nothing comes (a prefill, a tool that takes its time): an empty delta, an event
    # clients skip but count (as the plain chat stream does).
    ping = sse.data_event(chunk({}))
    try:
        async with aclosing(sse.with_keepalive(loop.events(), sse.keepalive_interval(request))) as events:
            async for event in events:
                if event is None:
                    await response.write(sse.progress_comment(request) + ping)
                    continue
                await response.write(sse.data_event(chunk(deltas.delta(event))))
    except EngineFailure as exc:
        await response.write(sse.data_event(exc.api_error().body()))
        return response
    await response.write(sse.data_event(chunk({}, loop.finish_reason())))
    if options.include_usage:
        final = chunk({})
        final["choices"] = []
        final["usage"] = _usage(loop)
        await response.write(sse.data_event(final))
    await response.write(sse.DONE)
    return response
