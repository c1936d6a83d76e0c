"""Typed, validated OpenAI request bodies (chat completions and text completions).

Every check raises an APIError naming the offending field, so bad input becomes a 400 in
OpenAI's shape before anything reaches the engine.  Unknown fields are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omlx.scheduler import SamplingParams

from .chat_tools import message_tool_fields, parse_tools
from .conversation import Conversation, ToolChoice, template_kwargs
from .errors import invalid

MAX_STOP_STRINGS = 4
_MISSING = object()


def _number(body: dict, key: str, lo: float, hi: float, default=_MISSING, *, integer=False):
    value = body.get(key)
    if value is None:
        return None if default is _MISSING else default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{key}' must be {kind}, got {type(value).__name__}", key, "invalid_type")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise invalid(f"'{key}' must be an integer, got {value}", key, "invalid_type")
        value = int(value)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}", key, "invalid_value")
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean", key, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid(
            f"'stop' accepts at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop", "invalid_value"
        )
    return [s for s in stop if s]


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias", "invalid_value") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid("'logit_bias' values must be numbers between -100 and 100", "logit_bias", "invalid_value")
        if token < 0:
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias", "invalid_value")
        out[token] = float(value)
    return out or None


def parse_sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_k = _number(body, "top_k", -1, 2**31 - 1, 0, integer=True)
    seed = _number(body, "seed", -(2**63), 2**64 - 1, None, integer=True)
    return SamplingParams(
        temperature=float(temperature),
        top_p=float(_number(body, "top_p", 0.0, 1.0, 1.0)),
        top_k=max(0, top_k),
        min_p=float(_number(body, "min_p", 0.0, 1.0, 0.0)),
        seed=None if seed is None else seed % 2**63,
        repetition_penalty=float(_number(body, "repetition_penalty", 0.01, 10.0, 1.0)),
        presence_penalty=float(_number(body, "presence_penalty", -2.0, 2.0, 0.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", -2.0, 2.0, 0.0)),
        logit_bias=_logit_bias(body),
    )


@dataclass
class CommonOptions:
    model: str
    max_tokens: int | None
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"  # the name the client used, for error messages
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and k alternatives
    n: int = 1  # completions of the same prompt


MAX_TOP_LOGPROBS = 20
MAX_N = 16  # completions per request; each is a sequence in the batch


def _chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs: true` + `top_logprobs: k` as one number (None when off)."""
    wanted = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and not wanted:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def parse_common(body: Any) -> CommonOptions:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string", "model", "missing_required_parameter")
    max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_tokens_param, 1, 2**31 - 1, None, integer=True)
    n = _number(body, "n", 1, MAX_N, 1, integer=True)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage"))
    return CommonOptions(
        model, max_tokens, parse_sampling(body), _stop(body), stream, include_usage, max_tokens_param, n=n
    )


# ---------------------------------------------------------------------------- chat

ROLES = {"system", "developer", "user", "assistant", "tool"}


def _message_text(content: Any, index: int) -> str:
    """Flatten OpenAI message content (a string or text parts) to the template's string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise invalid(f"messages[{index}].content parts must be objects with a 'type'", f"messages[{index}].content")
            if part["type"] in ("text", "input_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise invalid(f"messages[{index}].content text part needs a string 'text'", f"messages[{index}].content")
                texts.append(text)
            elif part["type"] in ("image_url", "input_image", "input_audio", "file"):
                raise invalid(
                    f"messages[{index}] has a '{part['type']}' part, but this model accepts text only",
                    f"messages[{index}].content",
                    "unsupported_content",
                )
            else:
                raise invalid(f"messages[{index}] has an unknown content part type {part['type']!r}", f"messages[{index}].content")
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content", "invalid_type")


@dataclass
class ChatCompletionRequest:
    options: CommonOptions
    messages: list[dict]
    chat_template_kwargs: dict = field(default_factory=dict)
    tools: list[dict] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    response_format: dict | None = None  # json_object / json_schema; None for plain text
    thinking_budget: int | None = None  # most tokens inside a thinking block

    def conversation(self) -> Conversation:
        return Conversation(
            self.messages, self.tools, self.tool_choice, self.parallel_tool_calls, self.chat_template_kwargs
        )


def parse_chat(body: Any) -> ChatCompletionRequest:
    options = parse_common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages", "invalid_value")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}", f"messages[{i}].role", "invalid_value")
        out = {"role": "system" if role == "developer" else role, "content": _message_text(message.get("content"), i)}
        if message.get("name") is not None:
            out["name"] = message["name"]
        message_tool_fields(message, i, out)
        rendered.append(out)
    kwargs = template_kwargs(body.get("chat_template_kwargs"))
    tools, tool_choice, parallel_tool_calls = parse_tools(body)
    options.logprobs = _chat_logprobs(body)
    return ChatCompletionRequest(
        options, rendered, kwargs, tools, tool_choice, parallel_tool_calls,
        _response_format(body.get("response_format")),
        _number(body, "thinking_budget", 0, 2**31 - 1, None, integer=True),
    )


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
    options: CommonOptions
    prompt: str | list[int]
    echo: bool = False


def parse_completion(body: Any) -> CompletionRequest:
    options = parse_common(body)
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
    options.logprobs = _number(body, "logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    echo = _bool(body, "echo")
    if echo and options.logprobs is not None:
        # The prompt's own log-probabilities would need logits at every prompt position.
        raise invalid("'logprobs' together with 'echo' is not supported", "logprobs", "unsupported_value")
    return CompletionRequest(options, prompt, echo)
