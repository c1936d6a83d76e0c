"""Tool calling and reasoning in chat completions, and forced tool calls in all three APIs:
the scripted model's known output parsed into `reasoning_content`, `content` and `tool_calls`
(streamed as deltas too), tools and tool-call history rendered by the model's template, and
a random model forced by `tool_choice` into a call that parses and validates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from conftest import SCRIPTED, tokenizer_of
from sse_client import call, post_events

from omlx.api.assistant_turn import AssistantTurn
from omlx.api.conversation import Conversation, ToolChoice

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": PARAMETERS}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
MARKUP = ("<think>", "</think>", "<tool_call>", "</tool_call>")


def render(server, model: str, messages: list[dict], **kwargs) -> list[int]:
    tokenizer = tokenizer_of(server.model_path(model))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))


def test_tool_call_reasoning_and_content(client, server):
    r = client.chat.completions.create(model=SCRIPTED, messages=QUESTION, tools=[WEATHER], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking the weather now."
    assert choice.message.model_extra["reasoning_content"] == "I should look it up."
    [tool_call] = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "days": 2}
    assert r.usage.prompt_tokens == len(render(server, SCRIPTED, QUESTION, tools=[WEATHER]))
    assert r.usage.completion_tokens == 9


def test_streamed_tool_call_deltas(client, server):
    chunks = list(client.chat.completions.create(model=SCRIPTED, messages=QUESTION, tools=[WEATHER], temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert reasoning == "I should look it up."
    assert content == "Checking the weather now."
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == 9
    # No markup anywhere on the wire.
    raw = post_events(server.base_url + "/chat/completions", {
        "model": SCRIPTED, "messages": QUESTION, "tools": [WEATHER], "temperature": 0, "stream": True})
    text = json.dumps([data for _, data in raw])
    assert not any(marker in text for marker in MARKUP)


def test_history_with_tool_calls_and_results_is_rendered(client, server):
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "snow"},
    ]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], temperature=0, max_tokens=2)
    expected = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "snow"},
    ]
    assert r.usage.prompt_tokens == len(render(server, "tiny", expected, tools=[WEATHER]))


def test_tool_choice_none_and_no_tools_leave_markup_as_text(client, server):
    for extra in ({"tools": [WEATHER], "tool_choice": "none"}, {}):
        r = client.chat.completions.create(model=SCRIPTED, messages=QUESTION, temperature=0, **extra)
        message = r.choices[0].message
        assert r.usage.prompt_tokens == len(render(server, SCRIPTED, QUESTION))  # no tools offered
        assert message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert message.content.startswith("Checking the weather now.<tool_call>")
        assert message.model_extra["reasoning_content"] == "I should look it up."


def test_enable_thinking_reaches_the_template(client, server):
    r = client.chat.completions.create(model=SCRIPTED, messages=QUESTION, temperature=0, max_tokens=3,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.usage.prompt_tokens == len(render(server, SCRIPTED, QUESTION, enable_thinking=False))
    assert r.choices[0].message.model_extra["reasoning_content"] == "I should look it up."
    assert r.choices[0].message.content == ""
    assert r.choices[0].finish_reason == "length"


def test_parallel_tool_calls_false_keeps_the_first_call():
    """AssistantTurn on a stand-in stream (the scripted model makes one call only): mlx-lm's
    Hermes parser is real, the engine is not needed."""
    import mlx_lm.tool_parsers.json_tools as json_tools

    tokenizer = SimpleNamespace(has_thinking=False, has_tool_calling=True, tool_call_start="<tool_call>",
                                tool_call_end="</tool_call>", tool_parser=json_tools.parse_tool_call)
    choice = SimpleNamespace(index=0, finish_reason=None)
    stream = SimpleNamespace(loaded=SimpleNamespace(tokenizer=tokenizer), choices=[choice])
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "B"}}\n</tool_call>')
    for parallel, cities in ((True, ["A", "B"]), (False, ["A"])):
        turn = AssistantTurn(stream, [], Conversation(QUESTION, [WEATHER], ToolChoice("auto"), parallel))
        choice.finish_reason = None
        events = [e for i in range(0, len(text), 9) for e in turn.feed(choice, text[i:i + 9])]
        choice.finish_reason = "stop"
        events += turn.feed(choice, "")
        assert [json.loads(e.call.arguments)["city"] for e in events] == cities
        assert [json.loads(c.arguments)["city"] for c in turn.tool_calls()] == cities
        assert turn.finish_reason() == "tool_calls"


# ---------------------------------------------------------------------------- forced calls

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}
SCHEMAS = {"get_weather": PARAMETERS, "get_time": TIME["function"]["parameters"]}


def check_call(name: str, arguments, allowed: set[str]) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, SCHEMAS[name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_forced_tool_call_in_chat(client, tool_choice, stream):
    """A random model cannot call a tool by itself; forced, its call parses and validates."""
    allowed = {"get_weather", "get_time"} if tool_choice == "required" else {"get_time"}
    kwargs = dict(model="tiny", messages=QUESTION, tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=0,
                  max_tokens=300, extra_body={"thinking_budget": 0})
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        [tool_call] = choice.message.tool_calls
        check_call(tool_call.function.name, tool_call.function.arguments, allowed)
    else:
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
        check_call(calls[0].function.name, calls[0].function.arguments, allowed)


def test_forced_tool_call_in_anthropic_and_responses(server, anthropic_client, client):
    anthropic_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
    for tool_choice, allowed in (({"type": "any"}, {"get_weather", "get_time"}), ({"type": "tool", "name": "get_time"}, {"get_time"})):
        r = anthropic_client.messages.create(
            model="tiny", max_tokens=300, messages=QUESTION, tools=anthropic_tools, tool_choice=tool_choice,
            thinking={"type": "enabled", "budget_tokens": 1}, extra_body={"temperature": 0})
        assert r.stop_reason == "tool_use"
        [tool_use] = [b for b in r.content if b.type == "tool_use"]
        check_call(tool_use.name, tool_use.input, allowed)

    responses_tools = [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]
    r = client.responses.create(model="tiny", input="weather?", tools=responses_tools, tool_choice="required",
                                temperature=0, max_output_tokens=300, extra_body={"thinking_budget": 0})
    [call_item] = [i for i in r.output if i.type == "function_call"]
    check_call(call_item.name, call_item.arguments, {"get_weather", "get_time"})


# ---------------------------------------------------------------------------- errors

OK = {"model": "tiny", "messages": QUESTION, "max_tokens": 2}
ERROR_CASES = [
    ("tools-not-list", {**OK, "tools": {"a": 1}}, "tools"),
    ("tool-not-function", {**OK, "tools": [{"type": "retrieval"}]}, "tools[0]"),
    ("tool-without-name", {**OK, "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    ("tool-choice-unknown-tool", {**OK, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ("tool-choice-required-no-tools", {**OK, "tool_choice": "required"}, "tool_choice"),
    ("tool-choice-garbage", {**OK, "tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ("parallel-not-bool", {**OK, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("tool-message-without-id", {**OK, "messages": [*QUESTION, {"role": "tool", "content": "x"}]},
     "messages[1].tool_call_id"),
    ("tool-call-arguments-not-json", {**OK, "messages": [*QUESTION, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_tool_input_is_a_400(server, case):
    _, body, param = case
    status, got, _ = call(server.base_url + "/chat/completions", "POST", body)
    assert status == 400, got
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["param"] == param and got["error"]["type"] == "invalid_request_error"


def test_sdk_error_for_bad_tools(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert exc.value.param == "tool_choice"
