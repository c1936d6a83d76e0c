"""Forced tool calls: tool_choice "required" or a named function makes even a random model
return a call, in the model's own tool-call format, whose arguments validate against the
tool's JSON schema."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import load_reference

from omlx.constrained import for_request, tool_call_grammar
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "number"}, "note": {"type": "string"}},
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "what is the weather in the city, and what is two plus three?"}]


class Choice:
    def __init__(self, mode, name=None):
        self.mode, self.name = mode, name


def test_grammar_text_for_the_hermes_format():
    lark = tool_call_grammar(TOOLS, "add", ("<tool_call>\n", "\n</tool_call>"), {"<tool_call>": 5, "</tool_call>": 6})
    first = lark.splitlines()[0]
    assert first == 'start: <[5]> "\\n" call "\\n" <[6]>'
    schema = json.loads(lark.splitlines()[1].removeprefix("call: %json "))
    assert schema["properties"]["name"] == {"const": "add"}
    assert schema["properties"]["arguments"] == ADD


@pytest.mark.parametrize("forced", [None, "get_weather", "add"])
@pytest.mark.slow
def test_engine_output_is_one_valid_call(model_dir, forced):
    model, tokenizer = load_reference(model_dir / "tiny")
    engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=300), 4096)
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = for_request(tokenizer, tools=TOOLS, tool_choice=Choice("function" if forced else "required", forced))
    for i in range(4):
        engine.add_request(GenerationRequest(str(i), [11, 42, 97, 5 + i], 200, SamplingParams(temperature=1.0, seed=i), eos,
                                             constraint=constraint))
    out = {str(i): [] for i in range(4)}
    while engine.has_work:
        for rid, event in engine.step():
            if event.token_id is not None:
                out[rid].append(event.token_id)
            if event.finish_reason is not None:
                assert event.finish_reason.value == "stop"
    names = set()
    for tokens in out.values():
        text = tokenizer.decode(tokens).split("</think>")[-1].lstrip(" \n")
        assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>"), text
        call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        assert set(call) == {"name", "arguments"}
        names.add(call["name"])
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    if forced:
        assert names == {forced}
    assert engine.blocks.leaked_blocks() == []


# ---------------------------------------------------------------------------- API


def _check_call(tool_call, allowed: set[str]) -> str:
    assert tool_call.type == "function"
    assert tool_call.function.name in allowed
    jsonschema.validate(json.loads(tool_call.function.arguments), SCHEMAS[tool_call.function.name])
    return tool_call.function.name


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_named_function_is_called(client, model):
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=150,
            tool_choice={"type": "function", "function": {"name": "add"}},
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0], {"add"})


def test_required_calls_one_of_the_tools(client):
    names = set()
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=150,
        )
        assert r.choices[0].finish_reason == "tool_calls"
        names.add(_check_call(r.choices[0].message.tool_calls[0], {"add", "get_weather"}))
    assert names <= {"add", "get_weather"}


def test_forced_call_streams(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=4, max_tokens=150, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function.name:
                    call["name"] += delta.function.name
                if delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_uncompilable_tool_schema_is_400(client):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=bad, tool_choice="required", max_tokens=20)
    assert info.value.status_code == 400
    # Without forcing, the schema is never compiled: the model just sees the tool.
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=bad, max_tokens=5)
    assert r.choices
