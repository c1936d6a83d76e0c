"""OpenAI Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A response's output is a list of items (reasoning, message, function_call) built from the
assistant turn's events.  Streaming emits the sequence the OpenAI SDK and Codex expect:
response.created, response.in_progress, then per item output_item.added, its content
(content_part.added + output_text / reasoning_text deltas and done + content_part.done, or
function_call_arguments delta and done), output_item.done, and finally response.completed
(or response.incomplete when max_output_tokens cut it short), each with a sequence_number.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from contextlib import aclosing

import orjson
from aiohttp import web

from omlx.models.pool import ModelPool

from . import sse
from .errors import APIError, invalid
from .assistant_turn import ChoiceStep
from .generation import EngineFailure, Usage
from .offload import offload
from .output_parser import Reasoning, ToolCallEvent
from .response_store import ResponseStore
from .responses_protocol import ResponsesRequest, parse_responses
from .server_tools import ServerToolCall, ServerToolResult, offer_mcp_tools
from .serving import RunningTurn, Serving
from .sse_pump import pump
from .wire import dumps as _dumps
from .wire import read_json

log = logging.getLogger("omlx.api.responses")



def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """The response's output items, built event by event.  `add` and `close` return the
    stream events (without sequence numbers) that each step implies."""

    def __init__(self):
        self.items: list[dict] = []
        self._open: dict | None = None  # the reasoning or message item still receiving text
        self._mcp_items: dict[str, dict] = {}  # call id -> its mcp_call item

    def add(self, event) -> list[dict]:
        if isinstance(event, (ServerToolCall, ServerToolResult)):
            return self._mcp_call(event)
        if isinstance(event, ToolCallEvent):
            out = self.close()
            call = event.call
            item = {
                "id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "arguments": "",
            }
            index = len(self.items)
            self.items.append(item)
            out.append({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
            out.append({"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index, "delta": call.arguments})
            item["arguments"] = call.arguments
            item["status"] = "completed"
            out.append({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                        "name": call.name, "arguments": call.arguments})
            out.append({"type": "response.output_item.done", "output_index": index, "item": dict(item)})
            return out
        kind = "reasoning" if isinstance(event, Reasoning) else "message"
        out = []
        if self._open is None or self._open["type"] != kind:
            out = self.close() + self._start(kind)
        item, index = self._open, len(self.items) - 1
        part = item["content"][0]
        part["text"] += event.text
        delta_type = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        delta = {"type": delta_type, "item_id": item["id"], "output_index": index, "content_index": 0, "delta": event.text}
        if kind == "message":
            delta["logprobs"] = []
        out.append(delta)
        return out

    def _mcp_call(self, event) -> list[dict]:
        """An `mcp_call` item, as OpenAI's hosted MCP tool streams it: added with its
        arguments when the model makes the call, done with its output when the server has it."""
        if isinstance(event, ServerToolCall):
            out = self.close()
            call = event.call
            item = {"id": _new_id("mcp"), "type": "mcp_call", "status": "in_progress", "server_label": event.tool.server,
                    "name": event.tool.name, "arguments": call.arguments, "output": None, "error": None,
                    "approval_request_id": None}
            self._mcp_items[call.id] = item
            index = len(self.items)
            self.items.append(item)
            ids = {"item_id": item["id"], "output_index": index}
            return out + [
                {"type": "response.output_item.added", "output_index": index, "item": dict(item)},
                {"type": "response.mcp_call.in_progress", **ids},
                {"type": "response.mcp_call_arguments.delta", **ids, "delta": call.arguments},
                {"type": "response.mcp_call_arguments.done", **ids, "arguments": call.arguments},
            ]
        item = self._mcp_items[event.call.id]
        index = self.items.index(item)
        result = event.result
        item["output"] = result.content
        if result.is_error:
            item["status"] = "failed"
            item["error"] = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": result.content}]}
        else:
            item["status"] = "completed"
        ids = {"item_id": item["id"], "output_index": index}
        kind = "response.mcp_call.failed" if result.is_error else "response.mcp_call.completed"
        return [{"type": kind, **ids}, {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]

    def _start(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"id": _new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index = len(self.items)
        added = {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}
        item["content"].append(part)
        self.items.append(item)
        self._open = item
        return [
            added,
            {"type": "response.content_part.added", "item_id": item["id"], "output_index": index, "content_index": 0,
             "part": {**part, "text": ""}},
        ]

    def close(self) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.items.index(item)
        part = item["content"][0]
        item["status"] = "completed"
        done_type = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        done = {"type": done_type, "item_id": item["id"], "output_index": index, "content_index": 0, "text": part["text"]}
        if item["type"] == "message":
            done["logprobs"] = []
        return [
            done,
            {"type": "response.content_part.done", "item_id": item["id"], "output_index": index, "content_index": 0,
             "part": dict(part)},
            {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)},
        ]

    def assistant_message(self) -> dict:
        """The output as a canonical assistant message, for the stored conversation: the last
        round's (earlier rounds, with the MCP calls the server ran, are the loop's history)."""
        message: dict = {"role": "assistant", "content": ""}
        last_round = max((i + 1 for i, item in enumerate(self.items) if item["type"] == "mcp_call"), default=0)
        for item in self.items[last_round:]:
            if item["type"] == "message":
                message["content"] += item["content"][0]["text"]
            elif item["type"] == "reasoning":
                message["reasoning_content"] = item["content"][0]["text"]
            else:
                arguments = orjson.loads(item["arguments"])
                message.setdefault("tool_calls", []).append(
                    {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}
                )
        return message

    def reasoning_text(self) -> str:
        return "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")


class ResponsesRoutes:
    def __init__(self, pool: ModelPool, store: ResponseStore):
        self.pool = pool
        self.store = store
        self.serving = Serving(pool)

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.create)
        app.router.add_post("/responses", self.create)  # the mlx-vlm server's route
        app.router.add_get("/v1/responses/{response_id}", self.retrieve)
        app.router.add_delete("/v1/responses/{response_id}", self.delete)

    async def retrieve(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        stored = await asyncio.to_thread(self.store.get, response_id)
        if stored is None:
            raise _not_found(response_id)
        return web.json_response(stored["response"], dumps=_dumps)

    async def delete(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        try:
            deleted = await asyncio.to_thread(self.store.delete, response_id)
        except OSError as exc:
            log.error("cannot delete %s from the response store: %s", response_id, exc)
            raise APIError(f"the response store is unavailable: {exc.strerror or exc}", 503, "server_error",
                           None, "response_store_unavailable") from None
        if not deleted:
            raise _not_found(response_id)
        return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        offer = offer_mcp_tools(request.app, body, "responses")
        parsed = await offload(parse_responses, offer.body if offer else body, size=request.content_length)
        if offer is not None:
            parsed.raw_tools = offer.client_tools  # the response echoes the client's tools only
        history: list[dict] = []
        if parsed.previous_response_id:
            stored = await asyncio.to_thread(self.store.get, parsed.previous_response_id)
            if stored is None:
                raise invalid(
                    f"Previous response with id '{parsed.previous_response_id}' not found.",
                    "previous_response_id", "previous_response_not_found",
                )
            history = stored["messages"]
        run = _Run(parsed, await self.serving.start(request, parsed.turn_request(history)), history)
        if offer is not None:
            run.turn = offer.run(self.serving, request, run.running)
        turn = run.turn
        if parsed.stream:
            return await self._stream(request, run)
        try:
            async with aclosing(turn.events()) as events:
                async for event in events:
                    run.output.add(event)
        except EngineFailure as exc:
            raise exc.api_error() from None
        run.output.close()
        body = run.response_object(final=True)
        await self._save(run, body)
        return web.json_response(body, dumps=_dumps)

    async def _stream(self, request: web.Request, run: "_Run") -> web.StreamResponse:
        return await pump(request, run.turn, _ResponseEvents(run, self._save))

    async def _save(self, run: "_Run", body: dict) -> None:
        if not run.parsed.store:
            return
        rounds = getattr(run.turn, "history", [])  # the MCP rounds the server ran
        messages = run.history + run.parsed.input_messages + rounds + [run.output.assistant_message()]
        try:
            await asyncio.to_thread(self.store.put, body, messages)
        except OSError as exc:
            # Storing is a convenience (previous_response_id, GET later); the answer itself
            # is complete, so it still goes out.  Later lookups of this id get a 404.
            log.error("cannot store response %s (%s): %s; answering without storing it",
                      body["id"], self.store.directory, exc)


class _ResponseEvents:
    """sse_pump's EventFormat for Responses: every event numbered (`sequence_number`)."""

    def __init__(self, run: "_Run", save):
        self.run = run
        self.save = save  # stores the finished response (previous_response_id, GET later)
        self.sequence = 0

    def _event(self, payload: dict) -> bytes:
        payload["sequence_number"] = self.sequence
        self.sequence += 1
        return sse.named_event(payload["type"], payload)

    def opening(self) -> bytes:
        return (self._event({"type": "response.created", "response": self.run.response_object(final=False)})
                + self.keepalive())

    def keepalive(self) -> bytes:
        # The in-progress event again: Codex's idle timer counts SSE events, not bytes (a
        # comment would not reset it), and ignores this one.
        return self._event({"type": "response.in_progress", "response": self.run.response_object(final=False)})

    def step(self, step: ChoiceStep) -> bytes:
        return b"".join(self._event(payload) for event in step.events for payload in self.run.output.add(event))

    async def closing(self, usage: Usage) -> bytes:
        out = b"".join(self._event(payload) for payload in self.run.output.close())
        body = self.run.response_object(final=True)
        await self.save(self.run, body)
        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return out + self._event({"type": kind, "response": body})

    def failure(self, exc: EngineFailure) -> bytes:
        code = exc.api_error().code
        out = self._event({"type": "error", "code": code, "message": str(exc), "param": None})
        # The stream's terminal event: Codex and the SDKs' stream helpers end a response on
        # response.completed / .incomplete / .failed, and report a stream closed without
        # one as a broken connection.
        failed = self.run.response_object(final=False)
        failed["status"] = "failed"
        failed["error"] = {"code": code, "message": str(exc)}
        return out + self._event({"type": "response.failed", "response": failed})


class _Run:
    """One /v1/responses request in progress: what was asked and what is coming out."""

    def __init__(self, parsed: ResponsesRequest, running: RunningTurn, history: list[dict]):
        self.parsed = parsed
        self.running = running
        self.loaded = running.loaded
        self.turn = running.turn
        self.history = history
        self.output = OutputItems()
        self.id = _new_id("resp")
        self.created_at = int(time.time())

    def response_object(self, final: bool) -> dict:
        parsed = self.parsed
        status, incomplete = "in_progress", None
        if final:
            status = "completed"
            if self.turn.finish_reason() == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        text_format = {"type": "text"}
        if parsed.text_format is not None:
            schema = parsed.text_format.get("json_schema")
            text_format = {"type": "json_object"} if schema is None else {
                "type": "json_schema", "name": schema["name"], "schema": schema["schema"], "strict": schema["strict"],
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.loaded.model_id,
            "output": copy.deepcopy(self.output.items) if final else [],
            "usage": self._usage() if final else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": parsed.instructions,
            "tools": parsed.raw_tools,
            "tool_choice": parsed.raw_tool_choice,
            "parallel_tool_calls": parsed.parallel_tool_calls,
            "previous_response_id": parsed.previous_response_id,
            "max_output_tokens": parsed.max_output_tokens,
            # What the request runs with, defaults included.
            "temperature": self.running.resolved.sampling.temperature,
            "top_p": self.running.resolved.sampling.top_p,
            "reasoning": parsed.reasoning,
            "text": {"format": text_format},
            "store": parsed.store,
            "truncation": "disabled",
            "metadata": parsed.metadata or {},
        }

    def _usage(self) -> dict:
        usage = self.turn.usage
        reasoning = self.output.reasoning_text()
        reasoning_tokens = len(self.loaded.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
            "total_tokens": usage.total_tokens,
        }


def _not_found(response_id: str) -> APIError:
    return APIError(f"No response found with id '{response_id}'.", 404, "invalid_request_error", None, "not_found")

