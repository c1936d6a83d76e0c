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

from .chat_events import ChatEvents, chat_usage, server_call, server_result
from .chat_tools import call_json
from .generation import EngineFailure
from .output_parser import Reasoning, Text, ToolCallEvent
from .server_tools import ServerToolCall, ServerToolLoop
from .sse_pump import pump
from .wire import dumps as _dumps


async def chat_with_server_tools(request: web.Request, running, loop: ServerToolLoop) -> web.StreamResponse:
    options = running.request
    request_id = running.stream.request.request_id
    created = running.stream.created
    model = running.loaded.model_id
    if options.stream:
        # One choice (the loop refuses n > 1); the chunks are plain chat's, usage details included.
        fmt = ChatEvents(loop, request_id, created, model, 1, running.loaded.tokenizer,
                         logprobs=False, include_usage=options.include_usage)
        return await pump(request, loop, fmt)
    text, reasoning, client_calls, server_calls = [], [], [], {}
    try:
        async with aclosing(loop.events()) as events:
            async for event in events:
                if isinstance(event, Text):
                    text.append(event.text)
                elif isinstance(event, Reasoning):
                    reasoning.append(event.text)
                elif isinstance(event, ToolCallEvent):
                    client_calls.append(call_json(event.call))
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
        "usage": chat_usage(loop.usage),
    }
    return web.json_response(body, dumps=_dumps)
