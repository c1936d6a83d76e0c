"""Generated text to (visible text | reasoning | tool calls), as it streams, for every API.

Models mark reasoning with `<think>...</think>` (the tokenizer knows its own markers) and tool
calls with a family-specific syntax (Hermes / Qwen `<tool_call>{json}</tool_call>`, Qwen3-Coder
XML, Mistral `[TOOL_CALLS]`, ...).  mlx-lm knows each family's markers and has a parser for
the text between them; this module does the streaming part: it splits text deltas at the
markers, holds back any tail that could still be the start of a marker (so markup never
leaks into the visible text, even split across tokens), and hands each finished call's text
to the family's parser.  Chat completions, Anthropic messages and Responses all consume the
same events.
"""

from __future__ import annotations

import importlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("omlx.api.output_parser")


# ---------------------------------------------------------------------------- tool syntax


@dataclass(frozen=True)
class ToolSyntax:
    """How one model family writes a tool call."""

    parser_name: str  # the mlx_lm.tool_parsers module
    start: str
    end: str  # "" when a call runs to the end of the output (Mistral)
    parse: Callable  # parse(text_between_markers, tools) -> dict | list[dict]


def tool_syntax(tokenizer, parser_name: str | None = None) -> ToolSyntax | None:
    """The tool-call syntax of this tokenizer's model family, or None if it has none.

    `parser_name` forces one of mlx-lm's parsers (a per-model setting) instead of the one
    mlx-lm inferred from the chat template; an unknown name raises ValueError.
    """
    if parser_name:
        if not parser_name.isidentifier():
            raise ValueError(f"unknown tool parser {parser_name!r}")
        try:
            module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_name}")
        except ImportError:
            raise ValueError(f"unknown tool parser {parser_name!r}") from None
        return ToolSyntax(parser_name, module.tool_call_start, module.tool_call_end, module.parse_tool_call)
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    parse = tokenizer.tool_parser
    name = getattr(parse, "__module__", "").rsplit(".", 1)[-1]
    return ToolSyntax(name, tokenizer.tool_call_start, tokenizer.tool_call_end or "", parse)


# Families whose call is one `{"name": ..., "arguments": {...}}` JSON object between markers.
_JSON_CALL_PARSERS = {"json_tools"}


def tool_syntax_or_default(tokenizer, parser_name: str | None = None) -> ToolSyntax:
    """The family's tool-call syntax; Hermes / Qwen JSON (`<tool_call>`) when mlx-lm does not
    know the family, the most common format among templates that accept tools."""
    return tool_syntax(tokenizer, parser_name) or tool_syntax(tokenizer, "json_tools")


def tool_call_format(tokenizer, parser_name: str | None = None) -> tuple[str, str] | None:
    """(prefix, suffix) around one `{"name": ..., "arguments": {...}}` JSON object: how to
    write a tool call this model family's parser reads back, for decoding that forces a call.

    E.g. ("<tool_call>\\n", "\\n</tool_call>") for Hermes / Qwen (and families mlx-lm does not
    know).  None when the family's calls are not a JSON object between two markers (XML,
    pythonic, ...).
    """
    syntax = tool_syntax_or_default(tokenizer, parser_name)
    if syntax.parser_name not in _JSON_CALL_PARSERS:
        return None
    return syntax.start + "\n", "\n" + syntax.end


def thinking_markers(tokenizer) -> tuple[str, str] | None:
    if getattr(tokenizer, "has_thinking", False) and tokenizer.think_start and tokenizer.think_end:
        return tokenizer.think_start, tokenizer.think_end
    return None


def starts_in_reasoning(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt leaves a thinking block open, so the output begins as reasoning
    (templates that end the generation prompt with `<think>`)."""
    if thinking_markers(tokenizer) is None or not tokenizer.think_start_tokens:
        return False
    return tokenizer.rfind_think_start(prompt_ids) > tokenizer.rfind_think_end(prompt_ids)


# ---------------------------------------------------------------------------- events


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def arguments_object(self) -> dict:
        return json.loads(self.arguments)


@dataclass
class Text:
    text: str


@dataclass
class Reasoning:
    text: str


@dataclass
class ToolCallEvent:
    call: ToolCall


OutputEvent = Text | Reasoning | ToolCallEvent


def new_call_id(prefix: str = "call") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def to_tool_calls(parsed, id_prefix: str) -> list[ToolCall]:
    """mlx-lm parser output (one dict or a list) to ToolCalls; ValueError if malformed."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"not a tool call: {item!r}")
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # some families write the arguments as a JSON string
            arguments = json.loads(arguments) if arguments.strip() else {}
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call arguments are not an object: {arguments!r}")
        calls.append(ToolCall(new_call_id(id_prefix), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


# ---------------------------------------------------------------------------- the parser

_TEXT, _REASONING, _TOOL = "text", "reasoning", "tool"


class OutputParser:
    """Feed text deltas in order; get OutputEvents out.  `finish()` flushes at the end.

    Tool calls are recognised only when `tools` is given (the request offered tools): a model
    that writes call markup unprompted is just writing text.  A call whose text the family
    parser rejects (a weak model's broken JSON, a call cut off by max_tokens) is passed on as
    the text it was, markers included, rather than silently dropped.
    """

    def __init__(
        self,
        *,
        think: tuple[str, str] | None = None,
        tools: ToolSyntax | None = None,
        tool_specs: list[dict] | None = None,
        in_reasoning: bool = False,
        call_id_prefix: str = "call",
    ):
        self._think = think
        self._tools = tools
        self._tool_specs = tool_specs
        self._call_id_prefix = call_id_prefix
        self._mode = _REASONING if in_reasoning and think else _TEXT
        self._pending = ""  # text not yet handed out
        self._strip_leading = self._mode == _REASONING  # drop whitespace right after a marker
        self.tool_calls: list[ToolCall] = []

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer,
        prompt_ids: list[int],
        tool_specs: list[dict] | None = None,
        parser_name: str | None = None,
        call_id_prefix: str = "call",
    ) -> "OutputParser":
        return cls(
            think=thinking_markers(tokenizer),
            tools=tool_syntax_or_default(tokenizer, parser_name) if tool_specs else None,
            tool_specs=tool_specs,
            in_reasoning=starts_in_reasoning(tokenizer, prompt_ids),
            call_id_prefix=call_id_prefix,
        )

    # ------------------------------------------------------------------ API
    def feed(self, delta: str) -> list[OutputEvent]:
        self._pending += delta
        events: list[OutputEvent] = []
        while self._step(events, final=False):
            pass
        return _merged(events)

    def finish(self) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        while self._step(events, final=True):
            pass
        if self._mode == _TOOL:  # the output ended inside a call
            self._close_call(self._pending, events, terminated=not self._tools.end)
        elif self._pending:
            self._emit(self._pending, events)
        self._pending = ""
        return _merged(events)

    # ------------------------------------------------------------------ internals
    def _markers(self) -> list[str]:
        if self._mode == _REASONING:
            return [self._think[1]]
        if self._mode == _TOOL:
            return [self._tools.end] if self._tools.end else []
        markers = []
        if self._think:
            markers.append(self._think[0])
        if self._tools:
            markers.append(self._tools.start)
        return markers

    def _step(self, events: list, final: bool) -> bool:
        """Handle the first marker in the pending text; False when there is none."""
        if self._strip_leading:
            stripped = self._pending.lstrip()
            if not stripped and not final:
                self._pending = ""
                return False  # still only whitespace: wait for more
            self._pending = stripped
            self._strip_leading = False
        markers = self._markers()
        found = [(i, m) for m in markers if (i := self._pending.find(m)) >= 0]
        if not found:
            if self._mode != _TOOL and not final:
                keep = _held_back(self._pending, markers)
                self._emit(self._pending[: len(self._pending) - keep], events)
                self._pending = self._pending[len(self._pending) - keep :]
            return False
        index, marker = min(found)
        before, self._pending = self._pending[:index], self._pending[index + len(marker) :]
        if self._mode == _TOOL:
            self._close_call(before, events, terminated=True)
            self._mode = _TEXT
        elif self._mode == _REASONING:
            self._emit(before.rstrip(), events)
            self._mode = _TEXT
        else:
            self._emit(before.rstrip(), events)
            self._mode = _REASONING if self._think and marker == self._think[0] else _TOOL
        self._strip_leading = self._mode != _TOOL
        return True

    def _emit(self, text: str, events: list) -> None:
        if text:
            events.append(Reasoning(text) if self._mode == _REASONING else Text(text))

    def _close_call(self, body: str, events: list, terminated: bool) -> None:
        try:
            if not terminated:
                raise ValueError("the output ended inside a tool call")
            calls = to_tool_calls(self._tools.parse(body, self._tool_specs), self._call_id_prefix)
        except Exception as exc:  # family parsers raise all sorts on malformed text
            log.info("unparseable tool call passed on as text (%s): %r", exc, body[:200])
            self._mode = _TEXT
            self._emit(self._tools.start + body + (self._tools.end if terminated else ""), events)
            return
        self.tool_calls.extend(calls)
        events.extend(ToolCallEvent(call) for call in calls)


def _held_back(text: str, markers: list[str]) -> int:
    """How much of the tail of `text` to hold: trailing whitespace (it is dropped if a marker
    follows) and any tail that is the start of a marker."""
    keep = 0
    for marker in markers:
        for size in range(min(len(text), len(marker) - 1), 0, -1):
            if marker.startswith(text[-size:]):
                keep = max(keep, size)
                break
    rest = text[: len(text) - keep]
    return keep + (len(rest) - len(rest.rstrip())) if markers else keep


def _merged(events: list[OutputEvent]) -> list[OutputEvent]:
    out: list[OutputEvent] = []
    for event in events:
        if out and type(event) is type(out[-1]) and isinstance(event, (Text, Reasoning)):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out
