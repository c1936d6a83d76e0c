"""Earlier MCP rounds that a client sends back in its history, as chat-template messages.

The server reports the MCP calls it ran in each family's shape (server_tools); a client that
replays its conversation sends them back in that shape, and the model must see them as it
saw them: its call in an assistant turn, then the result as a tool message.  A call's name
is the `<server>__<tool>` name the model was offered.
"""

from __future__ import annotations

from omlx.mcp.tools import qualified_name

from .conversation import arguments_object, assistant_tool_call
from .errors import invalid


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content blocks: their text
        return "".join(b.get("text", "") for b in value if isinstance(b, dict) and isinstance(b.get("text"), str))
    raise invalid(f"{where} must be a string or a list of text blocks", where)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(f"{where}.{key} must be a non-empty string", f"{where}.{key}")
    return value


def chat_rounds(message: dict, where: str) -> list[dict]:
    """An assistant chat message's `mcp_tool_calls` as the call turn and its results (to go
    before the message's own text, which the model wrote after reading them)."""
    calls = message.get("mcp_tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise invalid(f"{where}.mcp_tool_calls must be a list", f"{where}.mcp_tool_calls")
    assistant = {"role": "assistant", "content": "", "tool_calls": []}
    results = []
    for i, entry in enumerate(calls):
        at = f"{where}.mcp_tool_calls[{i}]"
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict):
            raise invalid(f"{at} must be an object with a 'function'", at)
        call_id, name = _string(entry, "id", at), _string(function, "name", f"{at}.function")
        assistant["tool_calls"].append(assistant_tool_call(call_id, name, arguments_object(function.get("arguments"), f"{at}.function.arguments")))
        results.append({"role": "tool", "tool_call_id": call_id, "content": _text(entry.get("content"), f"{at}.content")})
    return [assistant, *results] if results else []


def anthropic_call(block: dict, where: str) -> dict:
    """An `mcp_tool_use` block as the assistant's tool call."""
    name = qualified_name(_string(block, "server_name", where), _string(block, "name", where))
    return assistant_tool_call(_string(block, "id", where), name, arguments_object(block.get("input"), f"{where}.input"))


def anthropic_result(block: dict, where: str) -> dict:
    """An `mcp_tool_result` block as the tool message answering its call."""
    text = _text(block.get("content"), f"{where}.content")
    return {"role": "tool", "tool_call_id": _string(block, "tool_use_id", where),
            "content": f"Error: {text}" if block.get("is_error") is True else text}


def responses_call(item: dict, where: str) -> tuple[dict, dict]:
    """An `mcp_call` output item as (the assistant's tool call, the tool message)."""
    call_id = _string(item, "id", where)
    name = qualified_name(_string(item, "server_label", where), _string(item, "name", where))
    call = assistant_tool_call(call_id, name, arguments_object(item.get("arguments"), f"{where}.arguments"))
    output = _text(item.get("output"), f"{where}.output")
    return call, {"role": "tool", "tool_call_id": call_id, "content": output}
