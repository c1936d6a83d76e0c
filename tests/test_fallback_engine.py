"""The fallback engine (models the paged KV pool cannot hold) keeps the engine invariants:
greedy tokens equal mlx-lm run alone whatever the schedule, seeded sampling does not depend
on the batch, every cache is given back; and the server serves such a model.

Three models: falcon_h1 (a CacheList per layer: Mamba state and KV; decodes batched), a
plain qwen3 forced through the fallback (batched), and the same qwen3 with mlx-lm's
RotatingKVCache(keep=4) (no batched form: each sequence decodes in a pass of its own).
"""

from __future__ import annotations

import asyncio
import random
from contextlib import aclosing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load
from mlx_lm.models.cache import RotatingKVCache

from omlx.models.pool import paged_cannot_hold
from omlx.scheduler import AsyncEngine, EngineConfig, GenerationRequest, LLMEngine, RequestRejected, SamplingParams
from omlx.scheduler.fallback_engine import FallbackEngine
from omlx.scheduler.fallback_runner import Footprint
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_families import FAMILIES, build_family_model
from omlx.testing.tiny_models import TinyModelSpec, build_model

MAX_NEW = 16
WORDS = [random.Random(5).randrange(5, 500) for _ in range(60)]


class Reference:
    """A model, its EOS ids, and mlx-lm's greedy tokens for a prompt alone (cached)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.eos = frozenset(tokenizer.eos_token_ids)
        self._cache: dict[tuple, list[int]] = {}

    def tokens(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = tuple(prompt)
        if key not in self._cache:
            self._cache[key] = greedy_reference(self.model, prompt, MAX_NEW, self.eos)
        return self._cache[key][:max_tokens]


@pytest.fixture(scope="module")
def falcon_path(tmp_path_factory):
    return build_family_model(tmp_path_factory.mktemp("falcon") / "falcon", "falcon_h1")


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("qwen3") / "qwen3", TinyModelSpec(model_type="qwen3", seed=3))


@pytest.fixture(scope="module", params=["falcon_h1", "qwen3", "qwen3-keep"])
def tiny(request, falcon_path, qwen3_path):
    model, tokenizer = load(str(falcon_path if request.param == "falcon_h1" else qwen3_path))
    if request.param == "qwen3-keep":
        # What mlx-lm builds with max_kv_size: a window that keeps its first tokens.  The
        # window is wider than any test sequence, so mlx-lm alone computes the same thing.
        model.make_cache = lambda: [RotatingKVCache(max_size=256, keep=4) for _ in model.layers]
    return request.param, Reference(model, tokenizer)


class Ledger:
    """The memory budget as the model pool's ledger answers it: room up to `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0

    def __call__(self, nbytes: int) -> bool:
        if self.held + nbytes > self.capacity:
            return False
        self.held += nbytes
        return True


def engine_for(reference: Reference, **config) -> FallbackEngine:
    return FallbackEngine(reference.model, EngineConfig(**config), context_window=4096, reason="test")


def assert_released(engine: FallbackEngine) -> None:
    """No request, cache or decode row is left behind."""
    assert not engine.has_work and engine.sequences == {}
    assert engine.runner.caches == {} and engine.runner.decoding == [] and engine.runner.batch is None
    assert engine.kv_bytes == 0


def drive(engine: FallbackEngine, reference: Reference, prompts: list[list[int]], requests: list[dict]) -> None:
    """Run a schedule (each request's arrival step, max_tokens, and the step after arrival
    when it is cancelled, if it is) to the end; every request must produce mlx-lm's tokens
    (a cancelled one, a prefix of them)."""
    outputs = {i: [] for i in range(len(requests))}
    finished = {}
    for step in range(2000):
        for i, r in enumerate(requests):
            if r["arrival"] == step:
                engine.add_request(GenerationRequest(str(i), prompts[i], r["max_tokens"], stop_token_ids=reference.eos))
            if r.get("cancel_after") is not None and r["arrival"] + r["cancel_after"] == step and str(i) not in finished:
                if engine.abort(str(i)) is not None:
                    finished[str(i)] = "abort"
        for request_id, event in engine.step():
            assert event.error is None, event.error
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = event.finish_reason.value
        if len(finished) == len(requests) and not engine.has_work:
            break
    assert len(finished) == len(requests), "some requests never finished"
    for i, r in enumerate(requests):
        expected = reference.tokens(prompts[i], r["max_tokens"])
        if finished[str(i)] == "abort":
            assert outputs[i] == expected[: len(outputs[i])]
        else:
            assert outputs[i] == expected, f"request {i} diverged"
    assert_released(engine)


def test_the_paged_engine_hands_falcon_h1_to_the_fallback(falcon_path):
    model, _ = load(str(falcon_path))
    with pytest.raises(ValueError) as refused:
        LLMEngine(model, EngineConfig(num_blocks=16), context_window=4096)
    assert paged_cannot_hold(refused.value)
    # What engines before UnsupportedLayout raised, and what must not send a model to the fallback.
    assert paged_cannot_hold(ValueError("paged KV serving supports full-attention models only; this model uses X"))
    assert not paged_cannot_hold(ValueError("kv_bits must be 4 or 8, got 3"))


def test_which_models_decode_batched(tiny):
    name, reference = tiny
    engine = engine_for(reference)
    info = engine.serving_info()
    assert info["engine"] == "fallback" and info["reason"] == "test"
    assert "no prefix cache (every prompt is computed in full)" in info["limits"]
    if name == "qwen3-keep":
        assert not info["batched_decode"] and "keep=4" in engine.runner.batch_problem
        assert info["layer_kinds"] == {"RotatingKVCache(keep=4)": len(reference.model.layers)}
        assert any(limit.startswith("decodes one sequence per forward pass") for limit in info["limits"])
    else:
        assert info["batched_decode"], engine.runner.batch_problem
    if name == "falcon_h1":
        assert info["layer_kinds"] == {"CacheList(state, full)": 2}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.slow
def test_every_tiny_family_batches_token_exact(family, tmp_path):
    """Whatever a family's caches (windows and chunks, recurrent state, CacheList), the
    fallback serves it, with prompts past its windows chunked across steps; batched unless
    a cache has no batched form in mlx-lm (never because batching computed otherwise)."""
    model, tokenizer = load(str(build_family_model(tmp_path / family, family)))
    reference = Reference(model, tokenizer)
    engine = engine_for(reference, max_num_batched_tokens=7)
    problem = engine.runner.batch_problem
    assert problem is None or "has no batched form" in problem, problem
    lengths = [3, 20, 41, 1]
    prompts = [WORDS[i : i + n] for i, n in enumerate(lengths)]
    drive(engine, reference, prompts, [{"arrival": 2 * i, "max_tokens": 10} for i in range(len(lengths))])


request_strategy = st.fixed_dictionaries({
    "length": st.integers(1, 45),
    "max_tokens": st.integers(1, MAX_NEW),
    "arrival": st.integers(0, 10),
    "cancel_after": st.one_of(st.none(), st.none(), st.integers(0, 12)),
})


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=7),
    budget=st.sampled_from([4, 16, 64]),
    max_num_seqs=st.sampled_from([2, 8]),
    memory=st.one_of(st.none(), st.floats(1.0, 3.0)),
)
@pytest.mark.slow
def test_greedy_tokens_match_mlx_lm_alone(tiny, requests, budget, max_num_seqs, memory):
    """Arrivals at any step, chunked prompts, aborts mid-stream, max_tokens, too few slots,
    and (with `memory`) a memory budget that holds `memory` times the longest request, so
    that sequences wait for room and are preempted: every request's tokens are mlx-lm's."""
    _, reference = tiny
    prompts = [[WORDS[(i * 7 + j) % len(WORDS)] for j in range(r["length"])] for i, r in enumerate(requests)]
    engine = engine_for(reference, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    if memory is not None:
        # One byte per token, no allocation steps: growth crosses the budget at known tokens.
        engine.footprint = Footprint(((1.0, None, 1),), 0)
        longest = max(len(p) + r["max_tokens"] for p, r in zip(prompts, requests)) + 1
        engine.kv_budget = Ledger(int(longest * memory))
    drive(engine, reference, prompts, requests)
    granted = engine.granted  # idle: everything the budget gave goes back
    assert engine.shrink_pool() == granted and not engine.pool_grown


def test_memory_pressure_preempts_and_recomputes(tiny):
    """Four requests that fit the memory budget two at a time: the newest is preempted as
    they grow, recomputed later, and still produces mlx-lm's tokens."""
    _, reference = tiny
    engine = engine_for(reference, max_num_batched_tokens=64)
    engine.footprint = Footprint(((1.0, None, 1),), 0)
    prompts = [WORDS[i : i + 20] for i in range(4)]
    engine.kv_budget = Ledger(2 * (20 + MAX_NEW) - 10)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), prompt, MAX_NEW, stop_token_ids=reference.eos))
    outputs = {str(i): [] for i in range(4)}
    while engine.has_work:
        for request_id, event in engine.step():
            assert event.error is None
            if event.token_id is not None:
                outputs[request_id].append(event.token_id)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert outputs[str(i)] == reference.tokens(prompt, MAX_NEW)
    assert_released(engine)
    assert engine.pool_grown and engine.shrink_pool() == engine.kv_budget.held and not engine.pool_grown


def test_a_request_larger_than_the_memory_budget_fails_alone(tiny):
    _, reference = tiny
    engine = engine_for(reference)
    engine.footprint = Footprint(((1.0, None, 1),), 0)
    engine.kv_budget = Ledger(15)
    engine.add_request(GenerationRequest("big", WORDS[:20], 4, stop_token_ids=reference.eos))
    events = engine.step()
    assert [(rid, e.error_code) for rid, e in events] == [("big", "kv_cache_exhausted")]
    assert_released(engine)


def test_context_window_and_rejections(tiny):
    _, reference = tiny
    engine = engine_for(reference, max_model_len=30)
    prompt = WORDS[:24]
    engine.add_request(GenerationRequest("r", prompt, 50, stop_token_ids=reference.eos))
    events = []
    while engine.has_work:
        events += engine.step()
    assert [e.token_id for _, e in events] == reference.tokens(prompt, 6)
    assert events[-1][1].finish_reason.value == "length"
    with pytest.raises(RequestRejected, match="context window"):
        engine.check(GenerationRequest("long", WORDS[:30], 1))
    with pytest.raises(RequestRejected, match="empty"):
        engine.check(GenerationRequest("empty", [], 1))
    assert engine.prompt_progress("r") is None
    assert_released(engine)


@pytest.mark.slow
def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    """A seeded request samples the same tokens alone and among others; with n = 3 its
    first completion is that same stream (seed + 0), the others their own."""
    _, reference = tiny
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=42)

    def run(neighbours: bool, n: int = 1) -> dict[int, list[int]]:
        engine = engine_for(reference, max_num_batched_tokens=16)
        engine.add_request(GenerationRequest("target", WORDS[:30], 12, params, reference.eos, n=n))
        if neighbours:
            for i in range(4):
                other = SamplingParams(temperature=1.0, seed=None if i % 2 else i)
                engine.add_request(GenerationRequest(f"n{i}", WORDS[i : i + 9 + 5 * i], 12, other, reference.eos))
        out: dict[int, list[int]] = {}
        while engine.has_work:
            for request_id, event in engine.step():
                if request_id == "target" and event.token_id is not None:
                    out.setdefault(event.index, []).append(event.token_id)
        assert_released(engine)
        return out

    alone = run(False)
    assert alone[0] and run(True) == alone
    forked = run(True, n=3)
    assert sorted(forked) == [0, 1, 2] and forked[0] == alone[0]
    assert forked[1] != forked[0] and forked[2] != forked[1]


@pytest.mark.slow
async def test_async_clients_with_disconnects(tiny):
    """The fallback engine behind AsyncEngine, as the server runs it: concurrent clients,
    some leaving mid-stream, n = 2 greedy completions both equal to mlx-lm's."""
    _, reference = tiny
    engine = AsyncEngine(engine_for(reference, max_num_batched_tokens=24))
    rng = random.Random(3)

    async def client(i: int):
        await asyncio.sleep(rng.random() * 0.03)
        prompt = WORDS[i : i + rng.randrange(1, 40)]
        max_tokens = rng.randrange(1, MAX_NEW + 1)
        n = 2 if i % 3 == 1 else 1
        leave_after = 2 if i % 4 == 0 else None
        tokens: dict[int, list[int]] = {}
        request = GenerationRequest(f"c{i}", prompt, max_tokens, stop_token_ids=reference.eos, n=n)
        async with aclosing(engine.generate(request)) as events:
            async for event in events:
                if event.token_id is not None:
                    tokens.setdefault(event.index, []).append(event.token_id)
                if leave_after is not None and sum(map(len, tokens.values())) >= leave_after:
                    break
        expected = reference.tokens(prompt, max_tokens)
        for got in tokens.values():
            assert got == (expected if leave_after is None else expected[: len(got)])
        if leave_after is None:
            assert len(tokens) == n or not expected

    try:
        await asyncio.gather(*(client(i) for i in range(10)))
        for _ in range(200):  # aborts are applied by the engine thread
            if not engine.engine.has_work:
                break
            await asyncio.sleep(0.01)
        assert_released(engine.engine)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def falcon_server(falcon_path, tmp_path_factory):
    import shutil

    from omlx_process import omlx_server

    root = tmp_path_factory.mktemp("fallback-models")
    shutil.copytree(falcon_path, root / "falcon")
    with omlx_server(root, tmp_path_factory.mktemp("fallback-server"), "--kv-cache-gb", "0.05",
                     failure=pytest.fail) as running:
        yield running


def test_server_serves_a_cache_list_model(falcon_server, falcon_path):
    import openai
    from omlx_process import call

    model, tokenizer = load(str(falcon_path))
    messages = [{"role": "user", "content": "Tell me about the cache."}]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    expected = greedy_reference(model, prompt, 8, set(tokenizer.eos_token_ids))
    text = tokenizer.decode(expected)
    with openai.OpenAI(base_url=falcon_server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model="falcon", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == text
        assert reply.usage.completion_tokens == len(expected)
        stream = client.chat.completions.create(model="falcon", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == text
    status, body = call(falcon_server, "GET", "/v1/models/status")
    assert status == 200
    entry = next(m for m in body["models"] if m["id"] == "falcon")
    assert entry["loaded"] and entry["serving"]["engine"] == "fallback"
    assert "CacheList" in entry["serving"]["reason"]
    health = falcon_server.health()["models_loaded"]["falcon"]
    assert health["serving"]["engine"] == "fallback" and health["generated_tokens"] >= 2 * len(expected)
