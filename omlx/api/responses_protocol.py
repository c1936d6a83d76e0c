"""Typed, validated OpenAI Responses request bodies, translated into a Conversation.

Codex and the OpenAI Agents SDK send fields a local model cannot use (`include`,
`prompt_cache_key`, `client_metadata`, hosted tool types such as `web_search` and
`namespace`): they are accepted and ignored.  Conversation state is kept in canonical chat
messages without the request's `instructions`, since a follow-up (`previous_response_id`)
carries the earlier turns but replaces the instructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from .errors import invalid
from .image_parts import MessageContent, responses_image
from .audio_parts import PART_TYPES as AUDIO_PART_TYPES, openai_audio
from . import mcp_history
from .sampling_fields import OPENAI_RANGES, SamplingRequest
from .turn_request import TurnRequest, parse_vlm_fields, thinking_kwargs
from .wire import boolean, model_name, number

# Items produced by tools the Responses API runs itself; nothing a local model can replay.
_HOSTED_TOOL_ITEMS = {"web_search_call", "file_search_call", "image_generation_call", "code_interpreter_call",
                      "mcp_list_tools"}
_MESSAGE_ROLES = {"user", "assistant", "system", "developer"}


@dataclass
class ResponsesRequest:
    model: str
    input_messages: list[dict]  # this request's input, as canonical messages
    instructions: str | None
    tools: list[dict]  # OpenAI chat-shaped function tools
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    max_output_tokens: int | None
    sampling: SamplingRequest
    stream: bool
    store: bool
    previous_response_id: str | None
    text_format: dict | None  # text.format when it is json_object / json_schema
    reasoning: dict | None
    template_kwargs: dict = field(default_factory=dict)
    thinking_budget: int | None = None  # omlx's extension, as in chat completions
    raw_tools: list = field(default_factory=list)  # echoed back in the response object
    raw_tool_choice: Any = "auto"
    metadata: dict | None = None
    adapter_path: str | None = None
    speculative: bool | None = None  # omlx's `speculative_decoding` extension
    resize_shape: tuple[int, ...] | None = None

    def conversation(self, history: list[dict]) -> Conversation:
        """The whole conversation: stored history, this input, the instructions in front."""
        messages = _merge_leading_system(list(history) + self.input_messages, self.instructions)
        return Conversation(messages, self.tools, self.tool_choice, self.parallel_tool_calls, dict(self.template_kwargs))

    def turn_request(self, history: list[dict]) -> TurnRequest:
        return TurnRequest(
            model=self.model,
            sampling=self.sampling,
            conversation=self.conversation(history),
            max_tokens=self.max_output_tokens,
            max_tokens_param="max_output_tokens",
            cap_max_tokens=True,  # like Anthropic's: capped at what the context leaves
            stream=self.stream,
            response_format=self.text_format,
            format_param="text.format",
            thinking_budget=self.thinking_budget,
            adapter_path=self.adapter_path,
            speculative=self.speculative,
            resize_shape=self.resize_shape,
            id_prefix="resp",
            prompt_param="input",
        )


def _merge_leading_system(messages: list[dict], instructions: str | None) -> list[dict]:
    """Instructions and every system / developer message become one system message in front:
    chat templates expect at most one, first."""
    system = [instructions] if instructions else []
    rest = []
    for message in messages:
        if message["role"] == "system":
            system.append(message["content"])
        else:
            rest.append(message)
    return ([{"role": "system", "content": "\n\n".join(s for s in system if s)}] if system else []) + rest


def _content_text(content: Any, where: str, takes_images: bool = False) -> str | list[dict]:
    """Text of content parts; with `takes_images` (user input), image parts too (then the
    content is a list of parts, see image_parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where)
    texts = MessageContent()
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{at} must be an object with a 'type'", at)
        kind = part["type"]
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            if not isinstance(part.get("text"), str):
                raise invalid(f"{at}.text must be a string", at)
            texts.text(part["text"])
        elif kind == "refusal":
            texts.text(str(part.get("refusal") or ""))
        elif kind == "input_image" and takes_images:
            texts.image(responses_image(part, at))
        elif kind in AUDIO_PART_TYPES and takes_images:
            texts.audio(openai_audio(part, at))
        elif kind in ("input_image", "input_file", *AUDIO_PART_TYPES):
            raise invalid(f"{at} is an '{kind}' part, but this model accepts text only", at, "unsupported_content")
        else:
            raise invalid(f"{at} has unknown type {kind!r}", at)
    return texts.value()


def _input_messages(raw: Any) -> list[dict]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise invalid("'input' must be a string or a list of items", "input")
    messages: list[dict] = []
    reasoning: list[str] = []  # reasoning items wait for the assistant turn they belong to

    def assistant() -> dict:
        if messages and messages[-1]["role"] == "assistant" and not reasoning:
            return messages[-1]
        message = {"role": "assistant", "content": ""}
        if reasoning:
            message["reasoning_content"] = "\n\n".join(reasoning)
            reasoning.clear()
        messages.append(message)
        return message

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if not isinstance(kind, str):  # compared against sets below: it must be hashable
            raise invalid(f"{where}.type must be a string", where)
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _MESSAGE_ROLES:
                raise invalid(f"{where}.role must be one of {sorted(_MESSAGE_ROLES)}, got {role!r}", where)
            text = _content_text(item.get("content"), f"{where}.content", takes_images=role == "user")
            if role == "assistant":
                target = assistant()
                target["content"] += text
            else:
                messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise invalid(f"{where} needs a string 'call_id' and 'name'", where)
            call = assistant_tool_call(call_id, name, arguments_object(item.get("arguments"), f"{where}.arguments"))
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}.call_id must be a non-empty string", where)
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = _content_text(parts, f"{where}.content")
            if text:
                reasoning.append(text)
        elif kind == "mcp_call":  # a call this server ran (an earlier response's output)
            call, result = mcp_history.responses_call(item, where)
            assistant().setdefault("tool_calls", []).append(call)
            messages.append(result)
        elif kind in _HOSTED_TOOL_ITEMS:
            continue
        else:
            raise invalid(f"{where} has unsupported item type {kind!r}", where)
    if not messages:
        raise invalid("'input' holds no messages", "input")
    return messages


def _tools(raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list", "tools")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid(f"tools[{i}] must be an object with a 'type'", f"tools[{i}]")
        if tool["type"] != "function":
            continue  # hosted or grouped tools (web_search, namespace, ...): not ours to run
        tools.append(function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"), f"tools[{i}]"))
    return tools


def _tool_choice(raw: Any, tools: list[dict]) -> ToolChoice:
    if raw is None or raw == "auto":
        return ToolChoice("auto")
    if raw in ("none", "required"):
        return check_tool_choice(ToolChoice(raw), tools, "tool_choice")
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "function":
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise invalid("tool_choice of type 'function' needs a 'name'", "tool_choice")
            return check_tool_choice(ToolChoice("function", name), tools, "tool_choice")
        if kind == "allowed_tools":
            mode = raw.get("mode", "auto")
            if mode not in ("auto", "required"):
                raise invalid("tool_choice.mode must be 'auto' or 'required'", "tool_choice")
            return check_tool_choice(ToolChoice(mode), tools, "tool_choice")
        return ToolChoice("auto")  # a hosted tool type: the model may still use the others
    raise invalid("'tool_choice' must be 'auto', 'none', 'required' or an object", "tool_choice")


def _text_format(raw: Any) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid("'text' must be an object", "text")
    fmt = raw.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("text.format.type must be 'text', 'json_object' or 'json_schema'", "text.format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format.schema must be a JSON schema object", "text.format.schema")
        # The same shape chat completions' response_format uses, for the same constraint hook.
        return {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name") or "response", "schema": fmt["schema"], "strict": fmt.get("strict")},
        }
    return {"type": "json_object"}


def _reasoning(raw: Any) -> tuple[dict | None, dict]:
    """(reasoning echoed back, chat template kwargs)."""
    if raw is None:
        return None, {}
    if not isinstance(raw, dict):
        raise invalid("'reasoning' must be an object", "reasoning")
    effort = raw.get("effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise invalid(f"reasoning.effort {effort!r} is not one of none, minimal, low, medium, high, xhigh", "reasoning")
    # Thinking models take an on/off switch: effort "none" turns thinking off.
    return raw, ({"enable_thinking": False} if effort == "none" else {})


def parse_responses(body: Any) -> ResponsesRequest:
    model = model_name(body)
    if body.get("input") is None:
        raise invalid("'input' is required", "input", "missing_required_parameter")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string", "instructions", "invalid_type")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise invalid("'previous_response_id' must be a string", "previous_response_id", "invalid_type")
    tools = _tools(body.get("tools"))
    reasoning, reasoning_kwargs = _reasoning(body.get("reasoning"))
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("'metadata' must be an object", "metadata", "invalid_type")
    vlm = parse_vlm_fields(body)  # the mlx-vlm server's fields
    return ResponsesRequest(
        model=model,
        input_messages=_input_messages(body["input"]),
        instructions=instructions,
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        parallel_tool_calls=boolean(body, "parallel_tool_calls", True),
        max_output_tokens=number(body, "max_output_tokens", 1, 2**31 - 1, None, integer=True),
        sampling=SamplingRequest.parse(body, OPENAI_RANGES),
        stream=boolean(body, "stream"),
        store=boolean(body, "store", True),
        previous_response_id=previous,
        text_format=_text_format(body.get("text")),
        reasoning=reasoning,
        template_kwargs={**template_kwargs(body.get("chat_template_kwargs")), **reasoning_kwargs,
                         **thinking_kwargs(vlm)},
        thinking_budget=vlm.thinking_budget,
        adapter_path=vlm.adapter_path,
        speculative=boolean(body, "speculative_decoding", None),
        resize_shape=vlm.resize_shape,
        raw_tools=body.get("tools") or [],
        raw_tool_choice=body.get("tool_choice", "auto"),
        metadata=metadata,
    )
