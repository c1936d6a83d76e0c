"""OpenAI chat completions and text completions parsed into the shared TurnRequest.

Every check raises an APIError naming the offending field, so bad input becomes a 400 in
OpenAI's shape before anything reaches the engine.  Unknown fields are ignored; the mlx-vlm
server's extra fields (enable_thinking, thinking_budget, resize_shape, adapter_path) are
understood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import mcp_history
from .chat_tools import message_tool_fields, parse_tools
from .conversation import Conversation, template_kwargs
from .errors import invalid
from .image_parts import MessageContent, openai_image
from .audio_parts import PART_TYPES as AUDIO_PART_TYPES, openai_audio
from .sampling_fields import OPENAI_RANGES, SamplingRequest
from .turn_request import TurnRequest, parse_vlm_fields, thinking_kwargs
from .wire import boolean, model_name, number

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # completions per request; each is a sequence in the batch


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid(
            f"'stop' accepts at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop", "invalid_value"
        )
    return [s for s in stop if s]


def _chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs: true` + `top_logprobs: k` as one number (None when off)."""
    wanted = boolean(body, "logprobs")
    top = number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and not wanted:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def parse_common(body: Any, id_prefix: str) -> TurnRequest:
    """The fields chat and text completions share."""
    model = model_name(body)
    max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
    return TurnRequest(
        model=model,
        sampling=SamplingRequest.parse(body, OPENAI_RANGES),
        max_tokens=number(body, max_tokens_param, 1, 2**31 - 1, None, integer=True),
        max_tokens_param=max_tokens_param,
        stop=_stop(body),
        stream=boolean(body, "stream"),
        include_usage=bool(options and options.get("include_usage")),
        n=number(body, "n", 1, MAX_N, 1, integer=True),
        id_prefix=id_prefix,
        speculative=boolean(body, "speculative_decoding", None),
        prediction=_prediction(body.get("prediction")),
    )


def _prediction(value: Any) -> str | None:
    """OpenAI's Predicted Outputs: `{"type": "content", "content": str | text parts}`."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "content":
        raise invalid("'prediction' must be an object with \"type\": \"content\"", "prediction", "invalid_value")
    content = value.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise invalid("'prediction.content' must be a string or a list of text parts", "prediction.content", "invalid_type")


# ---------------------------------------------------------------------------- chat

ROLES = {"system", "developer", "user", "assistant", "tool"}


def _message_content(content: Any, index: int, takes_images: bool = False) -> str | list[dict]:
    """OpenAI message content (a string or parts) as the template's content: a string, or
    text and image parts when it has images (user messages only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        where = f"messages[{index}].content"
        out = MessageContent()
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise invalid(f"{where} parts must be objects with a 'type'", where)
            if part["type"] in ("text", "input_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise invalid(f"{where} text part needs a string 'text'", where)
                out.text(text)
            elif part["type"] == "image_url":
                if not takes_images:
                    raise invalid(f"messages[{index}] cannot carry images (only user messages can)", where,
                                  "unsupported_content")
                out.image(openai_image(part, where))
            elif part["type"] in AUDIO_PART_TYPES:
                if not takes_images:
                    raise invalid(f"messages[{index}] cannot carry audio (only user messages can)", where,
                                  "unsupported_content")
                out.audio(openai_audio(part, where))
            elif part["type"] in ("input_image", "file"):
                raise invalid(
                    f"messages[{index}] has a '{part['type']}' part, which chat completions do not take "
                    "(images go in 'image_url' parts, audio in 'input_audio' parts)",
                    where,
                    "unsupported_content",
                )
            else:
                raise invalid(f"messages[{index}] has an unknown content part type {part['type']!r}", where)
        return out.value()
    raise invalid(f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content", "invalid_type")


def parse_chat(body: Any) -> TurnRequest:
    request = parse_common(body, "chatcmpl")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages", "invalid_value")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or object is unhashable
            raise invalid(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}", f"messages[{i}].role", "invalid_value")
        content = _message_content(message.get("content"), i, takes_images=role == "user")
        out = {"role": "system" if role == "developer" else role, "content": content}
        if message.get("name") is not None:
            out["name"] = message["name"]
        message_tool_fields(message, i, out)
        if role == "assistant":  # MCP calls the server ran in this turn come before its text
            rendered.extend(mcp_history.chat_rounds(message, f"messages[{i}]"))
        rendered.append(out)
    vlm = parse_vlm_fields(body)  # the mlx-vlm server's fields
    kwargs = {**template_kwargs(body.get("chat_template_kwargs")), **thinking_kwargs(vlm)}
    tools, tool_choice, parallel_tool_calls = parse_tools(body)
    request.conversation = Conversation(rendered, tools, tool_choice, parallel_tool_calls, kwargs)
    request.resize_shape = vlm.resize_shape
    request.logprobs = _chat_logprobs(body)
    request.response_format = _response_format(body.get("response_format"))
    request.thinking_budget = vlm.thinking_budget
    request.adapter_path = vlm.adapter_path
    return request


def _response_format(raw: Any) -> dict | None:
    """`response_format`: text (None), json_object, or json_schema with its schema object."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid("'response_format' must be an object", "response_format", "invalid_type")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise invalid(
            "response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format", "invalid_value"
        )
    spec = raw.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise invalid(
            "response_format.json_schema.schema must be a JSON schema object", "response_format", "invalid_value"
        )
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid("response_format.json_schema.name must be a string", "response_format", "invalid_type")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": spec["schema"], "strict": spec.get("strict")}}


# ---------------------------------------------------------------------------- completions


@dataclass
class CompletionRequest:
    turn: TurnRequest
    echo: bool = False


def parse_completion(body: Any) -> CompletionRequest:
    request = parse_common(body, "cmpl")
    request.prompt_param = "prompt"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise invalid(
                "'prompt' must be a string or a list of token ids (one prompt per request)",
                "prompt",
                "invalid_value",
            )
    elif not isinstance(prompt, str) or not prompt:
        raise invalid("'prompt' must be a non-empty string or a list of token ids", "prompt", "invalid_value")
    if body.get("suffix"):
        raise invalid("'suffix' is not supported", "suffix", "unsupported_value")
    request.prompt = prompt
    request.logprobs = number(body, "logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    request.adapter_path = parse_vlm_fields(body).adapter_path
    echo = boolean(body, "echo")
    if echo and request.logprobs is not None:
        # The prompt's own log-probabilities would need logits at every prompt position.
        raise invalid("'logprobs' together with 'echo' is not supported", "logprobs", "unsupported_value")
    return CompletionRequest(request, echo)
