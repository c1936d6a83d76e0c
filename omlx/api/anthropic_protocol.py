"""Typed, validated Anthropic Messages request bodies, translated into a Conversation.

Claude Code and the Anthropic SDKs send many fields a local model has no use for
(`metadata`, `cache_control`, `output_config`, `context_management`, `anthropic-beta`
features): they are accepted and ignored.  Fields that change meaning are validated and a
bad value raises an APIError naming it (rendered in Anthropic's error shape by the server).
"""

from __future__ import annotations

from typing import Any

from .conversation import (
    Conversation,
    ToolChoice,
    arguments_object,
    assistant_tool_call,
    check_tool_choice,
    function_tool,
    template_kwargs,
)
from . import mcp_history
from .errors import invalid
from .image_parts import MessageContent, anthropic_image
from .sampling_fields import ANTHROPIC_RANGES, SamplingRequest
from .turn_request import TurnRequest, parse_vlm_fields, thinking_kwargs
from .wire import boolean, model_name, number

MAX_STOP_SEQUENCES = 64
# Block types that carry nothing a local model can use; accepted so replayed histories work.
_IGNORED_BLOCKS = {"redacted_thinking", "server_tool_use", "web_search_tool_result", "container_upload"}


def _text_of(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text must be a string", where)
    return text


def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content blocks", where)
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"{where}[{i}] must be a content block object with a 'type'", f"{where}[{i}]")
    return content


def _no_media(block: dict, where: str) -> None:
    if block["type"] == "image":
        raise invalid(f"{where}: images go in user messages' content only", where)
    if block["type"] == "document":
        raise invalid(f"{where} is a 'document' block, which this server does not take", where)


def _tool_result_text(block: dict, where: str) -> str:
    content = block.get("content")
    if content is None:
        return ""
    parts = []
    for i, part in enumerate(_blocks(content, f"{where}.content")):
        _no_media(part, f"{where}.content[{i}]")
        if part["type"] != "text":
            raise invalid(f"{where}.content[{i}] has unsupported type {part['type']!r}", f"{where}.content[{i}]")
        parts.append(_text_of(part, f"{where}.content[{i}]"))
    text = "".join(parts)
    return f"Error: {text}" if block.get("is_error") is True else text


def _user_messages(content: Any, where: str) -> list[dict]:
    """A user turn: its tool results become tool messages (first, as they answer the previous
    assistant turn's calls), the rest one user message."""
    tool_messages = []
    texts = MessageContent()
    for i, block in enumerate(_blocks(content, where)):
        at = f"{where}[{i}]"
        kind = block["type"]
        if kind == "image":
            texts.image(anthropic_image(block, at))
            continue
        _no_media(block, at)
        if kind == "text":
            texts.text(_text_of(block, at))
        elif kind == "tool_result":
            tool_use_id = block.get("tool_use_id")
            if not isinstance(tool_use_id, str) or not tool_use_id:
                raise invalid(f"{at}.tool_use_id must be a non-empty string", at)
            tool_messages.append({"role": "tool", "tool_call_id": tool_use_id, "content": _tool_result_text(block, at)})
        elif kind not in _IGNORED_BLOCKS:
            raise invalid(f"{at} has type {kind!r}, which a user message cannot hold", at)
    out = tool_messages
    if texts.parts or not tool_messages:
        out.append({"role": "user", "content": texts.value()})
    return out


def _assistant_messages(content: Any, where: str) -> list[dict]:
    """An assistant turn; one that holds MCP calls this server ran (mcp_tool_use, then
    mcp_tool_result blocks) becomes the rounds it was: calls, their results, what followed."""
    out: list[dict] = []
    blocks = _blocks(content, where)
    start = 0
    for i, block in enumerate(blocks):
        if block["type"] == "mcp_tool_result":
            if start < i:  # the blocks before it: the turn that made the calls
                out.append(_assistant_message(blocks[start:i], where, start))
            out.append(mcp_history.anthropic_result(block, f"{where}[{i}]"))
            start = i + 1
    if start < len(blocks) or not out:
        out.append(_assistant_message(blocks[start:], where, start))
    return out


def _assistant_message(blocks: list[dict], where: str, offset: int = 0) -> dict:
    texts, thoughts, calls = [], [], []
    for i, block in enumerate(blocks, offset):
        at = f"{where}[{i}]"
        kind = block["type"]
        if kind == "mcp_tool_use":
            calls.append(mcp_history.anthropic_call(block, at))
        elif kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "thinking":
            thinking = block.get("thinking")
            if not isinstance(thinking, str):
                raise invalid(f"{at}.thinking must be a string", at)
            thoughts.append(thinking)
        elif kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise invalid(f"{at} needs a string 'id' and 'name'", at)
            calls.append(assistant_tool_call(call_id, name, arguments_object(block.get("input"), f"{at}.input")))
        elif kind not in _IGNORED_BLOCKS:
            _no_media(block, at)
            raise invalid(f"{at} has type {kind!r}, which an assistant message cannot hold", at)
    message: dict = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        message["reasoning_content"] = "\n\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        texts = []
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise invalid(f"system[{i}] must be a text block", "system")
            texts.append(_text_of(block, f"system[{i}]"))
        return "\n\n".join(texts)
    raise invalid("'system' must be a string or a list of text blocks", "system")


def _tools(raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list", "tools")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise invalid(f"tools[{i}] must be an object", f"tools[{i}]")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            continue  # a server tool (web search, code execution...) that Anthropic itself runs
        tools.append(function_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"), f"tools[{i}]"))
    return tools


def _tool_choice(raw: Any, tools: list[dict]) -> tuple[ToolChoice, bool]:
    """(choice, parallel tool calls allowed)."""
    if raw is None:
        return ToolChoice(), True
    if not isinstance(raw, dict):
        raise invalid("'tool_choice' must be an object", "tool_choice")
    parallel = not raw.get("disable_parallel_tool_use", False)
    kind = raw.get("type")
    if kind == "auto":
        choice = ToolChoice("auto")
    elif kind == "none":
        choice = ToolChoice("none")
    elif kind == "any":
        choice = ToolChoice("required")
    elif kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("tool_choice of type 'tool' needs a 'name'", "tool_choice")
        choice = ToolChoice("function", name)
    else:
        raise invalid(f"tool_choice.type must be one of auto, any, tool, none; got {kind!r}", "tool_choice")
    return check_tool_choice(choice, tools, "tool_choice"), parallel


def _thinking(raw: Any) -> tuple[dict, int | None]:
    """(chat template kwargs, thinking budget) for the `thinking` field."""
    if raw is None:
        return {}, None  # the model's own default
    if not isinstance(raw, dict):
        raise invalid("'thinking' must be an object", "thinking")
    kind = raw.get("type")
    if kind == "disabled":
        return {"enable_thinking": False}, None
    if kind == "adaptive":
        return {"enable_thinking": True}, None
    if kind == "enabled":
        budget = number(raw, "budget_tokens", 1, 2**31 - 1, None, integer=True)
        return {"enable_thinking": True}, budget
    raise invalid(f"thinking.type must be enabled, disabled or adaptive; got {kind!r}", "thinking")


def _stop_sequences(body: dict) -> list[str] | None:
    raw = body.get("stop_sequences")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise invalid("'stop_sequences' must be a list of strings", "stop_sequences")
    if len(raw) > MAX_STOP_SEQUENCES:
        raise invalid(f"'stop_sequences' accepts at most {MAX_STOP_SEQUENCES} strings", "stop_sequences")
    return [s for s in raw if s]


def parse_conversation(body: Any) -> TurnRequest:
    """The parts shared by /v1/messages and /v1/messages/count_tokens."""
    model = model_name(body)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    system_parts = [_system_text(body.get("system"))]
    messages: list[dict] = []
    for i, message in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role, content = message.get("role"), message.get("content")
        if content is None:
            raise invalid(f"{where}.content is required", f"{where}.content")
        if role == "user":
            messages.extend(_user_messages(content, f"{where}.content"))
        elif role == "assistant":
            messages.extend(_assistant_messages(content, f"{where}.content"))
        elif role == "system":  # Claude Code sometimes sends one: it joins the system prompt
            system_parts.append(_system_text(content))
        else:
            raise invalid(f"{where}.role must be 'user' or 'assistant', got {role!r}", f"{where}.role")
    system = "\n\n".join(p for p in system_parts if p)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    tools = _tools(body.get("tools"))
    choice, parallel = _tool_choice(body.get("tool_choice"), tools)
    thinking, budget = _thinking(body.get("thinking"))
    vlm = parse_vlm_fields(body)  # the mlx-vlm server's extensions, as its /v1/messages takes them
    # chat_template_kwargs: not Anthropic's, but a client may pass the template's switches.
    kwargs = {**template_kwargs(body.get("chat_template_kwargs")), **thinking, **thinking_kwargs(vlm)}
    return TurnRequest(
        model=model,
        sampling=SamplingRequest(),
        conversation=Conversation(messages, tools, choice, parallel, kwargs),
        thinking_budget=budget if budget is not None else vlm.thinking_budget,
        adapter_path=vlm.adapter_path,
        resize_shape=vlm.resize_shape,
        id_prefix="msg",
        call_id_prefix="toolu",
    )


def parse_messages(body: Any) -> TurnRequest:
    request = parse_conversation(body)
    if body.get("max_tokens") is None:
        raise invalid("'max_tokens' is required", "max_tokens")
    request.max_tokens = number(body, "max_tokens", 1, 2**31 - 1, None, integer=True)
    request.cap_max_tokens = True
    # Anthropic's own fields in Anthropic's ranges; min_p, the penalties and seed are omlx's
    # (and the mlx-vlm server's) extensions with the engine's ranges.
    request.sampling = SamplingRequest.parse(body, ANTHROPIC_RANGES)
    request.stop = _stop_sequences(body)
    request.stream = boolean(body, "stream")
    request.speculative = boolean(body, "speculative_decoding", None)  # omlx's extension
    return request
