"""Per-request generation settings shared by the chat-style APIs (chat completions,
Anthropic messages, Responses): how much room the context leaves for output, which tool
parser a model uses, and the decoding constraint a request needs."""

from __future__ import annotations

import logging

from omlx import constrained
from omlx.models.pool import LoadedModel, ModelPool

from .conversation import Conversation
from .errors import invalid
from .output_parser import tool_call_format

log = logging.getLogger("omlx.api.turn_options")


def output_room(loaded: LoadedModel, prompt_tokens: int) -> int:
    """Tokens that can still be generated after a prompt of `prompt_tokens`: what the context
    window leaves, and what the KV pool could ever hold."""
    return min(loaded.context_window, loaded.kv_capacity_tokens) - prompt_tokens


def tool_parser_of(pool: ModelPool, loaded: LoadedModel) -> str | None:
    """The per-model `tool_parser` setting (an mlx_lm.tool_parsers module name), if set:
    it overrides the parser mlx-lm inferred from the chat template."""
    return pool.settings.of_model(loaded.info.settings_id).tool_parser


def decoding_constraint(
    loaded: LoadedModel,
    conversation: Conversation | None = None,
    response_format: dict | None = None,
    thinking_budget: int | None = None,
    prompt_ids: list[int] | None = None,
    tool_parser: str | None = None,
    format_param: str = "response_format",
):
    """The GenerationRequest.constraint for a forced tool call (tool_choice required / a named
    tool), a response format (json_object / json_schema) or a thinking budget; None when the
    request needs none.  A schema or tool the grammar engine cannot compile is a 400.
    Compiling a grammar takes a while: call it off the event loop (asyncio.to_thread)."""
    tokenizer = loaded.tokenizer
    tools = tool_choice = tool_format = None
    if conversation is not None and conversation.tool_choice.forces_call and conversation.offered_tools:
        tool_format = tool_call_format(tokenizer, tool_parser)
        if tool_format is None:
            # This family writes calls in its own non-JSON syntax (XML, pythonic, ...), which the
            # grammar cannot produce yet: the model is left to call the tool unaided.
            log.info("%s: tool_choice %r not enforced for its tool-call syntax", loaded.model_id, conversation.tool_choice.mode)
        else:
            tools, tool_choice = conversation.offered_tools, conversation.tool_choice
    if not (tools or response_format or thinking_budget is not None):
        return None
    try:
        return constrained.for_request(
            tokenizer,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            thinking_budget=thinking_budget,
            prompt_ids=prompt_ids,
            tool_format=tool_format,
        )
    except constrained.GrammarError as exc:
        raise invalid(f"cannot constrain the output: {exc}", "tools" if tools else format_param) from None
