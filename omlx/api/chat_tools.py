"""Tool calling and reasoning for chat completions: the request side (tools, tool_choice,
parallel_tool_calls, assistant `tool_calls` and `tool` results in the history) and the
response side (`reasoning_content`, `tool_calls` in messages and streamed deltas, finish
reason "tool_calls"), built on the shared OutputParser."""

from __future__ import annotations

from typing import Any

from .conversation import ToolChoice, arguments_object, assistant_tool_call, check_tool_choice, function_tool
from .errors import invalid
from .assistant_turn import AssistantTurn
from .output_parser import Reasoning, Text

# ---------------------------------------------------------------------------- request side


def parse_tools(body: dict) -> tuple[list[dict], ToolChoice, bool]:
    """(function tools, tool choice, parallel tool calls allowed) of a chat request."""
    raw = body.get("tools")
    tools: list[dict] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise invalid("'tools' must be a list", "tools", "invalid_type")
        for i, tool in enumerate(raw):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise invalid(f"{where} must be an object of type 'function'", where, "invalid_value")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise invalid(f"{where}.function must be an object", where, "invalid_type")
            tools.append(function_tool(function.get("name"), function.get("description"), function.get("parameters"), f"{where}.function"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    return tools, choice, parallel


def _tool_choice(raw: Any, tools: list[dict]) -> ToolChoice:
    if raw is None:
        return ToolChoice("auto")
    if raw in ("auto", "none", "required"):
        return check_tool_choice(ToolChoice(raw), tools, "tool_choice")
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if isinstance(name, str) and name:
            return check_tool_choice(ToolChoice("function", name), tools, "tool_choice")
    raise invalid(
        "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice", "invalid_value",
    )


def message_tool_fields(message: dict, index: int, out: dict) -> None:
    """Copy a history message's tool-call fields into the template message `out`."""
    where = f"messages[{index}]"
    role = out["role"]
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls", "invalid_type")
            out["tool_calls"] = [_history_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)]
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            out["reasoning_content"] = reasoning
    elif role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id")
        out["tool_call_id"] = call_id


def _history_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise invalid(f"{where} must be an object with a 'function'", where, "invalid_type")
    name = call["function"].get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.function.name must be a non-empty string", where)
    call_id = call.get("id") if isinstance(call.get("id"), str) else ""
    return assistant_tool_call(call_id, name, arguments_object(call["function"].get("arguments"), f"{where}.function.arguments"))


# ---------------------------------------------------------------------------- response side


def message(turn: AssistantTurn, choice) -> dict:
    """The whole assistant message of a finished choice (non-streaming)."""
    events = turn.feed(choice, choice.text.text)
    text = "".join(e.text for e in events if isinstance(e, Text))
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    calls = turn.tool_calls(choice.index)
    out: dict = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = [call_json(call) for call in calls]
    return out


def call_json(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
