"""Constrained decoding: which tokens a sequence may sample next.

A request may carry a constraint factory (`GenerationRequest.constraint`); each of its
sequences gets its own state (`TokenConstraint`), which the batched sampler asks for an
allowed-token mask before sampling and tells the token it picked afterwards.  Rows without a
constraint pay nothing.

- `grammar`: JSON schema / JSON object / Lark grammars through llguidance (why llguidance:
  see `omlx.constrained.grammar`).
- `tool_calls`: a grammar for "the model must call a tool", in the model's tool-call format.
- `thinking`: a budget that forces a thinking block closed after N tokens.
"""

from .base import TokenConstraint, allowed_tokens
from .grammar import GrammarConstraint, GrammarError, json_object_constraint, json_schema_constraint
from .requests import for_request, response_format_schema
from .thinking import ThinkingBudget
from .tool_calls import tool_call_constraint, tool_call_grammar

__all__ = [
    "GrammarConstraint",
    "GrammarError",
    "ThinkingBudget",
    "TokenConstraint",
    "allowed_tokens",
    "for_request",
    "response_format_schema",
    "json_object_constraint",
    "json_schema_constraint",
    "tool_call_constraint",
    "tool_call_grammar",
]
