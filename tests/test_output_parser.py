"""The streaming output parser on text in each model family's own format: reasoning and tool
calls split out of the visible text however the text is cut into deltas, and no markup ever
reaching the visible text."""

from __future__ import annotations

import json

import pytest
from conftest import SCRIPTED, tokenizer_of

from omlx.api.output_parser import (
    OutputParser,
    Reasoning,
    Text,
    ToolCallEvent,
    starts_in_reasoning,
    tool_call_format,
    tool_syntax,
)

THINK = ("<think>", "</think>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def syntax(name: str):
    return tool_syntax(None, name)


def run(text: str, step: int, *, think=THINK, tools="json_tools", in_reasoning=False):
    """(visible text, reasoning, [(name, arguments)]) of `text` fed `step` characters at a time,
    checking no delta carries markup."""
    parser = OutputParser(think=think, tools=syntax(tools) if tools else None, tool_specs=TOOLS,
                          in_reasoning=in_reasoning)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    events += parser.finish()
    visible = "".join(e.text for e in events if isinstance(e, Text))
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    calls = [(e.call.name, json.loads(e.call.arguments)) for e in events if isinstance(e, ToolCallEvent)]
    assert [c.id for c in parser.tool_calls] == [e.call.id for e in events if isinstance(e, ToolCallEvent)]
    return visible, reasoning, calls


STEPS = [1, 2, 3, 5, 8, 13, 10_000]

HERMES = (
    "<think>\nThe user wants weather.\n</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


@pytest.mark.parametrize("step", STEPS)
def test_hermes_reasoning_text_and_parallel_calls(step):
    visible, reasoning, calls = run(HERMES, step)
    assert reasoning == "The user wants weather."
    assert visible == "Let me check."
    assert calls == [("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Oslo"})]


QWEN3_CODER = (
    "I will call it.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)


@pytest.mark.parametrize("step", STEPS)
def test_qwen3_coder_xml_calls_use_the_tool_schema(step):
    visible, reasoning, calls = run(QWEN3_CODER, step, tools="qwen3_coder")
    assert visible == "I will call it."
    assert reasoning == ""
    assert calls == [("get_weather", {"city": "Paris", "days": 3})]  # "3" typed by the schema


@pytest.mark.parametrize("step", STEPS)
def test_mistral_calls_run_to_the_end_of_the_output(step):
    text = 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    visible, _, calls = run(text, step, think=None, tools="mistral")
    assert visible == "Sure."
    assert calls == [("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_pythonic_calls(step):
    text = '<|tool_call_start|>[get_weather(city="Lima", days=1)]<|tool_call_end|>Done.'
    visible, _, calls = run(text, step, think=None, tools="pythonic")
    assert calls == [("get_weather", {"city": "Lima", "days": 1})]
    assert visible == "Done."


@pytest.mark.parametrize("step", STEPS)
def test_plain_text_passes_through_unchanged(step):
    text = "A reply with < and <t and </ and a tool_call mention, then spaces at the end  "
    assert run(text, step) == (text, "", [])


@pytest.mark.parametrize("step", STEPS)
def test_a_prompt_that_opened_thinking_starts_in_reasoning(step):
    text = "\nstill thinking about it\n</think>\n\nThe answer is 4."
    assert run(text, step, in_reasoning=True) == ("The answer is 4.", "still thinking about it", [])


def test_reasoning_cut_off_by_max_tokens_stays_reasoning():
    assert run("<think>\nhalf a tho", 3) == ("", "half a tho", [])


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_malformed_call_is_passed_on_as_text(step):
    text = 'Here: <tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call> ok'
    visible, _, calls = run(text, step)
    assert calls == []
    assert visible == 'Here:<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>ok'


def test_call_cut_off_by_max_tokens_is_passed_on_as_text():
    visible, _, calls = run('<tool_call>\n{"name": "get_wea', 4)
    assert calls == [] and visible == '<tool_call>\n{"name": "get_wea'


def test_without_tools_call_markup_is_just_text():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    assert run(text, 3, tools=None) == (text, "", [])


def test_partial_marker_is_held_back_until_settled():
    parser = OutputParser(think=THINK, tools=syntax("json_tools"), tool_specs=TOOLS)
    assert parser.feed("Hello <tool") == [Text("Hello")]
    assert parser.feed("box> there") == [Text(" <toolbox> there")]  # not a marker after all
    assert parser.finish() == []


def test_arguments_given_as_a_json_string_are_normalised():
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Bern\\"}"}\n</tool_call>'
    assert run(text, 5)[2] == [("get_weather", {"city": "Bern"})]


def test_unknown_parser_name_is_rejected():
    with pytest.raises(ValueError):
        tool_syntax(None, "no_such_parser")
    with pytest.raises(ValueError):
        tool_syntax(None, "../etc")


def test_tokenizer_knows_its_family(server):
    tokenizer = tokenizer_of(server.model_path("tiny"))
    found = tool_syntax(tokenizer)
    assert found.parser_name == "json_tools" and (found.start, found.end) == ("<tool_call>", "</tool_call>")
    # What the forced-tool-call grammar writes, and the parser reads back.
    prefix, suffix = tool_call_format(tokenizer)
    assert (prefix, suffix) == ("<tool_call>\n", "\n</tool_call>")
    call = prefix + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}) + suffix
    assert run(call, 1) == ("", "", [("get_weather", {"city": "Paris"})])
    # A per-model setting can force another family's parser.
    assert tool_syntax(tokenizer, "qwen3_coder").parser_name == "qwen3_coder"
    assert tool_call_format(tokenizer, "qwen3_coder") is None  # XML, not one JSON object


def test_prompt_that_ends_inside_thinking(server):
    tokenizer = tokenizer_of(server.model_path(SCRIPTED))
    closed = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           enable_thinking=False)
    assert not starts_in_reasoning(tokenizer, closed)  # "<think>\n\n</think>\n\n" closes it
    opened = closed + tokenizer.encode("<think>\n")
    assert starts_in_reasoning(tokenizer, opened)
