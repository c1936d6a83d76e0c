"""Chat completions' wire format for a turn's events: `chat.completion.chunk` SSE events and
the `usage` object, for plain chat and for the MCP tool loop alike (sse_pump drives it).

The MCP tool loop's calls, which the server makes itself, travel as `mcp_tool_calls` next to
the client's `tool_calls` (see server_tools_chat); each kind is numbered on its own.
"""

from __future__ import annotations

from . import sse
from .assistant_turn import ChoiceStep
from .chat_tools import call_json
from .generation import EngineFailure, Usage
from .logprobs import chat_logprobs
from .output_parser import Reasoning, Text, ToolCallEvent
from .server_tools import ServerToolCall, ServerToolResult


def chat_usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": usage.accepted_prediction_tokens,
            "rejected_prediction_tokens": usage.rejected_prediction_tokens,
        },
    }


def server_call(event: ServerToolCall) -> dict:
    call = event.call
    return {"id": call.id, "type": "function", "server": event.tool.server,
            "function": {"name": call.name, "arguments": call.arguments}}


def server_result(event: ServerToolResult) -> dict:
    return {"content": event.result.content, "is_error": event.result.is_error}


class ChatEvents:
    """sse_pump's EventFormat for chat completions.  `turn` answers finish_reason(index):
    an AssistantTurn, or the ServerToolLoop, whose finish is known only when its last round
    ends (its steps never say `finished`: the closing sends what is still open)."""

    def __init__(self, turn, request_id: str, created: int, model: str, n: int, tokenizer,
                 logprobs: bool, include_usage: bool):
        self.turn = turn
        self.request_id, self.created, self.model = request_id, created, model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.finished = [False] * n
        self.client_calls = [0] * n  # tool_calls index of each choice's next call
        self.server_calls: dict[str, int] = {}  # MCP call id -> its index in mcp_tool_calls

    def chunk(self, delta: dict, finish_reason=None, index: int = 0, logprobs=None) -> dict:
        return {
            "id": self.request_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    def opening(self) -> bytes:
        return b"".join(sse.data_event(self.chunk({"role": "assistant", "content": ""}, index=i))
                        for i in range(len(self.finished)))

    def keepalive(self) -> bytes:
        # An empty delta: clients skip it but count it as an event.
        return sse.data_event(self.chunk({}))

    def step(self, step: ChoiceStep) -> bytes:
        logprobs = chat_logprobs(self.tokenizer, step.logprobs) if self.logprobs and step.logprobs else None
        deltas = [self._delta(step.index, event) for event in step.events]
        if logprobs and not deltas:
            deltas = [{"content": ""}]  # text held back by the output parser; logprobs go now
        out = [sse.data_event(self.chunk(d, None, step.index, logprobs if i == 0 else None))
               for i, d in enumerate(deltas)]
        if step.finished:
            out.append(self._finish(step.index))
        return b"".join(out)

    async def closing(self, usage: Usage) -> bytes:
        out = [self._finish(i) for i, done in enumerate(self.finished) if not done]
        if self.include_usage:
            final = self.chunk({})
            final["choices"] = []
            final["usage"] = chat_usage(usage)
            out.append(sse.data_event(final))
        out.append(sse.DONE)
        return b"".join(out)

    def failure(self, exc: EngineFailure) -> bytes:
        return sse.data_event(exc.api_error().body())

    def _finish(self, index: int) -> bytes:
        self.finished[index] = True
        return sse.data_event(self.chunk({}, self.turn.finish_reason(index), index))

    def _delta(self, index: int, event) -> dict:
        if isinstance(event, Text):
            return {"content": event.text}
        if isinstance(event, Reasoning):
            return {"reasoning_content": event.text}
        if isinstance(event, ToolCallEvent):
            self.client_calls[index] += 1
            return {"tool_calls": [dict(call_json(event.call), index=self.client_calls[index] - 1)]}
        if isinstance(event, ServerToolCall):
            number = self.server_calls.setdefault(event.call.id, len(self.server_calls))
            return {"mcp_tool_calls": [dict(server_call(event), index=number)]}
        return {"mcp_tool_calls": [dict(server_result(event), index=self.server_calls[event.call.id])]}
