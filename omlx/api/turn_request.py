"""The one typed request every API family's parser produces, and the defaults applied to it.

A chat completion, an Anthropic message, a Responses call and a text completion all become a
`TurnRequest`: which model, the conversation (or raw prompt), sampling as the client set it,
output limits, stop strings, constraints.  Defaults from the settings files are applied to
this typed request (request > model settings > global settings > built-in), after the
client's fields were checked against the client's API, so every family honours a default
the same way and a default can never make a client's request invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .conversation import Conversation
from .errors import invalid
from .sampling_fields import SamplingRequest
from .wire import boolean, number

# Settings that pin sampling when a model's `force_sampling` is on (oMLX's meaning).
FORCED_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k"})


@dataclass
class TurnRequest:
    model: str
    sampling: SamplingRequest
    conversation: Conversation | None = None  # chat-style families
    prompt: str | list[int] | None = None  # text completions
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # the name the client used, for error messages
    # Anthropic and Responses clients cannot size max_tokens to a small local context (Claude
    # Code always asks for 32000): their limit is capped at what the context leaves instead.
    cap_max_tokens: bool = False
    stop: list[str] | None = None  # None: not set, a default may apply
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    logprobs: int | None = None
    response_format: dict | None = None  # json_object / json_schema
    format_param: str = "response_format"
    thinking_budget: int | None = None
    adapter_path: str | None = None  # the base model with this LoRA adapter (mlx-vlm's field)
    resize_shape: tuple[int, ...] | None = None  # images: resize before the processor (mlx-vlm's field)
    id_prefix: str = "chatcmpl"
    prompt_param: str = "messages"
    call_id_prefix: str = "call"
    # Speculative decoding: the request's own switch (omlx's `speculative_decoding` field;
    # None: the model's setting) and predicted output (OpenAI's `prediction`).
    speculative: bool | None = None
    prediction: str | None = None


@dataclass
class ModelDefaults:
    """What the settings files give a request to one model when it leaves a field unset."""

    sampling: dict = field(default_factory=dict)
    max_tokens: int | None = None
    template_kwargs: dict = field(default_factory=dict)
    forced_template_kwargs: dict = field(default_factory=dict)  # win over the request's
    thinking_budget: int | None = None
    stop: list[str] | None = None
    forced_sampling: frozenset = frozenset()

    @classmethod
    def from_settings(cls, merged: dict) -> "ModelDefaults":
        """From SettingsStore.request_defaults: sampling keys at the top level, plus
        max_tokens, chat_template_kwargs, thinking_budget, force_sampling, forced_ct_kwargs."""
        from .sampling_fields import SAMPLING_FIELD_NAMES

        kwargs = dict(merged.get("chat_template_kwargs") or {})
        forced_keys = merged.get("forced_ct_kwargs") or []
        stop = merged.get("stop")
        return cls(
            sampling={k: merged[k] for k in SAMPLING_FIELD_NAMES if merged.get(k) is not None},
            max_tokens=merged.get("max_tokens"),
            template_kwargs=kwargs,
            forced_template_kwargs={k: kwargs[k] for k in forced_keys if k in kwargs},
            thinking_budget=merged.get("thinking_budget"),
            stop=[stop] if isinstance(stop, str) else stop,
            forced_sampling=FORCED_SAMPLING_FIELDS if merged.get("force_sampling") else frozenset(),
        )


@dataclass
class Resolved:
    """A TurnRequest with the defaults applied: what the engine is asked to do."""

    request: TurnRequest
    sampling: Any  # SamplingParams
    max_tokens: int | None
    max_tokens_from_default: bool
    stop: list[str]
    thinking_budget: int | None


def apply_defaults(request: TurnRequest, defaults: ModelDefaults) -> Resolved:
    if request.conversation is not None:
        conversation = request.conversation
        conversation.template_kwargs = {
            **defaults.template_kwargs, **conversation.template_kwargs, **defaults.forced_template_kwargs,
        }
    max_tokens, from_default = request.max_tokens, False
    if max_tokens is None and defaults.max_tokens is not None:
        max_tokens, from_default = defaults.max_tokens, True
    stop = request.stop if request.stop is not None else (defaults.stop or [])
    budget = request.thinking_budget if request.thinking_budget is not None else defaults.thinking_budget
    return Resolved(
        request=request,
        sampling=request.sampling.resolve(defaults.sampling, defaults.forced_sampling),
        max_tokens=max_tokens,
        max_tokens_from_default=from_default,
        stop=[s for s in stop if isinstance(s, str) and s],
        thinking_budget=budget,
    )


# ---------------------------------------------------------------------------- mlx-vlm fields


@dataclass
class VLMFields:
    """Fields of the mlx-vlm server's requests, accepted by every chat-style family."""

    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    resize_shape: tuple[int, ...] | None = None  # images only: text models have nothing to resize
    adapter_path: str | None = None


def parse_vlm_fields(body: dict) -> VLMFields:
    shape = body.get("resize_shape")
    if shape is not None:
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = [shape]
        if (not isinstance(shape, list) or len(shape) not in (1, 2)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise invalid("'resize_shape' must be [size] or [height, width] of positive integers",
                          "resize_shape", "invalid_value")
        shape = tuple(shape)
    adapter = body.get("adapter_path")
    if adapter is not None and (not isinstance(adapter, str) or not adapter.strip()):
        raise invalid("'adapter_path' must be a path to a LoRA adapter folder", "adapter_path", "invalid_type")
    return VLMFields(
        enable_thinking=boolean(body, "enable_thinking", None),
        thinking_budget=number(body, "thinking_budget", 0, 2**31 - 1, None, integer=True),
        resize_shape=shape,
        adapter_path=adapter or None,
    )


def thinking_kwargs(fields: VLMFields) -> dict:
    """The template switch an explicit `enable_thinking` asks for (it wins over
    chat_template_kwargs, as in the mlx-vlm server)."""
    return {} if fields.enable_thinking is None else {"enable_thinking": fields.enable_thinking}
