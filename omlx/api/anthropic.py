"""Anthropic Messages API: POST /v1/messages and /v1/messages/count_tokens.

What Claude Code and the Anthropic SDKs need: the exact streaming event sequence
(message_start, ping, content_block_start / _delta / _stop per block, message_delta with the
stop reason and usage, message_stop), thinking / text / tool_use blocks, stop_reason
end_turn / max_tokens / stop_sequence / tool_use.  Errors on these routes are rendered in
Anthropic's shape by the server's middleware (see errors.is_anthropic_route).
"""

from __future__ import annotations

import logging
import uuid
from contextlib import aclosing

from aiohttp import web

from omlx.models.pool import ModelPool

from . import sse
from .anthropic_protocol import parse_conversation, parse_messages
from .assistant_turn import AssistantTurn, collect_turn
from .generation import EngineFailure
from .offload import offload
from .output_parser import Reasoning, Text, ToolCallEvent
from .server_tools import ServerToolCall, ServerToolResult, offer_mcp_tools
from .serving import Serving
from .turn_request import TurnRequest
from .wire import dumps as _dumps
from .wire import read_json

log = logging.getLogger("omlx.api.anthropic")

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


class AnthropicRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.serving = Serving(pool)

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    async def count_tokens(self, request: web.Request) -> web.Response:
        # The prompt as /v1/messages would render it, the model's template defaults and the
        # MCP tools it would be offered included.
        body = await read_json(request)
        offer = offer_mcp_tools(request.app, body, "messages")
        parsed = await offload(parse_conversation, offer.body if offer else body, size=request.content_length)
        _, _, prompt_ids, _ = await self.serving.prepare(request, parsed)
        return web.json_response({"input_tokens": len(prompt_ids)})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        offer = offer_mcp_tools(request.app, body, "messages")
        parsed = await offload(parse_messages, offer.body if offer else body, size=request.content_length)
        running = await self.serving.start(request, parsed)
        turn = offer.run(self.serving, request, running) if offer else running.turn
        message_id = _message_id()
        if parsed.stream:
            return await self._stream(request, turn, parsed, message_id)
        try:
            events = await collect_turn(turn)
        except EngineFailure as exc:
            raise exc.api_error() from None
        content = []
        for event in events:
            if isinstance(event, Reasoning):
                content.append({"type": "thinking", "thinking": event.text, "signature": ""})
            elif isinstance(event, Text):
                content.append({"type": "text", "text": event.text})
            elif isinstance(event, ToolCallEvent):
                call = event.call
                content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments_object()})
            elif isinstance(event, ServerToolCall):
                content.append(_mcp_tool_use(event))
            else:
                content.append(_mcp_tool_result(event))
        return web.json_response(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": parsed.model,
                "content": content,
                "stop_reason": _stop_reason(turn),
                "stop_sequence": turn.matched_stop(),
                "usage": _usage(turn),
            },
            dumps=_dumps,
        )

    async def _stream(self, request, turn: AssistantTurn, parsed: TurnRequest, message_id: str):
        response = await sse.open_stream(request)

        async def send(kind: str, payload: dict) -> None:
            await response.write(sse.named_event(kind, {"type": kind, **payload}))

        start_usage = _usage(turn)
        start_usage["output_tokens"] = 0
        await send(
            "message_start",
            {
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": parsed.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                }
            },
        )
        await send("ping", {})
        index = -1
        open_kind = None  # the kind of the content block being streamed, if one is open

        async def close_block() -> None:
            nonlocal open_kind
            if open_kind == "thinking":
                # Anthropic ends a thinking block with its signature; a local model has none.
                await send("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": ""}})
            if open_kind is not None:
                await send("content_block_stop", {"index": index})
            open_kind = None

        async def open_block(block: dict) -> None:
            nonlocal index, open_kind
            await close_block()
            index += 1
            open_kind = block["type"]
            await send("content_block_start", {"index": index, "content_block": block})

        try:
            async with aclosing(sse.with_keepalive(turn.events(), sse.keepalive_interval(request))) as events:
                async for event in events:
                    if event is None:  # nothing for a while (a long prefill): show we are alive
                        await response.write(sse.progress_comment(request))
                        await send("ping", {})
                    elif isinstance(event, Reasoning):
                        if open_kind != "thinking":
                            await open_block({"type": "thinking", "thinking": "", "signature": ""})
                        await send("content_block_delta",
                                   {"index": index, "delta": {"type": "thinking_delta", "thinking": event.text}})
                    elif isinstance(event, Text):
                        if open_kind != "text":
                            await open_block({"type": "text", "text": ""})
                        await send("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": event.text}})
                    elif isinstance(event, ToolCallEvent):
                        call = event.call
                        await open_block({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                        await send("content_block_delta",
                                   {"index": index, "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
                    elif isinstance(event, ServerToolCall):  # an MCP tool the server runs
                        await open_block(_mcp_tool_use(event))
                        await send("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": event.call.arguments}})
                    elif isinstance(event, ServerToolResult):
                        await open_block(_mcp_tool_result(event))
        except EngineFailure as exc:
            error = exc.api_error()
            await response.write(sse.named_event("error", error.anthropic_body()))
            return response
        await close_block()
        usage = _usage(turn)
        await send(
            "message_delta",
            {"delta": {"stop_reason": _stop_reason(turn), "stop_sequence": turn.matched_stop()}, "usage": usage},
        )
        await send("message_stop", {})
        return response


def _mcp_tool_use(event: ServerToolCall) -> dict:
    """Anthropic's block for a call its MCP connector makes (the tool's own name, its server
    apart); the input is given whole at the start too, for clients that only read that."""
    call = event.call
    return {"type": "mcp_tool_use", "id": call.id, "name": event.tool.name, "server_name": event.tool.server,
            "input": call.arguments_object()}


def _mcp_tool_result(event: ServerToolResult) -> dict:
    return {"type": "mcp_tool_result", "tool_use_id": event.call.id, "is_error": event.result.is_error,
            "content": [{"type": "text", "text": event.result.content}]}


def _stop_reason(turn: AssistantTurn) -> str:
    if turn.matched_stop() is not None:
        return "stop_sequence"
    return _STOP_REASONS[turn.finish_reason()]


def _usage(turn: AssistantTurn) -> dict:
    usage = turn.usage
    # Anthropic counts cached prompt tokens apart from the rest of the input.
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": usage.completion_tokens,
    }

