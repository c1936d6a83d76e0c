"""From a request's options to its decoding constraint (the one place every API family calls).

- `response_format` json_object / json_schema: the output is one JSON value of the schema;
- a forced tool call (tool_choice "required" / a named function, Anthropic "any" / "tool"):
  the output is one call in the model's tool-call format (`tool_calls`);
- `thinking_budget`: at most N tokens of thinking, then the think-end token is forced.

For a thinking model a grammar leaves room for a thinking block before the constrained part
(required when the prompt already opened one), so reasoning models still reason; with a
budget that block is capped in the grammar itself.  A budget alone needs no grammar: the
cheaper `ThinkingBudget` state only masks the steps it forces.
"""

from __future__ import annotations

import json

from .grammar import JSON_OPTIONS, GrammarConstraint, GrammarError, json_schema_constraint, lark_constraint
from .thinking import ThinkingBudget
from .tool_calls import DEFAULT_FORMAT, _lark_text, call_schema


def response_format_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a chat-style `response_format` asks for; None for plain text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema", response_format)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    return None


def _thinking_markers(tokenizer) -> tuple[list[int], list[int]] | None:
    if not getattr(tokenizer, "has_thinking", False):
        return None
    start = list(getattr(tokenizer, "think_start_tokens", None) or [])
    end = list(getattr(tokenizer, "think_end_tokens", None) or [])
    return (start, end) if start and end else None


def _starts_in_thinking(tokenizer, prompt_ids: list[int] | None) -> bool:
    if not prompt_ids or _thinking_markers(tokenizer) is None:
        return False
    return tokenizer.rfind_think_start(prompt_ids) > tokenizer.rfind_think_end(prompt_ids)


def for_request(
    tokenizer,
    *,
    tools: list[dict] | None = None,
    tool_choice=None,
    response_format: dict | None = None,
    thinking_budget: int | None = None,
    prompt_ids: list[int] | None = None,
    tool_format: tuple[str, str] | None = None,
):
    """The `GenerationRequest.constraint` for these options, or None if they need none.

    `tool_choice` is anything with `mode` ("required" / "function") and `name`;
    `tool_format` the family's (prefix, suffix) around a call's JSON (Hermes / Qwen's when
    None).  Raises GrammarError for schemas or tools that cannot be compiled.
    """
    vocab_size = len(getattr(tokenizer, "_tokenizer", tokenizer))
    body: list[str] | None = None  # Lark items of the constrained output
    rules = ""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    special = hf.get_added_vocab() if hasattr(hf, "get_added_vocab") else {}
    if tools and tool_choice is not None and getattr(tool_choice, "mode", None) in ("required", "function"):
        forced = tool_choice.name if tool_choice.mode == "function" else None
        prefix, suffix = tool_format or DEFAULT_FORMAT
        body = _lark_text(prefix, special) + ["call"] + _lark_text(suffix, special)
        rules = f"call: %json {json.dumps(call_schema(tools, forced))}\n"
    else:
        schema = response_format_schema(response_format)
        if schema is not None:
            markers = _thinking_markers(tokenizer)
            if markers is None:
                return json_schema_constraint(tokenizer, schema, vocab_size)
            body = ["answer"]
            rules = f"answer: %json {json.dumps({**schema, 'x-guidance': dict(JSON_OPTIONS)})}\n"

    markers = _thinking_markers(tokenizer)
    inside = _starts_in_thinking(tokenizer, prompt_ids)
    if body is None:
        if thinking_budget is None or markers is None:
            return None
        return ThinkingBudget(thinking_budget, markers[0], markers[1], inside)

    if markers is not None:
        start, end = markers
        closing = " ".join(f"<[{t}]>" for t in end)
        opening = " ".join(f"<[{t}]>" for t in start)
        # A budget of 0 leaves no thinking text at all, only the markers.
        thinking = "" if thinking_budget == 0 else "thinking"
        if inside:
            top = f"start: {thinking} {closing} GAP {' '.join(body)}\n"
        else:
            top = f"start: ({opening} {thinking} {closing} GAP)? {' '.join(body)}\n"
        rules += "GAP: /[ \\n]*/\n"
        if thinking:
            limit = f"[max_tokens={thinking_budget}]" if thinking_budget is not None else ""
            rules += f"thinking{limit}: /(.|\\n)*/\n"
    else:
        top = f"start: {' '.join(body)}\n"
    try:
        return lark_constraint(tokenizer, top + rules, vocab_size)
    except GrammarError:
        raise
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None


__all__ = ["for_request", "response_format_schema", "GrammarConstraint"]
