"""Invariant 1 and 2: greedy tokens through the batching engine equal mlx-lm run alone, and
every KV block comes back, whatever the schedule.

Hypothesis picks the schedule: how many requests, their prompts (many share a prefix, so the
prefix cache is exercised), when each arrives, when some are cancelled, and engine sizes
small enough to force chunked prefill and preemption.
"""

import asyncio
import random
from contextlib import aclosing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load

from omlx.scheduler import AsyncEngine, EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model

# Every engine invariant holds with the fused attention kernel and with the portable path.
pytestmark = pytest.mark.usefixtures("attention_kernel")

MAX_NEW = 20
_PREFIX_RNG = random.Random(7)  # one generator: a new one per token would repeat one token 70 times
SHARED_PREFIX = [_PREFIX_RNG.randrange(5, 500) for _ in range(70)]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request, tmp_path_factory):
    path = build_model(
        tmp_path_factory.mktemp(request.param) / "m",
        TinyModelSpec(model_type=request.param, seed=3),
    )
    model, tokenizer = load(str(path))
    cache: dict[tuple, list[int]] = {}
    eos = frozenset(tokenizer.eos_token_ids)

    def reference(prompt: list[int], max_tokens: int) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            cache[key] = greedy_reference(model, prompt, MAX_NEW, eos)
        return cache[key][:max_tokens]

    return model, eos, reference


request_strategy = st.fixed_dictionaries(
    {
        "shared": st.integers(0, len(SHARED_PREFIX)),
        "suffix": st.lists(st.integers(5, 500), min_size=1, max_size=30),
        "max_tokens": st.integers(1, MAX_NEW),
        "arrival": st.integers(0, 12),
        "cancel_after": st.one_of(st.none(), st.integers(0, 15)),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=10),
    block_size=st.sampled_from([4, 8, 16]),
    budget=st.sampled_from([5, 16, 64]),
    spare_blocks=st.integers(0, 40),
)
@pytest.mark.slow
def test_engine_matches_mlx_lm_alone(tiny, requests, block_size, budget, spare_blocks):
    model, eos, reference = tiny
    prompts = [SHARED_PREFIX[: r["shared"]] + r["suffix"] for r in requests]
    longest = max(len(p) + r["max_tokens"] for p, r in zip(prompts, requests))
    # From "just enough for the longest request" (constant preemption) to roomy.
    num_blocks = -(-longest // block_size) + 1 + spare_blocks
    engine = LLMEngine(
        model,
        EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget),
        context_window=4096,
    )
    outputs = {i: [] for i in range(len(requests))}
    finished = {}
    step = 0
    while step < 5000:
        for i, r in enumerate(requests):
            if r["arrival"] == step:
                engine.add_request(GenerationRequest(str(i), prompts[i], r["max_tokens"], stop_token_ids=eos))
            if r["cancel_after"] is not None and r["arrival"] + r["cancel_after"] == step and str(i) not in finished:
                if engine.abort(str(i)) is not None:
                    finished[str(i)] = "abort"
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = event.finish_reason.value
        step += 1
        if len(finished) == len(requests) and not engine.has_work:
            break
    assert len(finished) == len(requests), "some requests never finished"
    for i, r in enumerate(requests):
        expected = reference(prompts[i], r["max_tokens"])
        if finished[str(i)] == "abort":
            assert outputs[i] == expected[: len(outputs[i])]
        else:
            assert outputs[i] == expected, f"request {i} diverged"
    assert engine.blocks.leaked_blocks() == []
    assert engine.blocks.num_free_blocks == engine.blocks.usable_blocks


@pytest.mark.slow
async def test_async_engine_many_concurrent_clients_with_disconnects(tiny):
    """20 asyncio clients with staggered arrivals; some walk away mid-stream."""
    model, eos, reference = tiny
    engine = AsyncEngine(
        LLMEngine(model, EngineConfig(block_size=8, num_blocks=120, max_num_batched_tokens=24), 4096)
    )
    rng = random.Random(11)

    async def client(i: int):
        await asyncio.sleep(rng.random() * 0.05)
        prompt = SHARED_PREFIX[: rng.randrange(0, 70)] + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 20))]
        max_tokens = rng.randrange(1, MAX_NEW + 1)
        leave_after = rng.randrange(1, 6) if i % 4 == 0 else None
        tokens = []
        request = GenerationRequest(f"c{i}", prompt, max_tokens, stop_token_ids=eos)
        async with aclosing(engine.generate(request)) as events:
            async for event in events:
                if event.token_id is not None:
                    tokens.append(event.token_id)
                if leave_after is not None and len(tokens) >= leave_after:
                    break
        expected = reference(prompt, max_tokens)
        if leave_after is None:
            assert tokens == expected
        else:
            assert tokens == expected[: len(tokens)]

    try:
        await asyncio.gather(*(client(i) for i in range(20)))
        for _ in range(200):  # aborts are applied by the engine thread
            if not engine.engine.has_work:
                break
            await asyncio.sleep(0.01)
        assert engine.engine.blocks.leaked_blocks() == []
    finally:
        engine.shutdown()


def test_seeded_sampling_is_independent_of_batch(tiny):
    model, eos, _ = tiny
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=42)

    def run(with_neighbours: bool) -> list[int]:
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64), 4096)
        engine.add_request(GenerationRequest("target", SHARED_PREFIX[:30], 16, params, eos))
        if with_neighbours:
            for i in range(5):
                other = SamplingParams(temperature=1.0, seed=None if i % 2 else i)
                engine.add_request(GenerationRequest(f"n{i}", SHARED_PREFIX[i : i + 20], 16, other, eos))
        out = []
        while engine.has_work:
            out += [e.token_id for rid, e in engine.step() if rid == "target" and e.token_id is not None]
        return out

    alone = run(False)
    assert len(alone) > 0
    assert run(True) == alone
    assert run(False) == alone


def test_prompt_progress_follows_chunked_prefill(tiny):
    """What the streams' keepalive comments report: prompt tokens in the cache, of all."""
    model, eos, _ = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=16), 4096)
    prompt = SHARED_PREFIX[:50]
    assert engine.prompt_progress("p") is None  # not added yet
    engine.add_request(GenerationRequest("p", prompt, 2, SamplingParams(), eos))
    assert engine.prompt_progress("p") == (0, 50)  # queued
    assert engine.prefilling() == []  # only admitted prompts count
    seen, listed = [], []
    while engine.has_work:
        engine.step()
        progress = engine.prompt_progress("p")
        if progress is not None:
            seen.append(progress)
        listed.append(engine.prefilling())
    assert listed[:4] == [[{"request_id": "p", "done": 16, "total": 50}], [{"request_id": "p", "done": 32, "total": 50}],
                          [{"request_id": "p", "done": 48, "total": 50}], []]
    # 16-token chunks, then the prompt stays complete while it decodes; gone when finished.
    assert seen[:4] == [(16, 50), (32, 50), (48, 50), (50, 50)]
    assert all(p == (50, 50) for p in seen[3:])
    assert engine.prompt_progress("p") is None
