"""A grammar that makes the model call a tool: `tool_choice` "required" / a named function
(OpenAI), "any" / {"type": "tool"} (Anthropic), and the Responses API's equivalents.

The output is forced into the model family's own tool-call format, `prefix + JSON + suffix`
(Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`), where the
JSON's "name" is one of the allowed tools and its "arguments" validate against that tool's
parameter schema.  Marker text that is a single token in the vocabulary (`<tool_call>`) is
required as that token, as the model would write it, not spelled out byte by byte.
"""

from __future__ import annotations

import json

from .grammar import JSON_OPTIONS, GrammarConstraint, GrammarError

# The Hermes / Qwen format, for tokenizers whose family mlx-lm does not know; the
# API layer passes the family's own (omlx.api.output_parser.tool_call_format) when it has one.
DEFAULT_FORMAT = ("<tool_call>\n", "\n</tool_call>")


def _function(tool: dict) -> tuple[str, dict]:
    """(name, parameters schema) of an OpenAI chat tool, a Responses / flat function tool
    ({"name", "parameters"}) or an Anthropic tool ({"name", "input_schema"})."""
    spec = tool.get("function", tool) if isinstance(tool, dict) else None
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str) or not name:
        raise GrammarError("every tool needs a function name")
    schema = spec.get("parameters", spec.get("input_schema"))
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"the parameters of tool {name!r} must be a JSON schema object")
    return name, schema


def call_schema(tools: list[dict], forced_name: str | None = None) -> dict:
    """JSON schema of one call object `{"name": ..., "arguments": ...}` to an allowed tool."""
    functions = [_function(t) for t in tools]
    if forced_name is not None:
        functions = [f for f in functions if f[0] == forced_name]
        if not functions:
            raise GrammarError(f"tool_choice names {forced_name!r}, which is not among the tools")
    if not functions:
        raise GrammarError("a tool call is required, but no tools are given")
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in functions
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": dict(JSON_OPTIONS)}


def _lark_text(text: str, special: dict[str, int]) -> list[str]:
    """Lark items for literal text: single-token markers as `<[id]>`, the rest as strings."""
    items: list[str] = []
    while text:
        hits = [(text.find(s), -len(s), s) for s in special if s and text.find(s) >= 0]
        if not hits:
            items.append(json.dumps(text))
            break
        start, _, marker = min(hits)
        if start:
            items.append(json.dumps(text[:start]))
        items.append(f"<[{special[marker]}]>")
        text = text[start + len(marker) :]
    return items


def tool_call_grammar(tools: list[dict], forced_name: str | None, fmt: tuple[str, str] | None = None, special_tokens: dict[str, int] | None = None) -> str:
    """Lark grammar (llguidance dialect) for exactly one tool call in format `fmt`.

    `special_tokens` maps marker text that the vocabulary holds as one token to its id
    (e.g. the tokenizer's added vocabulary); `forced_name` None allows any of `tools`.
    """
    prefix, suffix = fmt or DEFAULT_FORMAT
    special = special_tokens or {}
    items = _lark_text(prefix, special) + ["call"] + _lark_text(suffix, special)
    return f"start: {' '.join(items)}\ncall: %json {json.dumps(call_schema(tools, forced_name))}\n"


def tool_call_constraint(tokenizer, tools: list[dict], forced_name: str | None, vocab_size: int, fmt: tuple[str, str] | None = None) -> GrammarConstraint:
    """A constraint that forces one call to one of `tools` (or to `forced_name`)."""
    import llguidance

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    added = hf.get_added_vocab() if hasattr(hf, "get_added_vocab") else {}
    lark = tool_call_grammar(tools, forced_name, fmt, added)
    return GrammarConstraint(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), vocab_size)
