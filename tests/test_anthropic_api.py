"""The Anthropic Messages API end to end: a real `omlx serve`, the official `anthropic` SDK (and
raw SSE where the exact event sequence matters), random tiny models compared token-exactly
with mlx-lm, and the scripted model for thinking and tool use."""

from __future__ import annotations

import anthropic
import pytest
from conftest import SCRIPTED, chat_prompt_ids, decode, reference_greedy, tokenizer_of
from sse_client import call, post_events

GREEDY = {"temperature": 0}  # the SDK no longer takes sampling arguments; the API still does
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                     "required": ["city"]},
}
# The same tool as the chat template sees it.
WEATHER_FUNCTION = {"type": "function", "function": {
    "name": "get_weather", "description": WEATHER_TOOL["description"], "parameters": WEATHER_TOOL["input_schema"]}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def render(server, model: str, messages: list[dict], **kwargs) -> list[int]:
    """The prompt ids the model's chat template gives (what the server must have rendered)."""
    tokenizer = tokenizer_of(server.model_path(model))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))


def input_tokens(usage) -> int:
    # Anthropic reports cached prompt tokens apart from the rest.
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def reference(server, model: str, messages: list[dict], max_tokens: int):
    path = server.model_path(model)
    prompt = chat_prompt_ids(path, messages)
    tokens, eos = reference_greedy(path, prompt, max_tokens)
    return prompt, tokens, eos, decode(path, tokens)


# ---------------------------------------------------------------------------- plain text


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_plain_message_matches_reference(anthropic_client, server, model):
    system = "You are terse."
    prompt, tokens, eos, text = reference(server, model, [{"role": "system", "content": system}, *QUESTION], 24)
    r = anthropic_client.messages.create(model=model, max_tokens=24, system=system, messages=QUESTION, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.model == model
    assert r.id.startswith("msg_")
    assert [b.type for b in r.content] == (["text"] if text else [])
    assert "".join(b.text for b in r.content) == text
    assert r.stop_reason == ("end_turn" if eos else "max_tokens")
    assert r.stop_sequence is None
    assert input_tokens(r.usage) == len(prompt)
    assert r.usage.output_tokens == len(tokens) + (1 if eos else 0)


def test_repeated_prompt_reads_the_prefix_cache(anthropic_client, server):
    system = [{"type": "text", "text": "Cached system prompt. " + "tell me about the river " * 12,
               "cache_control": {"type": "ephemeral"}}]
    first = anthropic_client.messages.create(model="tiny", max_tokens=4, system=system, messages=QUESTION, extra_body=GREEDY)
    second = anthropic_client.messages.create(model="tiny", max_tokens=4, system=system, messages=QUESTION, extra_body=GREEDY)
    assert second.usage.cache_read_input_tokens > 0
    assert input_tokens(first.usage) == input_tokens(second.usage)
    assert second.usage.input_tokens < first.usage.input_tokens
    assert first.content == second.content


def test_streaming_event_sequence(anthropic_client, server):
    """Raw events, exactly as Claude Code reads them (query string and beta headers included)."""
    messages = [{"role": "user", "content": "tell me about the city and the river"}]
    prompt, tokens, eos, text = reference(server, "tiny", messages, 30)
    assert text
    events = post_events(
        server.root + "/v1/messages?beta=true",
        {"model": "tiny", "max_tokens": 30, "messages": messages, "stream": True, "temperature": 0},
        {"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"},
    )
    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "ping", "content_block_start"] + ["content_block_delta"] * deltas + [
        "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] == len(prompt)
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    streamed = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert all(data["delta"]["type"] == "text_delta" and data["index"] == 0
               for name, data in events if name == "content_block_delta")
    assert streamed == text
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn" if eos else "max_tokens", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == len(tokens) + (1 if eos else 0)

    # The SDK's own accumulation agrees.
    with anthropic_client.messages.stream(model="tiny", max_tokens=30, messages=messages, extra_body=GREEDY) as stream:
        message = stream.get_final_message()
    assert message.content[0].text == text


# ---------------------------------------------------------------------------- stop sequences


def test_stop_sequences(anthropic_client, server):
    for i in range(20):
        messages = [{"role": "user", "content": f"write about the dog and the cat {i}"}]
        _, _, _, text = reference(server, "tiny-llama", messages, 40)
        stop = next((text[j:j + 3] for j in range(len(text) // 2, len(text) - 3)
                     if "\ufffd" not in text[j:j + 3] and text[j:j + 3].strip()), None)
        if stop:
            break
    else:
        pytest.fail("no reference answer long enough for a stop sequence")
    r = anthropic_client.messages.create(model="tiny-llama", max_tokens=40, messages=messages,
                                         stop_sequences=["never-appears", stop], extra_body=GREEDY)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == text[: text.index(stop)]

    with anthropic_client.messages.stream(model="tiny-llama", max_tokens=40, messages=messages,
                                          stop_sequences=[stop], extra_body=GREEDY) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[: text.index(stop)]


# ---------------------------------------------------------------------------- thinking and tools


def test_thinking_text_and_tool_use(anthropic_client, server):
    r = anthropic_client.messages.create(model=SCRIPTED, max_tokens=100, messages=QUESTION, tools=[WEATHER_TOOL],
                                         thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool_use = r.content
    assert thinking.thinking == "I should look it up."
    assert text.text == "Checking the weather now."
    assert tool_use.name == "get_weather" and tool_use.input == {"city": "Paris", "days": 2}
    assert tool_use.id.startswith("toolu_")
    assert r.stop_reason == "tool_use"
    assert input_tokens(r.usage) == len(render(server, SCRIPTED, QUESTION, tools=[WEATHER_FUNCTION], enable_thinking=True))
    assert r.usage.output_tokens == 9  # 8 scripted tokens and the end of turn


def test_streamed_thinking_text_and_tool_use(server):
    events = post_events(server.root + "/v1/messages", {
        "model": SCRIPTED, "max_tokens": 100, "messages": QUESTION, "tools": [WEATHER_TOOL], "stream": True,
        "temperature": 0,
    })
    shape = [(name, data.get("index"), (data.get("content_block") or data.get("delta") or {}).get("type"))
             for name, data in events]
    assert shape == [
        ("message_start", None, None), ("ping", None, None),
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None), ("message_stop", None, None),
    ]
    by_index = {data["index"]: data for name, data in events if name == "content_block_delta"}
    assert events[3][1]["delta"]["thinking"] == "I should look it up."
    assert by_index[1]["delta"]["text"] == "Checking the weather now."
    assert events[9][1]["content_block"]["name"] == "get_weather" and events[9][1]["content_block"]["input"] == {}
    assert by_index[2]["delta"]["partial_json"] == '{"city": "Paris", "days": 2}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["output_tokens"] == 9


def test_tool_use_round_trip(anthropic_client, server):
    first = anthropic_client.messages.create(model=SCRIPTED, max_tokens=100, messages=QUESTION, tools=[WEATHER_TOOL],
                                             extra_body=GREEDY)
    tool_use = first.content[-1]
    history = [
        *QUESTION,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_use.id, "content": [{"type": "text", "text": "sunny, 21 C"}]},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]
    second = anthropic_client.messages.create(model=SCRIPTED, max_tokens=100, messages=history, tools=[WEATHER_TOOL],
                                              extra_body=GREEDY)
    assert second.stop_reason == "tool_use"  # the scripted model always answers the same way
    # The history reached the template as the model family writes it: reasoning, text and the
    # call in the assistant turn, the result as a tool message, then the user's text.
    expected = [
        *QUESTION,
        {"role": "assistant", "content": "Checking the weather now.", "reasoning_content": "I should look it up.",
         "tool_calls": [{"id": tool_use.id, "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "tool_call_id": tool_use.id, "content": "sunny, 21 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert input_tokens(second.usage) == len(render(server, SCRIPTED, expected, tools=[WEATHER_FUNCTION]))
    count = anthropic_client.messages.count_tokens(model=SCRIPTED, messages=history, tools=[WEATHER_TOOL])
    assert count.input_tokens == input_tokens(second.usage)


def test_tool_choice_none_hides_the_tools(anthropic_client, server):
    r = anthropic_client.messages.create(model=SCRIPTED, max_tokens=100, messages=QUESTION, tools=[WEATHER_TOOL],
                                         tool_choice={"type": "none"}, extra_body=GREEDY)
    assert input_tokens(r.usage) == len(render(server, SCRIPTED, QUESTION))
    # With no tools offered, call markup is only text; it is what the model said.
    assert r.stop_reason == "end_turn"
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[1].text.startswith("Checking the weather now.<tool_call>")


def test_thinking_switch_reaches_the_template(anthropic_client, server):
    def count(thinking):
        extra = {"thinking": thinking} if thinking else {}
        return anthropic_client.messages.count_tokens(model="tiny", messages=QUESTION, **extra).input_tokens

    assert count({"type": "disabled"}) == len(render(server, "tiny", QUESTION, enable_thinking=False))
    assert count({"type": "adaptive"}) == len(render(server, "tiny", QUESTION, enable_thinking=True))
    assert count({"type": "enabled", "budget_tokens": 2048}) == count(None) == count({"type": "adaptive"})
    assert count({"type": "disabled"}) > count(None)  # the template closed an empty think block


def test_count_tokens_with_system_blocks_and_system_message(anthropic_client, server):
    r = anthropic_client.messages.count_tokens(
        model="tiny", system=[{"type": "text", "text": "First."}, {"type": "text", "text": "Second."}],
        messages=[{"role": "system", "content": "Third."}, *QUESTION],
    )
    expected = [{"role": "system", "content": "First.\n\nSecond.\n\nThird."}, *QUESTION]
    assert r.input_tokens == len(render(server, "tiny", expected))


# ---------------------------------------------------------------------------- Claude Code


def test_claude_code_request_shape(server):
    """What `claude -p` sends: a probe of the base URL, then a streamed request with a 32000
    max_tokens (more than the tiny model's context: capped, not refused), adaptive thinking,
    a system message inside `messages`, server tools and many fields a local model ignores."""
    assert call(server.root + "/", "HEAD")[0] == 200
    assert call(server.root + "/")[0] == 200
    body = {
        "model": SCRIPTED,
        "max_tokens": 32000,
        "stream": True,
        "temperature": 1,
        "thinking": {"type": "adaptive"},
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "system", "content": "Extra system context."},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather?", "cache_control": {"type": "ephemeral"}}]},
        ],
        "tools": [WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "user_abc_account_123_session_xyz"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"}
    events = post_events(server.root + "/v1/messages?beta=true", body, headers)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    tool_starts = [d["content_block"] for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use"]
    assert [t["name"] for t in tool_starts] == ["get_weather"]


# ---------------------------------------------------------------------------- errors

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
OK = {"model": "tiny", "max_tokens": 4, "messages": QUESTION}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


ERROR_CASES = [
    ("malformed-json", "POST", "/v1/messages", b'{"model": "tiny", "messages": [', 400, "invalid_request_error"),
    ("body-not-object", "POST", "/v1/messages", [1, 2], 400, "invalid_request_error"),
    ("missing-max-tokens", "POST", "/v1/messages", without(OK, "max_tokens"), 400, "invalid_request_error"),
    ("missing-messages", "POST", "/v1/messages", without(OK, "messages"), 400, "invalid_request_error"),
    ("max-tokens-zero", "POST", "/v1/messages", {**OK, "max_tokens": 0}, 400, "invalid_request_error"),
    ("bad-role", "POST", "/v1/messages", {**OK, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request_error"),
    ("image-for-text-model", "POST", "/v1/messages",
     {**OK, "messages": [{"role": "user", "content": [IMAGE, {"type": "text", "text": "what is it?"}]}]},
     400, "invalid_request_error"),
    ("image-in-tool-result", "POST", "/v1/messages",
     {**OK, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [IMAGE]}]}]},
     400, "invalid_request_error"),
    ("unknown-block", "POST", "/v1/messages",
     {**OK, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, 400, "invalid_request_error"),
    ("temperature-too-high", "POST", "/v1/messages", {**OK, "temperature": 1.5}, 400, "invalid_request_error"),
    ("stop-sequences-not-list", "POST", "/v1/messages", {**OK, "stop_sequences": "x"}, 400, "invalid_request_error"),
    ("tool-choice-unknown-tool", "POST", "/v1/messages",
     {**OK, "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error"),
    ("tool-choice-any-without-tools", "POST", "/v1/messages", {**OK, "tool_choice": {"type": "any"}}, 400,
     "invalid_request_error"),
    ("tool-without-name", "POST", "/v1/messages", {**OK, "tools": [{"input_schema": {}}]}, 400, "invalid_request_error"),
    ("bad-thinking", "POST", "/v1/messages", {**OK, "thinking": {"type": "sometimes"}}, 400, "invalid_request_error"),
    ("unknown-model", "POST", "/v1/messages", {**OK, "model": "no-such-model"}, 404, "not_found_error"),
    ("prompt-over-context", "POST", "/v1/messages",
     {**OK, "messages": [{"role": "user", "content": "cat" + " cat" * 4200}]}, 400, "invalid_request_error"),
    ("count-tokens-no-messages", "POST", "/v1/messages/count_tokens", {"model": "tiny"}, 400, "invalid_request_error"),
    ("count-tokens-unknown-model", "POST", "/v1/messages/count_tokens", {**OK, "model": "nope"}, 404, "not_found_error"),
    ("wrong-method", "GET", "/v1/messages", None, 405, "invalid_request_error"),
    ("unknown-subroute", "POST", "/v1/messages/batches", OK, 404, "not_found_error"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_have_anthropic_shape(server, case):
    _, method, path, body, status, kind = case
    got_status, got, headers = call(server.root + path, method, body)
    assert got_status == status, got
    assert headers["Content-Type"].startswith("application/json")
    assert set(got) == {"type", "error"} and got["type"] == "error"
    assert set(got["error"]) == {"type", "message"}
    assert got["error"]["type"] == kind and got["error"]["message"]


def test_sdk_raises_typed_errors_and_the_server_keeps_serving(anthropic_client, server):
    with pytest.raises(anthropic.NotFoundError) as exc:
        anthropic_client.messages.create(model="no-such-model", max_tokens=4, messages=QUESTION)
    assert exc.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as exc:
        anthropic_client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [IMAGE]}])
    assert "text only" in exc.value.body["error"]["message"]
    r = anthropic_client.messages.create(model="tiny", max_tokens=4, messages=QUESTION, extra_body=GREEDY)
    assert r.usage.output_tokens >= 1
    for name, m in server.health()["models_loaded"].items():
        assert m.get("running", 0) == 0


# ---------------------------------------------------------------------------- long streams


async def test_keepalive_pings_while_waiting_and_closes_the_source():
    import asyncio
    from contextlib import aclosing

    from omlx.api.sse import with_keepalive

    closed = []
    first_ready = asyncio.Event()  # set once three pings came: no race with the interval

    async def slow():
        try:
            await first_ready.wait()
            yield "first"
            await asyncio.Event().wait()  # nothing more, ever
            yield "never"
        finally:
            closed.append(True)

    got = []
    async with aclosing(with_keepalive(slow(), 0.05)) as items:
        async for item in items:
            got.append(item)
            if got.count(None) == 3:
                first_ready.set()
            if item == "first":
                break
    assert got[-1] == "first" and got.count(None) >= 3 and set(got[:-1]) == {None}
    assert closed == [True]  # leaving early closed the generation it wrapped


@pytest.mark.parametrize("route", ["messages", "responses"])
async def test_client_disconnect_mid_stream_frees_blocks(server, route):
    import asyncio
    import time

    import aiohttp

    model, max_tokens = "tiny-llama", 1500
    path = server.model_path(model)
    for i in range(20):
        messages = [{"role": "user", "content": f"write a long story about the river, part {i}"}]
        if not reference_greedy(path, chat_prompt_ids(path, messages), max_tokens)[1]:
            break
    else:
        pytest.fail("no prompt runs to max_tokens without EOS")
    if route == "messages":
        url, body = server.root + "/v1/messages", {"model": model, "max_tokens": max_tokens, "messages": messages}
    else:
        url, body = server.base_url + "/responses", {"model": model, "max_output_tokens": max_tokens, "input": messages}
    body.update(stream=True, temperature=0)
    before = server.health()["models_loaded"].get(model, {}).get("generated_tokens", 0)  # 0 until loaded
    async with aiohttp.ClientSession() as session:
        response = await session.post(url, json=body)
        assert response.status == 200
        deltas = 0
        async for line in response.content:
            deltas += b"_delta" in line or b".delta" in line
            if deltas >= 3:
                break
        assert server.health()["models_loaded"][model]["running"] == 1
        response.close()
    deadline = time.monotonic() + 10
    while True:
        health = server.health()["models_loaded"][model]
        if health["running"] == 0 and health["kv_cache"]["used_blocks"] == 0:
            break
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.05)
    assert health["generated_tokens"] - before < max_tokens // 2
