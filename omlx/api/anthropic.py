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

from aiohttp import web

from omlx.models.pool import ModelPool

from . import sse
from .anthropic_protocol import parse_conversation, parse_messages
from .assistant_turn import AssistantTurn, ChoiceStep, collect_turn
from .generation import EngineFailure, Usage
from .offload import offload
from .output_parser import Reasoning, Text, ToolCallEvent
from .server_tools import ServerToolCall, ServerToolResult, offer_mcp_tools
from .serving import Serving
from .sse_pump import pump
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
                "usage": _usage(turn.usage),
            },
            dumps=_dumps,
        )

    async def _stream(self, request, turn: AssistantTurn, parsed: TurnRequest, message_id: str):
        return await pump(request, turn, _MessageEvents(turn, parsed.model, message_id))


class _MessageEvents:
    """sse_pump's EventFormat for Messages: content blocks opened and closed as the kind of
    output changes (thinking, text, tool_use, the MCP connector's blocks)."""

    def __init__(self, turn: AssistantTurn, model: str, message_id: str):
        self.turn, self.model, self.message_id = turn, model, message_id
        self.index = -1
        self.open_kind = None  # the kind of the content block being streamed, if one is open

    def opening(self) -> bytes:
        start_usage = _usage(self.turn.usage)
        start_usage["output_tokens"] = 0
        message = {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage,
        }
        return _event("message_start", {"message": message}) + _event("ping", {})

    def keepalive(self) -> bytes:
        return _event("ping", {})

    def step(self, step: ChoiceStep) -> bytes:
        return b"".join(self._event_bytes(event) for event in step.events)

    async def closing(self, usage: Usage) -> bytes:
        delta = {"stop_reason": _stop_reason(self.turn), "stop_sequence": self.turn.matched_stop()}
        return self._close_block() + _event("message_delta", {"delta": delta, "usage": _usage(usage)}) + _event(
            "message_stop", {})

    def failure(self, exc: EngineFailure) -> bytes:
        return sse.named_event("error", exc.api_error().anthropic_body())

    def _event_bytes(self, event) -> bytes:
        if isinstance(event, Reasoning):
            out = b"" if self.open_kind == "thinking" else self._open_block(
                {"type": "thinking", "thinking": "", "signature": ""})
            return out + _event("content_block_delta",
                                {"index": self.index, "delta": {"type": "thinking_delta", "thinking": event.text}})
        if isinstance(event, Text):
            out = b"" if self.open_kind == "text" else self._open_block({"type": "text", "text": ""})
            return out + _event("content_block_delta",
                                {"index": self.index, "delta": {"type": "text_delta", "text": event.text}})
        if isinstance(event, ToolCallEvent):
            call = event.call
            out = self._open_block({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            return out + _event("content_block_delta",
                                {"index": self.index, "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
        if isinstance(event, ServerToolCall):  # an MCP tool the server runs
            out = self._open_block(_mcp_tool_use(event))
            return out + _event("content_block_delta", {"index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": event.call.arguments}})
        if isinstance(event, ServerToolResult):
            return self._open_block(_mcp_tool_result(event))
        return b""

    def _close_block(self) -> bytes:
        out = b""
        if self.open_kind == "thinking":
            # Anthropic ends a thinking block with its signature; a local model has none.
            out += _event("content_block_delta", {"index": self.index, "delta": {"type": "signature_delta", "signature": ""}})
        if self.open_kind is not None:
            out += _event("content_block_stop", {"index": self.index})
        self.open_kind = None
        return out

    def _open_block(self, block: dict) -> bytes:
        out = self._close_block()
        self.index += 1
        self.open_kind = block["type"]
        return out + _event("content_block_start", {"index": self.index, "content_block": block})


def _event(kind: str, payload: dict) -> bytes:
    return sse.named_event(kind, {"type": kind, **payload})


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


def _usage(usage: Usage) -> dict:
    # Anthropic counts cached prompt tokens apart from the rest of the input.
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": usage.completion_tokens,
    }

