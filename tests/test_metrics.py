"""Prometheus metrics at /metrics after a known workload, parsed with prometheus_client's own
parser: token counters move by exactly what the responses' usage reported, each finished
request is counted once by every per-request histogram, the engines' prefix-cache counters
agree with the cached tokens the responses reported, and model loads, evictions and resident
bytes follow the pool."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from omlx.scheduler import EngineConfig
from omlx.server import ServerConfig
from omlx.testing.tiny_models import TinyModelSpec, build_model
from in_process_server import running_app

KEY = "sk-metrics-0123456789"
BLOCK = 16
MODELS = ("a", "b", "c")
KV_BLOCKS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("metrics-models")
    for i, name in enumerate(MODELS):
        build_model(root / name, TinyModelSpec(seed=i))
    return root


def kv_bytes(model_dir: Path) -> int:
    spec = TinyModelSpec()
    heads, layers = spec.num_key_value_heads, spec.num_hidden_layers
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    return KV_BLOCKS * BLOCK * layers * heads * head_dim * 2 * 4


def one_model_bytes(model_dir: Path) -> int:
    return (model_dir / "a" / "model.safetensors").stat().st_size + kv_bytes(model_dir)


@pytest_asyncio.fixture(loop_scope="function")
async def app_server(model_dir, tmp_path, request):
    # By default room for everything (the packaged embedding model too); a test marked
    # `two_models` gets room for two of the three tiny models only, so loading the third
    # evicts the least recently used.
    budget = None
    if request.node.get_closest_marker("two_models"):
        budget = int(one_model_bytes(model_dir) * 2.5)
    config = ServerConfig(model_dirs=[model_dir], engine=EngineConfig(block_size=BLOCK, num_blocks=KV_BLOCKS),
                          settings_home=tmp_path / "home", api_key=KEY, packaged_models=budget is None,
                          memory_budget=budget)
    async with running_app(config) as server:
        yield server


async def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/metrics"), headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_need_the_api_key(app_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(app_server.make_url("/metrics")) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
async def test_counters_and_histograms_follow_a_known_workload(app_server):
    base = str(app_server.make_url("/v1"))
    oai = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
    claude = anthropic.AsyncAnthropic(base_url=str(app_server.make_url("")), api_key=KEY, max_retries=0, timeout=120)
    prompt = [{"role": "user", "content": "Tell me about the weather in Paris in the spring, please."}]
    # (usage, completions) of each finished request: completions = its `n`.
    reported: list[tuple[int, int, int, int]] = []  # prompt, completion, cached, n
    reasons = {"stop": 0, "length": 0}

    # Non-streamed chat, twice with the same prompt (the second hits the prefix cache).
    for _ in range(2):
        r = await oai.chat.completions.create(model="a", messages=prompt, max_tokens=6, temperature=0)
        reported.append((r.usage.prompt_tokens, r.usage.completion_tokens,
                         r.usage.prompt_tokens_details.cached_tokens, 1))
        reasons[r.choices[0].finish_reason] += 1
    assert reported[1][2] > 0, "the repeated prompt should have hit the prefix cache"

    # Streamed chat with usage; concurrent requests; n = 2; a text completion.
    async def streamed(max_tokens: int):
        stream = await oai.chat.completions.create(
            model="a", messages=[{"role": "user", "content": f"Count to {max_tokens}."}], max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True})
        usage, finish = None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
        reported.append((usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens, 1))
        reasons[finish] += 1

    await asyncio.gather(*(streamed(k) for k in (3, 5, 8)))
    r = await oai.chat.completions.create(model="a", messages=prompt, max_tokens=4, n=2, temperature=0.8, seed=1)
    reported.append((r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens, 2))
    reasons["length" if any(c.finish_reason == "length" for c in r.choices) else "stop"] += 1
    r = await oai.completions.create(model="a", prompt="Once upon a time", max_tokens=5)
    reported.append((r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens, 1))
    reasons[r.choices[0].finish_reason] += 1
    # Anthropic Messages: its usage splits the prompt into fresh and cache-read tokens.
    m = await claude.messages.create(model="a", max_tokens=5, messages=prompt)
    reported.append((m.usage.input_tokens + m.usage.cache_read_input_tokens, m.usage.output_tokens,
                     m.usage.cache_read_input_tokens, 1))
    reasons["length" if m.stop_reason == "max_tokens" else "stop"] += 1

    # Embeddings (the packaged all-MiniLM-L6-v2).
    e = await oai.embeddings.create(model="all-MiniLM-L6-v2", input=["a man is eating food", "a dog"])
    await oai.close()
    await claude.close()

    s = await scrape(app_server)
    requests = len(reported)
    assert value(s, "omlx:prompt_tokens_total", model_name="a") == sum(p for p, *_ in reported)
    assert value(s, "omlx:generation_tokens_total", model_name="a") == sum(c for _, c, *_ in reported)
    for reason, count in reasons.items():
        assert value(s, "omlx:request_success_total", model_name="a", finished_reason=reason) == count, reason
    assert value(s, "omlx:request_success_total", model_name="a", finished_reason="abort") == 0
    # Each request once in every per-request histogram; inter-token gaps: one fewer than the
    # tokens of each completion.
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(s, f"omlx:{histogram}_count", model_name="a") == requests, histogram
        assert value(s, f"omlx:{histogram}_bucket", model_name="a", le="+Inf") == requests, histogram
        assert value(s, f"omlx:{histogram}_sum", model_name="a") > 0, histogram
    assert value(s, "omlx:inter_token_latency_seconds_count", model_name="a") == sum(c - n for _, c, _, n in reported)
    # The engine looked every admitted prompt up in the prefix cache once; its hits are the
    # cached tokens the responses reported.
    assert value(s, "omlx:prefix_cache_queries_total", model_name="a") == sum(p for p, *_ in reported)
    assert value(s, "omlx:prefix_cache_hits_total", model_name="a") == sum(cached for _, _, cached, _ in reported)
    assert value(s, "omlx:num_preemptions_total", model_name="a") == 0
    assert value(s, "omlx:num_requests_running", model_name="a") == 0
    assert value(s, "omlx:num_requests_waiting", model_name="a") == 0
    assert 0 <= value(s, "omlx:kv_cache_usage_perc", model_name="a") <= 1
    assert value(s, "omlx:model_loads_total", model_name="a") == 1
    assert value(s, "omlx:embedding_requests_total", model_name=e.model) == 1
    assert value(s, "omlx:embedding_inputs_total", model_name=e.model) == 2
    assert value(s, "omlx:embedding_tokens_total", model_name=e.model) == e.usage.prompt_tokens


async def test_a_client_that_leaves_is_counted_as_an_abort(app_server):
    oai = openai.AsyncOpenAI(base_url=str(app_server.make_url("/v1")), api_key=KEY, max_retries=0, timeout=120)
    stream = await oai.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Write a long story."}], max_tokens=900, stream=True)
    seen = 0
    async for chunk in stream:
        seen += 1
        if seen >= 3:
            break
    await stream.close()
    await oai.close()
    # The server notices the closed connection on its next write; wait for it to record.
    for _ in range(600):
        s = await scrape(app_server)
        if value(s, "omlx:request_success_total", model_name="a", finished_reason="abort") == 1:
            break
        await asyncio.sleep(0.05)
    assert value(s, "omlx:request_success_total", model_name="a", finished_reason="abort") == 1
    assert value(s, "omlx:e2e_request_latency_seconds_count", model_name="a") == 1
    assert value(s, "omlx:request_success_total", model_name="a", finished_reason="stop") == 0


@pytest.mark.two_models
@pytest.mark.slow
async def test_loads_evictions_and_resident_bytes_follow_the_pool(app_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    oai = openai.AsyncOpenAI(base_url=str(app_server.make_url("/v1")), api_key=KEY, max_retries=0, timeout=120)
    prompt = [{"role": "user", "content": "Hello there, how are you today?"}]
    r = await oai.chat.completions.create(model="a", messages=prompt, max_tokens=3)
    await oai.close()
    async with aiohttp.ClientSession(headers=headers) as session:
        for name in ("b", "c"):  # room for two: loading c evicts a, the least recently used
            async with session.post(app_server.make_url(f"/v1/models/{name}/load")) as resp:
                assert resp.status == 200, await resp.text()
        async with session.get(app_server.make_url("/v1/models/status")) as resp:
            status = {m["id"]: m for m in (await resp.json())["models"]}
    assert not status["a"]["loaded"] and status["b"]["loaded"] and status["c"]["loaded"]
    s = await scrape(app_server)
    assert value(s, "omlx:model_evictions_total", model_name="a") == 1
    for name in MODELS:
        assert value(s, "omlx:model_loads_total", model_name=name) == 1
    for name in ("b", "c"):
        assert value(s, "omlx:model_resident_bytes", model_name=name) == status[name]["memory_bytes"] > 0
    assert ("omlx:model_resident_bytes", (("model_name", "a"),)) not in s
    # An unloaded model's engine counters stay (counters never go back).
    assert value(s, "omlx:prefix_cache_queries_total", model_name="a") == r.usage.prompt_tokens
    assert value(s, "omlx:memory_used_bytes") == sum(status[n]["memory_bytes"] for n in ("b", "c"))
    assert value(s, "omlx:memory_budget_bytes") > value(s, "omlx:memory_used_bytes")
