"""The OpenAI-compatible API end to end: a real `omlx serve`, the official `openai` SDK as
the client, and every greedy output compared token-exactly with mlx-lm run in-process."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest
from conftest import BLOCK_SIZE, chat_prompt_ids, decode, reference_greedy, tokenizer_of

from omlx.testing.tiny_models import WORDS

MODEL_NAMES = ["tiny", "tiny-llama"]


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ~120 tokens shared by several requests, so that they share prefix-cache blocks.
LONG_SYSTEM = "You are a helpful assistant. " + words(7, 90)


def user(text: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def expected_chat(server, model: str, messages: list[dict], max_tokens: int):
    """(prompt_ids, tokens, hit_eos, text) of the greedy reference for a chat request."""
    path = server.model_path(model)
    prompt_ids = chat_prompt_ids(path, messages)
    tokens, eos = reference_greedy(path, prompt_ids, max_tokens)
    return prompt_ids, tokens, eos, decode(path, tokens)


def expected_completion_tokens(tokens: list[int], eos: bool) -> int:
    # omlx counts the end-of-sequence token it generated as a completion token.
    return len(tokens) + (1 if eos else 0)


def model_health(server, model: str) -> dict:
    """The model's /health entry; counters at zero while it is not loaded yet."""
    loaded = server.health()["models_loaded"]
    if model in loaded:
        return loaded[model]
    return {"running": 0, "waiting": 0, "steps": 0, "generated_tokens": 0,
            "kv_cache": {"used_blocks": 0, "prefix_cache_hit_tokens": 0}}


def wait_idle(server, timeout: float = 10.0) -> dict:
    """Wait until no model has running/waiting sequences or KV blocks in use; return /health."""
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        busy = {
            name: (m["running"], m["waiting"], m["kv_cache"]["used_blocks"])
            for name, m in health["models_loaded"].items()
            if m["running"] or m["waiting"] or m["kv_cache"]["used_blocks"]
        }
        if not busy:
            return health
        if time.monotonic() > deadline:
            pytest.fail(f"server still busy after {timeout}s (running, waiting, used_blocks): {busy}")
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def no_leaked_blocks(server):
    """After the whole module: every KV block is back in the pool."""
    yield
    health = wait_idle(server)
    for name, m in health["models_loaded"].items():
        assert m["kv_cache"]["used_blocks"] == 0, (name, m)


# ---------------------------------------------------------------------------- models, health


def test_models_list_and_health(client, server):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "tiny-llama"} <= ids
    card = client.models.retrieve("tiny-llama")
    assert card.id == "tiny-llama" and card.object == "model"
    health = server.health()
    assert health["status"] == "ok"
    assert health["compute"]["blas"] == "openblas", health["compute"]
    assert set(health["models_available"]) >= {"tiny", "tiny-llama"}


# ---------------------------------------------------------------------------- chat


CANDIDATE_PROMPTS = [words(100 + i, 2 + (i * 5) % 11) for i in range(12)]


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_chat_matches_reference(client, server, model):
    max_tokens = 24
    reasons = set()
    for prompt in CANDIDATE_PROMPTS:
        messages = user(prompt)
        prompt_ids, tokens, eos, text = expected_chat(server, model, messages, max_tokens)
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        choice = r.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == text, (prompt, tokens)
        assert choice.finish_reason == ("stop" if eos else "length")
        assert r.model == model
        assert r.object == "chat.completion"
        assert r.usage.prompt_tokens == len(prompt_ids)
        assert r.usage.completion_tokens == expected_completion_tokens(tokens, eos)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        reasons.add(choice.finish_reason)
    if model == "tiny":
        # The tiny qwen3 ends a good share of its answers with <|im_end|> within 24 tokens:
        # both ways of finishing have been compared.
        assert reasons == {"stop", "length"}


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_chat_streaming_with_usage(client, server, model):
    messages = user("tell me about the river and the mountain", system=LONG_SYSTEM)
    prompt_ids, tokens, eos, text = expected_chat(server, model, messages, 40)
    plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40)
    assert plain.choices[0].message.content == text

    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=40,
            stream=True, stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    finish = chunks[-2].choices[0].finish_reason
    assert finish == ("stop" if eos else "length") == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert streamed == plain.choices[0].message.content == text
    assert usage_chunk.usage.prompt_tokens == len(prompt_ids) == plain.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert usage_chunk.usage.completion_tokens == expected_completion_tokens(tokens, eos)


def test_streaming_without_usage_has_no_usage_chunk(client, server):
    messages = user("hello world")
    *_, text = expected_chat(server, "tiny", messages, 16)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


# ---------------------------------------------------------------------------- completions


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("prompt_kind", ["string", "token_ids"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_text_completions(client, server, model, prompt_kind, stream):
    path = server.model_path(model)
    text_prompt = "The model server reads the prompt, " + words(3, 12)
    prompt_ids = list(tokenizer_of(path).encode(text_prompt))
    prompt = text_prompt if prompt_kind == "string" else prompt_ids
    tokens, eos = reference_greedy(path, prompt_ids, 32)
    expected = decode(path, tokens)
    kwargs = dict(model=model, prompt=prompt, temperature=0, max_tokens=32)
    if not stream:
        r = client.completions.create(**kwargs)
        assert r.object == "text_completion"
        assert r.choices[0].text == expected
        assert r.choices[0].finish_reason == ("stop" if eos else "length")
        assert r.usage.prompt_tokens == len(prompt_ids)
        assert r.usage.completion_tokens == expected_completion_tokens(tokens, eos)
    else:
        chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
        assert chunks[-1].usage.completion_tokens == expected_completion_tokens(tokens, eos)
        assert chunks[-2].choices[0].finish_reason == ("stop" if eos else "length")
        assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
        assert "".join(c.choices[0].text for c in chunks[:-1]) == expected


def test_text_completion_echo(client, server):
    path = server.model_path("tiny")
    prompt = "hello world, please write"
    tokens, _ = reference_greedy(path, list(tokenizer_of(path).encode(prompt)), 12)
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=12, echo=True)
    assert r.choices[0].text == prompt + decode(path, tokens)


# ---------------------------------------------------------------------------- concurrency


def _concurrent_cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        model = MODEL_NAMES[i % 2]
        shared = i % 3 != 0  # two thirds share the long system message
        messages = user(words(seed * 1000 + i, rng.randint(2, 14)), system=LONG_SYSTEM if shared else None)
        cases.append(
            dict(
                model=model,
                messages=messages,
                max_tokens=rng.randint(4, 96),
                stream=rng.random() < 0.5,
                delay=rng.uniform(0.0, 0.05),
            )
        )
    return cases


async def _run_chat(async_client, case: dict) -> tuple[str, str, int, int]:
    await asyncio.sleep(case["delay"])
    kwargs = dict(model=case["model"], messages=case["messages"], temperature=0, max_tokens=case["max_tokens"])
    if not case["stream"]:
        r = await async_client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens
    parts, finish, usage = [], None, None
    stream = await async_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage.prompt_tokens, usage.completion_tokens


async def _assert_batched(server, n: int) -> None:
    """n requests in flight are batched together, shown without depending on when they
    arrive: n streams that cannot end soon (EOS barred, a long limit) are waited for until
    all run at once, and while they do the engine makes more tokens than steps (one sequence
    at a time would take at least a step per generated token)."""
    model = "tiny"
    bar_eos = {str(e): -100 for e in tokenizer_of(server.model_path(model)).eos_token_ids}
    async with aiohttp.ClientSession() as session:
        responses = await asyncio.gather(*(
            session.post(server.base_url + "/completions", json={
                "model": model, "prompt": f"story {i}: " + words(900 + i, 6), "max_tokens": 2000,
                "temperature": 0, "stream": True, "logit_bias": bar_eos})
            for i in range(n)))
        try:
            deadline = time.monotonic() + 120
            while model_health(server, model)["running"] < n:
                assert time.monotonic() < deadline, "the streams never ran all at once"
                await asyncio.sleep(0.02)
            before = model_health(server, model)
            while (during := model_health(server, model))["generated_tokens"] - before["generated_tokens"] < 4 * n:
                assert time.monotonic() < deadline, "the streams stopped generating"
                await asyncio.sleep(0.02)
            assert during["running"] == n
            steps = during["steps"] - before["steps"]
            assert steps < during["generated_tokens"] - before["generated_tokens"], "not batched together"
        finally:
            for response in responses:
                response.close()
    wait_idle(server, timeout=60)


@pytest.mark.parametrize("n", [4, 16])
async def test_concurrent_requests_are_token_exact(async_client, server, n):
    cases = _concurrent_cases(n, seed=n)
    expected = [expected_chat(server, c["model"], c["messages"], c["max_tokens"]) for c in cases]
    results = await asyncio.gather(*(_run_chat(async_client, c) for c in cases))
    await _assert_batched(server, n)
    for case, (prompt_ids, tokens, eos, text), (got, finish, prompt_tokens, completion_tokens) in zip(
        cases, expected, results
    ):
        where = (case["model"], case["messages"][-1]["content"], case["max_tokens"], case["stream"])
        assert got == text, where
        assert finish == ("stop" if eos else "length"), where
        assert prompt_tokens == len(prompt_ids), where
        assert completion_tokens == expected_completion_tokens(tokens, eos), where


async def test_concurrent_text_completions_are_token_exact(async_client, server):
    """Prompts of very different lengths (several prefill chunks of 64 tokens) mixed with
    short ones, on both models at once."""
    rng = random.Random(5)
    cases = []
    for i in range(8):
        model = MODEL_NAMES[i % 2]
        path = server.model_path(model)
        text = words(500 + i, rng.choice([3, 40, 150]))
        cases.append((model, path, text, rng.randint(8, 40), rng.uniform(0, 0.1)))
    expected = []
    for model, path, text, max_tokens, _ in cases:
        tokens, eos = reference_greedy(path, list(tokenizer_of(path).encode(text)), max_tokens)
        expected.append((decode(path, tokens), "stop" if eos else "length"))

    async def one(model, path, text, max_tokens, delay):
        await asyncio.sleep(delay)
        r = await async_client.completions.create(model=model, prompt=text, temperature=0, max_tokens=max_tokens)
        return r.choices[0].text, r.choices[0].finish_reason

    results = await asyncio.gather(*(one(*c) for c in cases))
    assert results == expected


# ---------------------------------------------------------------------------- prefix cache


def test_prefix_cache_reuses_blocks(client, server):
    messages = user("summarize the cache", system="Prefix cache test. " + words(11, 110))
    prompt_ids, tokens, eos, text = expected_chat(server, "tiny", messages, 20)
    before = model_health(server, "tiny")["kv_cache"]["prefix_cache_hit_tokens"]

    first = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20)
    second = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20)

    # Earlier requests to this server share at most the chat template's opening tokens with
    # it (copied from their first block), never a whole block.
    first_cached = first.usage.prompt_tokens_details.cached_tokens
    assert first_cached < BLOCK_SIZE
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Every full block of the prompt is reused, and the tokens of its partial last block are
    # copied from the first request's (omlx.scheduler.partial_prefix): only the last prompt
    # token, which must be fed to produce the first output token, is recomputed.
    assert len(prompt_ids) % BLOCK_SIZE != 1  # else there would be no partial block to copy
    assert cached == len(prompt_ids) - 1
    assert first.choices[0].message.content == second.choices[0].message.content == text
    assert second.usage.prompt_tokens == first.usage.prompt_tokens == len(prompt_ids)
    assert second.usage.completion_tokens == first.usage.completion_tokens
    after = model_health(server, "tiny")["kv_cache"]["prefix_cache_hit_tokens"]
    assert after - before == first_cached + cached


# ---------------------------------------------------------------------------- stop strings


def _reference_with_text(server, model: str, min_chars: int = 30):
    """A chat prompt whose greedy answer is long, and the reference text."""
    for i in range(40):
        messages = user(words(900 + i, 6))
        _, tokens, eos, text = expected_chat(server, model, messages, 40)
        if len(text) >= min_chars:
            return messages, text
    pytest.fail("no prompt with a long enough reference answer")


def _stop_string_from(text: str) -> str:
    """Three characters from the middle of `text` (no replacement characters)."""
    for start in range(len(text) // 2, len(text) - 3):
        candidate = text[start : start + 3]
        if "\ufffd" not in candidate and candidate.strip():
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_stop_string(client, server, model):
    messages, text = _reference_with_text(server, model)
    stop = _stop_string_from(text)
    expected = text[: text.index(stop)]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40, stop=stop)
    assert r.choices[0].message.content == expected
    assert stop not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"

    chunks = list(
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40, stop=[stop], stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(server)  # stopping early aborts the sequence and frees its blocks


def test_four_stop_strings_first_match_wins(client, server):
    messages, text = _reference_with_text(server, "tiny")
    late = _stop_string_from(text)
    early = next(
        text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip()
    )
    stops = ["never-seen-1", late, "never-seen-2", early]
    cut = min(text.index(s) for s in (late, early))
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40, stop=stops, stream=stream)
        if stream:
            chunks = list(r)
            content, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert content == text[:cut]
        assert finish == "stop"
        assert not any(s in content for s in stops)


def test_stop_string_in_text_completion(client, server):
    path = server.model_path("tiny-llama")
    prompt = "explain the queue " + words(21, 8)
    tokens, _ = reference_greedy(path, list(tokenizer_of(path).encode(prompt)), 40)
    text = decode(path, tokens)
    stop = _stop_string_from(text)
    r = client.completions.create(model="tiny-llama", prompt=prompt, temperature=0, max_tokens=40, stop=stop)
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- sampling


SEEDED = dict(model="tiny", messages=user("write a poem about the night"), temperature=0.9, seed=1234, max_tokens=32)


async def test_seed_replays_exactly(async_client):
    first = await async_client.chat.completions.create(**SEEDED)
    second = await async_client.chat.completions.create(**SEEDED)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens == second.usage.completion_tokens

    # Again, batched together with unrelated requests (seeded, unseeded, greedy, other model).
    others = [
        dict(model="tiny", messages=user("list the colors"), temperature=1.0, max_tokens=40),
        dict(model="tiny", messages=user("tell me about dogs"), temperature=0.7, seed=99, max_tokens=24),
        dict(model="tiny", messages=user("write code", system=LONG_SYSTEM), temperature=0, max_tokens=30),
        dict(model="tiny-llama", messages=user("write a poem about the night"), temperature=0.9, seed=1234, max_tokens=32),
    ]
    results = await asyncio.gather(
        *(async_client.chat.completions.create(**o) for o in others[:2]),
        async_client.chat.completions.create(**SEEDED),
        *(async_client.chat.completions.create(**o) for o in others[2:]),
    )
    assert results[2].choices[0].message.content == first.choices[0].message.content


def test_logit_bias_forces_token(client, server):
    path = server.model_path("tiny")
    forced = tokenizer_of(path).encode(" cat")
    assert len(forced) == 1
    token = forced[0]
    r = client.chat.completions.create(
        model="tiny", messages=user("hello"), temperature=0, max_tokens=10, logit_bias={str(token): 100}
    )
    assert r.choices[0].message.content == decode(path, [token] * 10)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10

    r = client.completions.create(model="tiny", prompt="hello", temperature=0, max_tokens=6, logit_bias={str(token): 100})
    assert r.choices[0].text == decode(path, [token] * 6)


def test_logit_bias_on_eos_ends_at_once(client, server):
    eos = sorted(tokenizer_of(server.model_path("tiny")).eos_token_ids)[0]
    r = client.chat.completions.create(
        model="tiny", messages=user("hello"), temperature=0, max_tokens=10, logit_bias={str(eos): 100}
    )
    assert r.choices[0].message.content == ""
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1


# ---------------------------------------------------------------------------- max tokens


def test_max_tokens_one(client, server):
    messages = user(CANDIDATE_PROMPTS[0])
    _, tokens, eos, text = expected_chat(server, "tiny-llama", messages, 1)
    r = client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0, max_tokens=1)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == 1
    assert r.choices[0].finish_reason == ("stop" if eos else "length")


def test_max_completion_tokens(client, server):
    messages = user("tell me about the river")
    _, tokens, eos, text = expected_chat(server, "tiny-llama", messages, 7)
    assert not eos
    r = client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0, max_completion_tokens=7)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"


def test_default_max_tokens_runs_to_eos(client, server):
    """No max_tokens: generation runs until EOS (or the context fills)."""
    messages = next(user(p) for p in CANDIDATE_PROMPTS if expected_chat(server, "tiny", user(p), 24)[2])
    _, tokens, eos, text = expected_chat(server, "tiny", messages, 24)
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- disconnect


async def test_client_disconnect_frees_blocks_at_once(server):
    path = server.model_path("tiny")
    eos = sorted(tokenizer_of(path).eos_token_ids)[0]
    max_tokens = 3000
    body = {
        "model": "tiny",
        "messages": user("write a very long story", system=LONG_SYSTEM),
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(eos): -100},  # it cannot end by itself
        "stream": True,
    }
    before = model_health(server, "tiny")["generated_tokens"]
    log_before = server.log_path.stat().st_size
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.base_url + "/chat/completions", json=body)
        assert response.status == 200
        events = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                json.loads(line[6:])
                events += 1
                if events == 2:
                    break
        during = model_health(server, "tiny")
        assert during["running"] == 1 and during["kv_cache"]["used_blocks"] > 0
        response.close()  # drop the connection mid-stream

    health = wait_idle(server, timeout=10)["models_loaded"]["tiny"]
    assert health["running"] == 0 and health["kv_cache"]["used_blocks"] == 0
    # It was aborted, not run to the end.
    assert health["generated_tokens"] - before < max_tokens // 2
    # An everyday event: one log line, not an error with a traceback.
    with open(server.log_path, "rb") as log:
        log.seek(log_before)
        written = log.read().decode(errors="replace")
    assert "Error handling request" not in written and "Traceback" not in written, written[-3000:]


async def test_client_disconnect_during_non_streaming_request(server):
    path = server.model_path("tiny-llama")
    eos = sorted(tokenizer_of(path).eos_token_ids)[0]
    max_tokens = 3000
    body = {
        "model": "tiny-llama",
        "prompt": "a long story: " + words(31, 20),
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(eos): -100},
    }
    before = model_health(server, "tiny-llama")["generated_tokens"]
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.post(server.base_url + "/completions", json=body))
        deadline = time.monotonic() + 10
        while model_health(server, "tiny-llama")["running"] != 1:
            assert time.monotonic() < deadline, "the request never started running"
            await asyncio.sleep(0.01)
        request.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await request

    health = wait_idle(server, timeout=10)["models_loaded"]["tiny-llama"]
    assert health["running"] == 0 and health["kv_cache"]["used_blocks"] == 0
    assert health["generated_tokens"] - before < max_tokens // 2
