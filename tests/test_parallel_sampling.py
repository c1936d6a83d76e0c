"""n > 1: the n completions share the prompt's KV blocks (the prompt is computed once), each
samples with its own stream (seed + index) and so equals a request with that seed alone,
and every block comes back, whether they finish, are preempted or are aborted."""

from __future__ import annotations

import asyncio

import pytest
from conftest import load_reference

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.testing.reference import greedy_reference

# Every engine invariant holds with the fused attention kernel and with the portable path.
pytestmark = pytest.mark.usefixtures("attention_kernel")

PROMPT = [11, 42, 97, 5, 230, 18, 64, 301, 77, 120, 33, 7, 400, 3, 9, 250, 61, 88, 19, 240]  # 20 tokens


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_reference(model_dir / "tiny")


def run(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[tuple[str, int], list[int]]:
    for r in requests:
        engine.add_request(r)
    out: dict[tuple[str, int], list[int]] = {}
    finished: dict[str, int] = {}
    while engine.has_work:
        for request_id, event in engine.step():
            out.setdefault((request_id, event.index), [])
            if event.token_id is not None:
                out[(request_id, event.index)].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = finished.get(request_id, 0) + 1
    assert finished == {r.request_id: r.n for r in requests}
    assert engine.sequences == {}
    assert engine.blocks.leaked_blocks() == []
    return out


@pytest.mark.parametrize("prompt_len", [16, 20])  # the prompt fills its blocks exactly / leaves a tail
@pytest.mark.slow
def test_completions_equal_their_seeds_alone(tiny, prompt_len):
    model, tokenizer = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    prompt = PROMPT[:prompt_len]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=40)
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=80), 4096)
    together = run(engine, [GenerationRequest("n4", prompt, 16, params, eos, n=4)])
    # The prompt was computed once; each sibling recomputed only the partial last block
    # (fed as one chunk with its own first token; with no tail a sibling just decodes).
    tail = prompt_len % 8
    assert engine.stats.prefill_tokens == prompt_len + (3 * (tail + 1) if tail else 0)
    for i in range(4):
        alone_engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=80), 4096)
        seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=40 + i)
        alone = run(alone_engine, [GenerationRequest("one", prompt, 16, seeded, eos)])
        assert together[("n4", i)] == alone[("one", 0)], i
    assert len({tuple(together[("n4", i)]) for i in range(4)}) > 1  # different streams


def test_prompt_blocks_are_shared_not_copied(tiny):
    model, tokenizer = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=80), 4096)
    engine.add_request(GenerationRequest("n3", PROMPT[:16], 30, SamplingParams(temperature=1.0, seed=1), n=3))
    engine.step()  # the whole prompt, then the fork
    engine.step()
    seqs = [s for s in engine.scheduler.running if s.request_id == "n3"]
    assert sorted(s.index for s in seqs) == [0, 1, 2]
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs)
    assert all(engine.blocks.ref_counts[b] == 3 for b in shared)
    # Each completion writes its own tokens in its own blocks.
    assert len({s.block_table[2] for s in seqs}) == 3
    assert engine.abort("n3") is not None
    assert engine.blocks.leaked_blocks() == [] and engine.sequences == {}


def test_greedy_n_with_neighbours_and_preemption(tiny):
    """Greedy completions all equal mlx-lm's, in a pool small enough to preempt them."""
    model, tokenizer = tiny
    eos = frozenset(tokenizer.eos_token_ids)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=24, max_num_batched_tokens=16), 4096)
    requests = [
        GenerationRequest("g", PROMPT[:13], 20, stop_token_ids=eos, n=3),
        GenerationRequest("other", PROMPT[5:15], 20, stop_token_ids=eos),
    ]
    out = run(engine, requests)
    expected = greedy_reference(model, PROMPT[:13], 20, eos)
    assert [out[("g", i)] for i in range(3)] == [expected] * 3
    assert out[("other", 0)] == greedy_reference(model, PROMPT[5:15], 20, eos)
    assert engine.scheduler.num_preemptions > 0


# ---------------------------------------------------------------------------- API

MESSAGES = [{"role": "user", "content": "write a poem about the night"}]


def test_chat_n_choices_match_single_seeds(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0.9, seed=7, max_tokens=20, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        alone = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0.9, seed=7 + i, max_tokens=20)
        assert choice.message.content == alone.choices[0].message.content
        assert choice.finish_reason == alone.choices[0].finish_reason
    singles = [
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0.9, seed=7 + i, max_tokens=20).usage
        for i in range(3)
    ]
    assert r.usage.completion_tokens == sum(u.completion_tokens for u in singles)
    assert r.usage.prompt_tokens == singles[0].prompt_tokens


def test_chat_n_streams_interleaved(client):
    kwargs = dict(model="tiny-llama", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=16, n=2)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in plain.choices}
    assert finishes == {c.index: c.finish_reason for c in plain.choices}
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_n_with_logprobs(client):
    r = client.completions.create(model="tiny", prompt="the river and", temperature=1.0, seed=11, max_tokens=8, n=2, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for i, choice in enumerate(r.choices):
        alone = client.completions.create(model="tiny", prompt="the river and", temperature=1.0, seed=11 + i, max_tokens=8, logprobs=2)
        assert choice.text == alone.choices[0].text
        assert choice.logprobs.token_logprobs == pytest.approx(alone.choices[0].logprobs.token_logprobs, abs=1e-5)


async def test_disconnect_mid_stream_frees_every_completion(server):
    """A client that leaves an n > 1 stream aborts all n completions and frees their blocks."""
    import json
    import time

    import aiohttp

    eos = sorted(load_reference(server.model_path("tiny"))[1].eos_token_ids)[0]
    body = {
        "model": "tiny", "messages": MESSAGES, "n": 3, "max_tokens": 3000, "temperature": 1.0, "stream": True,
        "logit_bias": {str(eos): -100},  # none of them can end by itself
    }
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.base_url + "/chat/completions", json=body)
        assert response.status == 200
        seen = set()
        async for line in response.content:
            if line.startswith(b"data: {"):
                seen.update(c["index"] for c in json.loads(line[6:])["choices"] if c["delta"].get("content"))
                if seen == {0, 1, 2}:
                    break
        tiny = server.health()["models_loaded"]["tiny"]
        assert tiny["running"] == 3
        response.close()
    deadline = time.monotonic() + 10
    while True:
        tiny = server.health()["models_loaded"]["tiny"]
        if tiny["running"] == 0 and tiny["kv_cache"]["used_blocks"] == 0:
            break
        assert time.monotonic() < deadline, tiny
        await asyncio.sleep(0.05)
