"""Bad requests get OpenAI-shaped errors with the right status, and never disturb the server
or the generations already in flight."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from conftest import CONTEXT_WINDOW, chat_prompt_ids, decode, reference_greedy, tokenizer_of

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ANY = object()


def chat(**overrides) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    body.update(overrides)
    return body


def completion(**overrides) -> dict:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    body.update(overrides)
    return body


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# A prompt of more than CONTEXT_WINDOW tokens: " cat" is one token of the tiny tokenizer
# (checked in the test that uses it).
LONG_TEXT = "cat" + " cat" * (CONTEXT_WINDOW + 100)

# (id, method, path, json body or raw bytes, status, param, code)
CASES = [
    ("malformed-json", "POST", CHAT, b'{"model": "tiny", "messages": [', 400, None, ANY),
    ("empty-body", "POST", CHAT, b"", 400, None, ANY),
    ("body-is-list", "POST", CHAT, [1, 2, 3], 400, None, ANY),
    ("body-is-string", "POST", COMPLETIONS, "hello", 400, None, ANY),
    ("missing-model", "POST", CHAT, without(chat(), "model"), 400, "model", "missing_required_parameter"),
    ("model-not-string", "POST", CHAT, chat(model=123), 400, "model", ANY),
    ("unknown-model", "POST", CHAT, chat(model="no-such-model"), 404, "model", "model_not_found"),
    ("unknown-model-stream", "POST", CHAT, chat(model="no-such-model", stream=True), 404, "model", "model_not_found"),
    ("unknown-model-completions", "POST", COMPLETIONS, completion(model="nope/nope"), 404, "model", "model_not_found"),
    ("missing-messages", "POST", CHAT, without(chat(), "messages"), 400, "messages", ANY),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, "messages", ANY),
    ("messages-not-list", "POST", CHAT, chat(messages="hello"), 400, "messages", ANY),
    ("message-not-object", "POST", CHAT, chat(messages=["hello"]), 400, "messages[0]", ANY),
    ("bad-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", ANY),
    ("missing-role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role", ANY),
    ("content-number", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content", ANY),
    ("content-part-no-type", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]),
     400, "messages[0].content", ANY),
    ("image-part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [
         {"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
     ]}]),
     400, "messages[0].content", "unsupported_content"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("temperature-too-high", "POST", CHAT, chat(temperature=3.5), 400, "temperature", "invalid_value"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="ten"), 400, "max_tokens", "invalid_type"),
    ("max-tokens-fraction", "POST", CHAT, chat(max_tokens=2.5), 400, "max_tokens", "invalid_type"),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens", "invalid_value"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max-tokens-over-context", "POST", CHAT, chat(max_tokens=CONTEXT_WINDOW + 1), 400, "max_tokens", "invalid_value"),
    ("max-completion-tokens-over-context", "POST", CHAT,
     without(chat(max_completion_tokens=10 * CONTEXT_WINDOW), "max_tokens"), 400, "max_completion_tokens", "invalid_value"),
    ("max-tokens-over-context-completions", "POST", COMPLETIONS, completion(max_tokens=CONTEXT_WINDOW + 1),
     400, "max_tokens", "invalid_value"),
    ("stream-string", "POST", CHAT, chat(stream="yes"), 400, "stream", "invalid_type"),
    ("stream-options-string", "POST", CHAT, chat(stream=True, stream_options="usage"), 400, "stream_options", "invalid_type"),
    ("five-stop-strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("stop-number", "POST", CHAT, chat(stop=7), 400, "stop", "invalid_type"),
    ("stop-list-of-numbers", "POST", COMPLETIONS, completion(stop=[1, 2]), 400, "stop", "invalid_type"),
    ("logit-bias-non-integer-key", "POST", CHAT, chat(logit_bias={"abc": 5}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-negative-key", "POST", CHAT, chat(logit_bias={"-3": 5}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-value-too-big", "POST", CHAT, chat(logit_bias={"5": 500}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-not-object", "POST", CHAT, chat(logit_bias=[5]), 400, "logit_bias", "invalid_type"),
    ("top-p-too-big", "POST", CHAT, chat(top_p=1.5), 400, "top_p", "invalid_value"),
    ("seed-string", "POST", CHAT, chat(seed="abc"), 400, "seed", "invalid_type"),
    ("n-too-many", "POST", CHAT, chat(n=17), 400, "n", "invalid_value"),
    ("n-zero-completions", "POST", COMPLETIONS, completion(n=0), 400, "n", "invalid_value"),
    ("prompt-missing", "POST", COMPLETIONS, without(completion(), "prompt"), 400, "prompt", ANY),
    ("prompt-empty", "POST", COMPLETIONS, completion(prompt=""), 400, "prompt", ANY),
    ("prompt-negative-token", "POST", COMPLETIONS, completion(prompt=[1, -2, 3]), 400, "prompt", ANY),
    ("prompt-token-outside-vocab", "POST", COMPLETIONS, completion(prompt=[1, 10**6]), 400, "prompt", "invalid_value"),
    ("prompt-batch", "POST", COMPLETIONS, completion(prompt=["one", "two"]), 400, "prompt", ANY),
    ("suffix", "POST", COMPLETIONS, completion(suffix="tail"), 400, "suffix", "unsupported_value"),
    ("chat-prompt-over-context", "POST", CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}]),
     400, "messages", "context_length_exceeded"),
    ("completion-prompt-over-context", "POST", COMPLETIONS, completion(prompt=LONG_TEXT),
     400, "prompt", "context_length_exceeded"),
    ("completion-token-ids-over-context", "POST", COMPLETIONS, completion(prompt=[5] * (CONTEXT_WINDOW + 10)),
     400, "prompt", "context_length_exceeded"),
    ("unknown-route", "GET", "/v1/nothing-here", None, 404, None, ANY),
    ("unknown-route-post", "POST", "/v1/engines/tiny/completions", chat(), 404, None, ANY),
    ("wrong-method", "GET", CHAT, None, 405, None, ANY),
    ("unknown-model-card", "GET", "/v1/models/no-such-model", None, 404, "model", "model_not_found"),
]


async def send(session: aiohttp.ClientSession, root: str, method: str, path: str, body) -> tuple[int, object, str, bytes]:
    """(status, parsed JSON body or None, content type, raw body) of a raw request."""
    if isinstance(body, bytes):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
    elif body is None:
        kwargs = {}
    else:
        kwargs = {"json": body}
    async with session.request(method, root + path, **kwargs) as response:
        raw = await response.read()
        try:
            parsed = await response.json(content_type=None)
        except ValueError:
            parsed = None
        return response.status, parsed, response.content_type, raw


def check_error(case, status: int, body, content_type: str, raw: bytes) -> None:
    name, _, _, _, want_status, want_param, want_code = case
    assert status == want_status, (name, status, raw[:500])
    assert content_type == "application/json", (name, content_type)
    assert isinstance(body, dict) and set(body) == {"error"}, (name, raw[:500])
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, (name, error)
    assert isinstance(error["message"], str) and error["message"], (name, error)
    assert isinstance(error["type"], str) and error["type"], (name, error)
    assert error["param"] is None or isinstance(error["param"], str), (name, error)
    assert error["code"] is None or isinstance(error["code"], str), (name, error)
    if want_status == 404 and want_code != "model_not_found":
        assert error["type"] == "not_found_error", (name, error)
    elif want_status in (400, 404):
        assert error["type"] == "invalid_request_error", (name, error)
    if want_param is not ANY:
        assert error["param"] == want_param, (name, error)
    if want_code is not ANY:
        assert error["code"] == want_code, (name, error)


async def send_case(session, server, case):
    _, method, path, body, *_ = case
    return await send(session, server.root, method, path, body)


def test_long_text_exceeds_the_context(server):
    tokenizer = tokenizer_of(server.model_path("tiny"))
    assert len(tokenizer.encode(LONG_TEXT)) > CONTEXT_WINDOW


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_bad_request(server, case):
    async with aiohttp.ClientSession() as session:
        check_error(case, *await send_case(session, server, case))


async def test_server_still_serves_after_bad_requests(server):
    """All the bad requests at once, then a normal one: answered, and exactly."""
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(send_case(session, server, case) for case in CASES))
        for case, result in zip(CASES, results):
            check_error(case, *result)

        messages = [{"role": "user", "content": "tell me about the city"}]
        path = server.model_path("tiny")
        tokens, eos = reference_greedy(path, chat_prompt_ids(path, messages), 16)
        status, body, _, raw = await send(
            session, server.root, "POST", CHAT, {"model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 0}
        )
        assert status == 200, raw[:500]
        assert body["choices"][0]["message"]["content"] == decode(path, tokens)
        assert body["choices"][0]["finish_reason"] == ("stop" if eos else "length")
    for name, m in server.health()["models_loaded"].items():
        assert m["kv_cache"]["used_blocks"] == 0 and m["running"] == 0 and m["waiting"] == 0, (name, m)


async def test_bad_requests_do_not_disturb_a_stream_in_flight(async_client, server):
    model = "tiny-llama"
    path = server.model_path(model)
    max_tokens = 1500
    for i in range(20):
        messages = [{"role": "user", "content": f"write a long story about the river, part {i}"}]
        prompt_ids = chat_prompt_ids(path, messages)
        tokens, eos = reference_greedy(path, prompt_ids, max_tokens)
        if not eos:
            break
    else:
        pytest.fail("no prompt runs to max_tokens without EOS")
    expected = decode(path, tokens)

    stream = await async_client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True
    )
    parts: list[str] = []
    finish = None
    chunks = aiter(stream)
    first = await anext(chunks)
    parts.append(first.choices[0].delta.content or "")

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(send_case(session, server, case) for case in CASES))
    for case, result in zip(CASES, results):
        check_error(case, *result)
    # The bad requests really did arrive while the generation was running.
    assert server.health()["models_loaded"][model]["running"] == 1

    async for chunk in chunks:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == expected
    assert finish == "length"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404
    assert exc.value.code == "model_not_found" and exc.value.param == "model"

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", stream=True)

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=17)
    assert exc.value.status_code == 400 and exc.value.param == "n"

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stop=["a", "b", "c", "d", "e"]
        )
    assert exc.value.param == "stop"

    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=LONG_TEXT, max_tokens=4)
    assert exc.value.code == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": "hot"}
        )
    assert exc.value.param == "temperature"


def test_no_blocks_held_after_bad_input(server):
    deadline = time.monotonic() + 10
    while True:
        models = server.health()["models_loaded"]
        if all(m["running"] == 0 and m["kv_cache"]["used_blocks"] == 0 for m in models.values()):
            break
        assert time.monotonic() < deadline, models
        time.sleep(0.05)
