"""Hybrid and sliding-window models through the real server and the official SDKs.

A model dir with a Qwen3.5-style hybrid (Gated DeltaNet + full attention), a Gemma 3-style
sliding-window model and a gpt-oss-style model with attention sinks: each answers OpenAI chat
(streamed and not, concurrently), Anthropic messages and text completions with mlx-lm's own
greedy tokens; a resent conversation is served from the prefix cache; structured output and
logprobs work; the status routes say how each is served.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import pytest_asyncio

from conftest import load_reference, reference_greedy
from omlx_process import omlx_server
from omlx.testing.tiny_families import build_family_model

FAMILIES = {"hybrid-qwen3_5": "qwen3_5", "window-gemma3": "gemma3_text", "sinks-gpt_oss": "gpt_oss"}


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for name, family in FAMILIES.items():
        build_family_model(root / name, family, seed=4)
    with omlx_server(root, tmp_path_factory.mktemp("family-server"), "--max-num-batched-tokens", "48",
                     "--state-snapshot-tokens", "16",
                     block_size=8, failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def client(family_server):
    import openai

    with openai.OpenAI(base_url=family_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="function")
async def async_client(family_server):
    import openai

    c = openai.AsyncOpenAI(base_url=family_server.base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        yield c
    finally:
        await c.close()


def chat_reference(server, model: str, messages: list[dict], max_tokens: int) -> str:
    _, tokenizer = load_reference(server.model_path(model))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens, _ = reference_greedy(server.model_path(model), prompt, max_tokens)
    return tokenizer.decode(tokens)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("model", list(FAMILIES))
def test_chat_matches_mlx_lm(client, family_server, model):
    messages = [{"role": "user", "content": "Tell me about the weather in the mountains in spring, please."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == chat_reference(family_server, model, messages, 20)
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == reply.choices[0].message.content


async def test_concurrent_clients_across_families_are_exact(async_client, family_server):
    cases = [(model, f"Question number {i}: " + "why is the sky blue " * (i % 4 + 1)) for i in range(9)
             for model in [list(FAMILIES)[i % 3]]]

    async def one(model, text):
        messages = [{"role": "user", "content": text}]
        reply = await async_client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                                           temperature=0)
        return model, messages, reply.choices[0].message.content

    for model, messages, content in await asyncio.gather(*(one(m, t) for m, t in cases)):
        assert content == chat_reference(family_server, model, messages, 16)


def test_resent_conversation_hits_the_prefix_cache(client, family_server):
    """An agent's second turn: the hybrid model resumes from a state snapshot."""
    model = "hybrid-qwen3_5"
    history = [{"role": "system", "content": "You are a careful assistant. " * 12},
               {"role": "user", "content": "List three rivers of Europe and say one thing about each."}]
    first = client.chat.completions.create(model=model, messages=history, max_tokens=24, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And of Asia?"}]
    second = client.chat.completions.create(model=model, messages=history, max_tokens=24, temperature=0)
    assert second.choices[0].message.content == chat_reference(family_server, model, history, 24)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens // 2, (cached, first.usage.prompt_tokens)


@pytest.mark.parametrize("model", ["hybrid-qwen3_5", "window-gemma3"])
def test_structured_output_and_logprobs(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object."}], max_tokens=40,
        response_format={"type": "json_object"}, logprobs=True, top_logprobs=2,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and len(choice.logprobs.content) == reply.usage.completion_tokens
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.lstrip().startswith("{")


def test_anthropic_messages_and_completions(family_server):
    import anthropic
    import openai

    model = "window-gemma3"
    messages = [{"role": "user", "content": "Hello there, how are things?"}]
    with anthropic.Anthropic(base_url=family_server.root, api_key="unused", max_retries=0) as claude:
        reply = claude.messages.create(model=model, max_tokens=12, messages=messages,
                                       extra_body={"temperature": 0})
    assert reply.content[0].text == chat_reference(family_server, model, messages, 12)
    with openai.OpenAI(base_url=family_server.base_url, api_key="unused", max_retries=0) as client:
        done = client.completions.create(model="sinks-gpt_oss", prompt="Once upon a time " * 6, max_tokens=10,
                                         temperature=0)
    _, tokenizer = load_reference(family_server.model_path("sinks-gpt_oss"))
    tokens, _ = reference_greedy(family_server.model_path("sinks-gpt_oss"), tokenizer.encode("Once upon a time " * 6), 10)
    assert done.choices[0].text == tokenizer.decode(tokens)


def test_status_says_how_each_model_is_served(client, family_server):
    for model in FAMILIES:  # loaded by now
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    health = family_server.health()
    text = json.dumps(health)
    assert "layer_kinds" in text
    status = get_json(family_server.base_url + "/models/status")
    by_id = {m["id"]: m for m in status["models"]}
    for model, family in FAMILIES.items():
        serving = by_id[model].get("serving")
        assert serving is not None, by_id[model]
        assert serving["engine"] == "paged"
    assert "state" in by_id["hybrid-qwen3_5"]["serving"]["layer_kinds"]
    with urllib.request.urlopen(family_server.root + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert 'omlx:kv_cache_window_bytes{model_name="window-gemma3"}' in metrics
    assert 'omlx:recurrent_state_bytes{model_name="hybrid-qwen3_5"}' in metrics
    kv = health["models_loaded"]["window-gemma3"]["kv_cache"]
    assert kv["window"]["bytes"] > 0 and kv["bytes"] >= kv["window"]["bytes"] + kv["window"]["held_blocks"]
    state = health["models_loaded"]["hybrid-qwen3_5"]["kv_cache"]["state"]
    assert state["bytes_per_sequence"] > 0 and state["snapshots"] > 0
    assert "window:8" in by_id["window-gemma3"]["serving"]["layer_kinds"]
