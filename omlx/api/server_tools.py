"""MCP tools in generation: offered to the model next to the client's tools, and run by the
server when the model calls them.

    body ─► offer_mcp_tools (adds the MCP tools in the family's own tool shape) ─► parse
         ─► Serving.start (round 1) ─► ServerToolLoop.events():
                round: text / reasoning / client calls pass through; an MCP call is
                ServerToolCall and starts running at once
                after the round: each MCP call's ServerToolResult, then (unless the client
                has calls to make, or the budget is spent) the conversation grows by the
                assistant's calls and their results and the next round starts
                (tool_choice "auto": a forced call is forced once)

`ServerToolLoop` answers what an AssistantTurn answers (events, usage, finish reason, stop
string), so the three API families format it as they format one turn, plus the two server
tool events in their own shapes.  Usage counts every round's prompt and output.

A client tool whose name is an MCP tool's (`<server>__<tool>`) wins: that MCP tool is not
offered.  `"expose_mcp_tools": false` in a request, or the `mcp_expose_tools` setting off,
leaves MCP tools out of it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from contextlib import aclosing
from dataclasses import dataclass, field, fields, replace

from aiohttp import web

from omlx.mcp.executor import MCPExecutor, ToolResult
from omlx.mcp.tools import MCPTool

from .assistant_turn import ChoiceStep
from .conversation import ToolChoice, assistant_tool_call
from .errors import APIError
from .generation import EngineFailure, Usage
from .mcp import mcp_of
from .output_parser import Reasoning, Text, ToolCall, ToolCallEvent

log = logging.getLogger("omlx.api.server_tools")

OPT_OUT_FIELD = "expose_mcp_tools"


@dataclass
class ServerToolCall:
    """The model called an MCP tool; the server runs it."""

    call: ToolCall
    tool: MCPTool


@dataclass
class ServerToolResult:
    call: ToolCall
    tool: MCPTool
    result: ToolResult


# ---------------------------------------------------------------------------- offering


def _chat_tool(tool: MCPTool) -> dict:
    return tool.function_tool()


def _anthropic_tool(tool: MCPTool) -> dict:
    return {"name": tool.qualified_name, "description": tool.description, "input_schema": tool.input_schema}


def _responses_tool(tool: MCPTool) -> dict:
    return {"type": "function", "name": tool.qualified_name, "description": tool.description,
            "parameters": tool.input_schema}


def _chat_tool_name(tool) -> str | None:
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def _flat_tool_name(tool) -> str | None:
    return tool.get("name") if isinstance(tool, dict) else None


# family -> (an MCP tool in the family's request shape, the name of a client tool)
_FAMILIES = {
    "chat": (_chat_tool, _chat_tool_name),
    "messages": (_anthropic_tool, _flat_tool_name),
    "responses": (_responses_tool, _flat_tool_name),
}


@dataclass
class MCPOffer:
    """The MCP tools one request offers its model, and the request body that offers them."""

    body: dict
    tools: dict[str, MCPTool]  # by qualified name
    executor: MCPExecutor
    max_rounds: int
    client_tools: list = field(default_factory=list)  # the client's own `tools`, as sent

    def run(self, serving, http: web.Request, running) -> "ServerToolLoop":
        return ServerToolLoop(serving, http, running, self)


def offer_mcp_tools(app: web.Application, body, family: str) -> MCPOffer | None:
    """An MCPOffer when this request gets MCP tools, else None (no MCP config, exposure off
    by setting or by the request, no connected tools, tool_choice "none", n > 1)."""
    manager = mcp_of(app)
    if manager is None or not manager.expose_tools or manager.max_tool_calls <= 0 or not isinstance(body, dict):
        return None
    if body.get(OPT_OUT_FIELD) is False or body.get("tool_choice") in ("none", {"type": "none"}):
        return None
    if family == "chat" and body.get("logprobs"):
        return None  # the rounds' logprobs would not add up to one choice's
    if body.get("n") not in (None, 1):
        return None  # the server runs one conversation's calls; n parallel choices would fork it
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        return None  # the family's parser reports the bad field
    to_request, name_of = _FAMILIES[family]
    client = raw or []
    taken = {name_of(t) for t in client}
    offered: dict[str, MCPTool] = {}
    for tool in manager.tools():
        if tool.qualified_name in taken:
            log.info("the client's tool %r shadows the MCP tool of the same name", tool.qualified_name)
            continue
        offered[tool.qualified_name] = tool
    if not offered:
        return None
    body = dict(body)
    body["tools"] = list(client) + [to_request(t) for t in offered.values()]
    return MCPOffer(body, offered, MCPExecutor(manager), manager.max_tool_calls, client)


# ---------------------------------------------------------------------------- the loop


class RoundFailure(EngineFailure):
    """A later round could not start (e.g. the tool results overflowed the context)."""

    def __init__(self, error: APIError):
        super().__init__(error.message, error.code)
        self.error = error

    def api_error(self) -> APIError:
        return self.error


class ServerToolLoop:
    """The rounds of one request as one turn (single choice)."""

    def __init__(self, serving, http: web.Request, running, offer: MCPOffer):
        self.serving = serving
        self.http = http
        self.running = running  # the current round
        self.first_request = running.request
        self.budget = running.resolved.max_tokens  # output tokens for all rounds together
        self.offer = offer
        self.rounds = 0  # rounds whose MCP calls ran
        self._usage = Usage()
        self._finish: str | None = None  # overrides the last round's finish reason
        self.history: list[dict] = []  # assistant / tool messages of the rounds that ran tools

    # ------------------------------------------------------------------ AssistantTurn's questions
    @property
    def turn(self):
        return self.running.turn

    @property
    def usage(self) -> Usage:
        return _added(self._usage, self.turn.usage)

    def tool_calls(self, index: int = 0) -> list[ToolCall]:
        """The client's calls in the last round (MCP calls were the server's to make)."""
        return [c for c in self.turn.tool_calls(index) if c.name not in self.offer.tools]

    def finish_reason(self, index: int = 0) -> str:
        if self._finish is not None:
            return self._finish
        reason = self.turn.stream.choices[index].finish_reason
        if self.tool_calls(index) and reason in (None, "stop"):
            return "tool_calls"
        return reason or "stop"

    def matched_stop(self, index: int = 0) -> str | None:
        return self.turn.matched_stop(index) if self._finish is None else None

    # ------------------------------------------------------------------ rounds
    async def steps(self):
        """The events as the typed source every streaming writer reads (omlx.api.sse_pump):
        one choice, whose finish is known only once the last round ends."""
        async with aclosing(self.events()) as events:
            async for event in events:
                yield ChoiceStep(0, [event])

    async def events(self):
        """Text / Reasoning / ToolCallEvent (client calls) / ServerToolCall / ServerToolResult."""
        while True:
            allowed = self.rounds < self.offer.max_rounds
            running_calls: list[tuple[ToolCall, MCPTool, asyncio.Task]] = []
            text, reasoning = [], []
            try:
                async with aclosing(self.turn.events()) as events:
                    async for event in events:
                        if isinstance(event, ToolCallEvent) and event.call.name in self.offer.tools:
                            tool = self.offer.tools[event.call.name]
                            task = asyncio.ensure_future(self._execute(event.call) if allowed else self._refuse(event.call))
                            running_calls.append((event.call, tool, task))
                            yield ServerToolCall(event.call, tool)
                            continue
                        if isinstance(event, Text):
                            text.append(event.text)
                        elif isinstance(event, Reasoning):
                            reasoning.append(event.text)
                        yield event
                results = []
                for call, tool, task in running_calls:
                    result = await task
                    results.append((call, result))
                    yield ServerToolResult(call, tool, result)
            finally:
                for _, _, task in running_calls:
                    task.cancel()  # a client gone mid-round: its calls are not waited for
            if not running_calls or self.tool_calls():
                return  # an answer, or calls for the client to make: the turn is over
            if not allowed:
                self._finish = "stop"
                return
            self.rounds += 1
            self.history += _round_messages("".join(text), "".join(reasoning), results)
            if not await self._next_round():
                return

    async def _execute(self, call: ToolCall) -> ToolResult:
        try:
            arguments = call.arguments_object()
        except ValueError:
            return ToolResult(call.name, "the arguments are not a JSON object", True, "the arguments are not a JSON object")
        return await self.offer.executor.execute_for_model(call.name, arguments)

    async def _refuse(self, call: ToolCall) -> ToolResult:
        message = f"not run: this request's limit of {self.offer.max_rounds} MCP tool rounds is reached"
        return ToolResult(call.name, message, True, message)

    async def _next_round(self) -> bool:
        """Start the round that reads the tool results; False when the budget is spent."""
        self._usage = _added(self._usage, self.turn.usage)
        first = self.first_request
        budget = self.budget
        if budget is not None and self._usage.completion_tokens >= budget:
            self._finish = "length"
            return False
        conversation = copy.copy(first.conversation)
        conversation.messages = list(first.conversation.messages) + self.history
        conversation.tool_choice = ToolChoice("auto")  # a forced call is forced once
        if self.rounds >= self.offer.max_rounds:
            # The last round: the model answers with what it has (the client's tools stay).
            conversation.tools = [t for t in conversation.tools if t["function"]["name"] not in self.offer.tools]
        remaining = None if budget is None else budget - self._usage.completion_tokens
        # The server sizes these rounds: their limit is capped at what the context leaves.
        next_request = replace(first, conversation=conversation, max_tokens=remaining, cap_max_tokens=True)
        try:
            self.running = await self.serving.start(self.http, next_request)
        except APIError as exc:
            raise RoundFailure(exc) from None
        return True


def _added(a: Usage, b: Usage) -> Usage:
    """Two rounds' usage together (every count, speculative decoding's included)."""
    return Usage(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(Usage)})


def _round_messages(text: str, reasoning: str, results: list[tuple[ToolCall, ToolResult]]) -> list[dict]:
    """The assistant's message with its MCP calls, then each call's result, as the chat
    template reads them."""
    assistant: dict = {"role": "assistant", "content": text}
    if reasoning:
        assistant["reasoning_content"] = reasoning
    assistant["tool_calls"] = [assistant_tool_call(c.id, c.name, _arguments(c)) for c, _ in results]
    tool_messages = [{"role": "tool", "tool_call_id": c.id, "name": c.name, "content": r.content} for c, r in results]
    return [assistant, *tool_messages]


def _arguments(call: ToolCall) -> dict:
    try:
        value = call.arguments_object()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
