"""The OpenAI Responses API end to end: a real `omlx serve`, the official `openai` SDK (and raw
SSE for the event sequence), random tiny models compared token-exactly with mlx-lm, the
scripted model for reasoning and function calls, and a stored response surviving a restart."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import SCRIPTED, chat_prompt_ids, decode, reference_greedy, tokenizer_of
from omlx_process import omlx_server
from sse_client import call, post_events

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]},
}
WEATHER_FUNCTION = {"type": "function", "function": {
    "name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["parameters"]}}
SCRIPTED_CALL = {"city": "Paris", "days": 2}


def render(server, model: str, messages: list[dict], **kwargs) -> list[int]:
    tokenizer = tokenizer_of(server.model_path(model))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))


# ---------------------------------------------------------------------------- plain text


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_plain_response_matches_reference(client, server, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "tell me about the night"}]
    path = server.model_path(model)
    prompt = chat_prompt_ids(path, messages)
    tokens, eos = reference_greedy(path, prompt, 20)
    r = client.responses.create(model=model, instructions="Be brief.", input="tell me about the night",
                                temperature=0, max_output_tokens=20)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model
    assert r.output_text == decode(path, tokens)
    assert [item.type for item in r.output] == ["message"]
    assert r.output[0].role == "assistant" and r.output[0].status == "completed"
    assert r.status == ("completed" if eos else "incomplete")
    if not eos:
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == len(prompt)
    assert r.usage.output_tokens == len(tokens) + (1 if eos else 0)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief."


def test_streaming_event_sequence(client, server):
    messages = [{"role": "user", "content": "write about the mountain"}]
    path = server.model_path("tiny")
    prompt = chat_prompt_ids(path, messages)
    tokens, eos = reference_greedy(path, prompt, 16)
    text = decode(path, tokens)
    events = post_events(server.base_url + "/responses", {
        "model": "tiny", "input": messages, "stream": True, "temperature": 0, "max_output_tokens": 16})
    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = names.count("response.output_text.delta")
    assert deltas >= 1
    final = "response.completed" if eos else "response.incomplete"
    assert names == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done", final,
    ]
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    item_id = events[2][1]["item"]["id"]
    assert all(data.get("item_id", item_id) == item_id for _, data in events[2:-1])
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == text
    assert events[-4][1]["text"] == text
    done = events[-1][1]["response"]
    assert done["output"][0]["content"][0]["text"] == text
    assert done["usage"]["input_tokens"] == len(prompt)

    # The SDK's stream helper assembles the same response.
    with client.responses.stream(model="tiny", input=messages, temperature=0, max_output_tokens=16) as stream:
        got = list(stream)
        if eos:
            assert stream.get_final_response().output_text == text
    assert "".join(e.delta for e in got if e.type == "response.output_text.delta") == text


# ---------------------------------------------------------------------------- reasoning and function calls


def test_reasoning_message_and_function_call(client, server):
    r = client.responses.create(model=SCRIPTED, input="What is the weather in Paris?", tools=[WEATHER],
                                temperature=0, instructions="Use tools.")
    assert [item.type for item in r.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call_item = r.output
    assert reasoning.content[0].text == "I should look it up."
    assert r.output_text == "Checking the weather now."
    assert call_item.name == "get_weather" and json.loads(call_item.arguments) == SCRIPTED_CALL
    assert call_item.call_id.startswith("call_") and call_item.id.startswith("fc_")
    assert r.status == "completed"
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    expected = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is the weather in Paris?"}]
    assert r.usage.input_tokens == len(render(server, SCRIPTED, expected, tools=[WEATHER_FUNCTION]))


def test_streamed_reasoning_and_function_call(server):
    events = post_events(server.base_url + "/responses", {
        "model": SCRIPTED, "input": "weather?", "tools": [WEATHER], "stream": True, "temperature": 0})
    names = [name for name, _ in events]
    assert names == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    assert [d["output_index"] for n, d in events if n == "response.output_item.added"] == [0, 1, 2]
    assert events[4][1]["delta"] == "I should look it up."
    assert events[10][1]["delta"] == "Checking the weather now."
    assert events[14][1]["item"]["type"] == "function_call" and events[14][1]["item"]["arguments"] == ""
    assert json.loads(events[16][1]["arguments"]) == SCRIPTED_CALL
    assert events[17][1]["item"]["status"] == "completed"
    assert [i["type"] for i in events[-1][1]["response"]["output"]] == ["reasoning", "message", "function_call"]


def test_previous_response_id_continues_the_conversation(client, server):
    first = client.responses.create(model=SCRIPTED, input="What is the weather in Paris?", tools=[WEATHER],
                                    temperature=0, instructions="Old instructions.")
    call_item = first.output[-1]
    second = client.responses.create(
        model=SCRIPTED, previous_response_id=first.id, tools=[WEATHER], temperature=0,
        instructions="New instructions.",
        input=[{"type": "function_call_output", "call_id": call_item.call_id, "output": "sunny, 21 C"}],
    )
    assert second.previous_response_id == first.id
    # The earlier turns come back from the store; the instructions are this request's own.
    expected = [
        {"role": "system", "content": "New instructions."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Checking the weather now.", "reasoning_content": "I should look it up.",
         "tool_calls": [{"id": call_item.call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": SCRIPTED_CALL}}]},
        {"role": "tool", "tool_call_id": call_item.call_id, "content": "sunny, 21 C"},
    ]
    assert second.usage.input_tokens == len(render(server, SCRIPTED, expected, tools=[WEATHER_FUNCTION]))

    # The same conversation sent whole, as input items, renders the same prompt.
    whole = client.responses.create(
        model=SCRIPTED, tools=[WEATHER], temperature=0, instructions="New instructions.", store=False,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "I should look it up."}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Checking the weather now."}]},
            {"type": "function_call", "call_id": call_item.call_id, "name": "get_weather",
             "arguments": call_item.arguments},
            {"type": "function_call_output", "call_id": call_item.call_id, "output": "sunny, 21 C"},
        ],
    )
    assert whole.usage.input_tokens == second.usage.input_tokens


def test_retrieve_delete_and_store_false(client):
    stored = client.responses.create(model="tiny", input="hello", temperature=0, max_output_tokens=4)
    again = client.responses.retrieve(stored.id)
    assert again.id == stored.id and again.output_text == stored.output_text and again.usage == stored.usage
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(stored.id)

    unstored = client.responses.create(model="tiny", input="hello", temperature=0, max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="tiny", input="hi", previous_response_id=unstored.id)
    assert exc.value.param == "previous_response_id"


def test_stored_responses_survive_a_restart(model_dir, tmp_path):
    """Same OMLX_HOME, a new server process: the stored response is there, and continues."""
    with omlx_server(model_dir, tmp_path, "--kv-cache-gb", "0.05") as first_server:
        with openai.OpenAI(base_url=first_server.base_url, api_key="x", max_retries=0) as c:
            first = c.responses.create(model="tiny", input="remember the blue river", temperature=0,
                                       max_output_tokens=6)
    with omlx_server(model_dir, tmp_path, "--kv-cache-gb", "0.05") as second_server:
        with openai.OpenAI(base_url=second_server.base_url, api_key="x", max_retries=0) as c:
            again = c.responses.retrieve(first.id)
            assert again.output_text == first.output_text and again.usage == first.usage
            follow = c.responses.create(model="tiny", input="and then?", previous_response_id=first.id,
                                        temperature=0, max_output_tokens=2)
            assert follow.usage.input_tokens > first.usage.input_tokens
    assert list((tmp_path / "home" / "responses").glob("resp_*.json"))
    assert not list((tmp_path / "home" / "responses").glob(".tmp-*"))  # atomic writes leave nothing


def test_codex_request_shape(server):
    """What `codex exec` sends: streamed, store false, developer-role instructions, function
    tools next to web_search and namespace tools, reasoning summary, include, cache keys."""
    body = {
        "model": SCRIPTED,
        "instructions": "You are Codex.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the weather?"}]},
        ],
        "tools": [
            WEATHER,
            {"type": "web_search", "external_web_access": False},
            {"type": "namespace", "name": "mcp__files", "description": "files",
             "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}]},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "019a-session",
        "client_metadata": {"originator": "codex_exec"},
        "text": {"verbosity": "low"},
    }
    events = post_events(server.base_url + "/responses", body)
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    done = events[-1][1]["response"]
    calls = [i for i in done["output"] if i["type"] == "function_call"]
    assert [c["name"] for c in calls] == ["get_weather"]
    expected = [{"role": "system", "content": "You are Codex.\n\nSandbox: read-only."},
                {"role": "user", "content": "What is the weather?"}]
    assert done["usage"]["input_tokens"] == len(render(server, SCRIPTED, expected, tools=[WEATHER_FUNCTION]))


ERROR_CASES = [
    ("missing-input", {"model": "tiny"}, 400, "input"),
    ("input-number", {"model": "tiny", "input": 5}, 400, "input"),
    ("image-input", {"model": "tiny", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]}, 400, "input[0].content[0]"),
    ("unknown-item", {"model": "tiny", "input": [{"type": "teleport"}]}, 400, "input[0]"),
    ("bad-role", {"model": "tiny", "input": [{"role": "wizard", "content": "hi"}]}, 400, "input[0]"),
    ("bad-arguments", {"model": "tiny", "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{not json"}]}, 400, "input[0].arguments"),
    ("unknown-previous", {"model": "tiny", "input": "hi", "previous_response_id": "resp_doesnotexist"}, 400,
     "previous_response_id"),
    ("tool-choice-unknown", {"model": "tiny", "input": "hi", "tools": [WEATHER],
                             "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ("bad-format", {"model": "tiny", "input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ("unknown-model", {"model": "no-such-model", "input": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_have_openai_shape(server, case):
    _, body, status, param = case
    got_status, got, _ = call(server.base_url + "/responses", "POST", body)
    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["param"] == param and got["error"]["message"]


def test_unknown_response_ids(server):
    for method in ("GET", "DELETE"):
        for response_id in ("resp_nothere", "../../etc/passwd", "x" * 300):
            status, body, _ = call(server.base_url + "/responses/" + response_id, method)
            assert status == 404 and "error" in body, (method, response_id, body)
