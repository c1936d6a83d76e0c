"""Token-granular prefix reuse (omlx.scheduler.partial_prefix): a request sharing a prefix with
a cached or running sequence past the last full block copies the boundary block's KV for the
shared tokens instead of recomputing them.

What must hold: the tokens are those of computing it (float32, exact against mlx-lm alone),
the copy really happens (fewer prompt tokens computed), every block comes back after many
requests, requests admitted together all reuse the same block, and layer kinds it cannot
serve (windows in their own pool, recurrent state) fall back to whole blocks.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.block_manager import BlockManager
from omlx.scheduler.partial_prefix import PartialBlockIndex, common_length
from omlx.scheduler.request import SamplingParams
from omlx.scheduler.sequence import Sequence
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_families import build_family_model
from omlx.testing.tiny_models import TinyModelSpec, build_model

import numpy as np

pytestmark = pytest.mark.usefixtures("attention_kernel")

MAX_NEW = 8
BS = 8
_rng = random.Random(23)
SYSTEM = [_rng.randrange(5, 500) for _ in range(29)]  # 3 full blocks + 5 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("partial") / "m", TinyModelSpec(seed=4))
    model, tokenizer = load(str(path))
    eos = frozenset(tokenizer.eos_token_ids)
    cache: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], max_tokens: int = MAX_NEW) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            cache[key] = greedy_reference(model, prompt, MAX_NEW, eos)
        return cache[key][:max_tokens]

    return model, eos, reference


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model whose head dim takes quantized KV (groups of 64 along it)."""
    spec = TinyModelSpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, seed=5)
    model, tokenizer = load(str(build_model(tmp_path_factory.mktemp("wide") / "m", spec)))
    return model, frozenset(tokenizer.eos_token_ids)


def engine_for(model, partial: bool = True, **overrides) -> LLMEngine:
    config = dict(block_size=BS, num_blocks=64, max_num_batched_tokens=256, speculative=False)
    config.update(overrides)
    engine = LLMEngine(model, EngineConfig(**config), context_window=4096)
    if not partial:
        engine.scheduler.partial_prefix = None
    return engine


def run(engine: LLMEngine, arrivals: dict[int, list[GenerationRequest]]) -> dict[str, list[int]]:
    """Step until every request ends; each request's tokens."""
    out: dict[str, list[int]] = {}
    done: set[str] = set()
    total = sum(len(r) for r in arrivals.values())
    ours = {r.request_id for requests in arrivals.values() for r in requests}
    for step in range(2000):
        for request in arrivals.get(step, []):
            engine.add_request(request)
            out[request.request_id] = []
        for request_id, event in engine.step():
            if event.token_id is not None:
                out.setdefault(request_id, []).append(event.token_id)
            if event.finish_reason is not None and request_id in ours:
                done.add(request_id)
        if len(done) == total and not engine.has_work:
            return {rid: tokens for rid, tokens in out.items() if rid in ours}
    raise AssertionError("requests never finished")


def request(rid: str, prompt: list[int], eos, max_tokens: int = MAX_NEW) -> GenerationRequest:
    return GenerationRequest(rid, prompt, max_tokens, stop_token_ids=eos)


def assert_no_leaks(engine: LLMEngine) -> None:
    assert engine.blocks.leaked_blocks() == []
    assert engine.blocks.num_free_blocks == engine.blocks.usable_blocks


# ---------------------------------------------------------------------------- the index


def test_index_follows_publication_and_eviction():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = Sequence(GenerationRequest("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=1))
    bm.match_prefix(a)
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    assert len(bm.partial_blocks) == 2  # the two full blocks; the partial third is not published
    children = dict(bm.partial_blocks.children(a.block_hashes[0]))
    assert list(children) == [a.block_table[1]]
    assert children[a.block_table[1]].tolist() == [5, 6, 7, 8]
    bm.free(a)
    # Taking every block for other tokens evicts the cached ones, and the index with them.
    b = Sequence(GenerationRequest("b", list(range(100, 120)), max_tokens=1))
    bm.match_prefix(b)
    assert bm.allocate(b, 20)
    assert len(bm.partial_blocks) == 0
    bm.free(b)
    assert bm.leaked_blocks() == []


def test_common_length():
    assert common_length(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_length(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_length(np.array([9]), np.array([1])) == 0
    index = PartialBlockIndex()
    index.add(b"p", 3, [1, 2])
    index.add(b"q", 3, [1, 2])  # re-published under another parent: only the latest counts
    assert list(index.children(b"p")) == [] and len(index) == 1
    index.discard(3)
    index.discard(3)
    assert len(index) == 0


def test_copy_target_never_takes_its_source():
    """The source is a cached block in the free list, first in line to be handed out: the
    fresh block for the copy must be another one, and the source stays cached."""
    bm = BlockManager(num_blocks=4, block_size=4)  # 3 usable
    a = Sequence(GenerationRequest("a", [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=1))
    bm.match_prefix(a)
    assert bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free(a)
    source = a.block_table[1] if a.block_table else None
    b = Sequence(GenerationRequest("b", [1, 2, 3, 4, 5, 6, 0, 0], max_tokens=1))
    assert bm.match_prefix(b) == 4
    source = next(iter(dict(bm.partial_blocks.children(b.block_hashes[0]))))
    target = bm.take_copy_target(b, source)
    assert target is not None and target != source
    assert b.block_table[-1] == target
    assert bm.ref_counts[source] == 0 and source in bm.free_blocks and bm.block_hash[source] is not None
    bm.free(b)
    assert bm.leaked_blocks() == []


# ---------------------------------------------------------------------------- the engine


def test_a_fresh_engine_has_no_source(tiny):
    """The load-time self-check runs prompts through the pool but leaves nothing to copy:
    other ranks never ran it."""
    model, _, _ = tiny
    engine = engine_for(model)
    assert len(engine.blocks.partial_blocks) == 0 and engine.blocks.num_cached_blocks == 0


def test_second_request_reuses_the_partial_block_and_gets_the_same_tokens(tiny):
    model, eos, reference = tiny
    engine = engine_for(model)
    first = SYSTEM + [7, 8, 9, 10, 11, 12]
    second = SYSTEM + [300, 301, 302]
    out = run(engine, {0: [request("a", first, eos)]})
    assert out["a"] == reference(first)
    before = engine.counters.prefill_tokens
    out = run(engine, {0: [request("b", second, eos)]})
    assert out["b"] == reference(second)
    # 3 full blocks from the cache, the 5 shared tokens of the fourth copied: 3 computed.
    assert engine.counters.prefill_tokens - before == 3
    assert engine.scheduler.partial_prefix.reused_tokens == 5
    stats = engine.kv_stats()
    assert stats["prefix_cache_partial_tokens"] == 5
    # The hit counter counts the copied tokens too: 24 from whole blocks + 5 copied.
    assert stats["prefix_cache_hit_tokens"] == len(SYSTEM)
    assert_no_leaks(engine)


def test_source_is_a_running_sequences_partial_last_block(tiny):
    """A request arriving while another decodes copies from that sequence's unfinished last
    block: its prompt tokens and the output tokens it has computed so far."""
    model, eos, reference = tiny
    engine = engine_for(model)
    first = SYSTEM[:20]  # 2 full blocks + 4 tokens
    expected = reference(first, MAX_NEW)
    engine.add_request(request("a", first, eos, max_tokens=MAX_NEW))
    tokens: list[int] = []
    while len(tokens) < 3:
        for _, event in engine.step():
            tokens.append(event.token_id)
    assert tokens == expected[:3]
    # a's third block holds 4 prompt tokens + 2 computed outputs (the third is pending).
    follow = first + tokens[:2] + [444, 445]
    out = run(engine, {0: [request("b", follow, eos)]})
    assert engine.scheduler.partial_prefix.reused_tokens == 6
    assert out["b"] == reference(follow)
    assert_no_leaks(engine)


def test_next_turn_resumes_inside_the_block_where_the_last_one_ended(tiny):
    """A finished sequence's partial last block stays as a source: the conversation re-sent
    with a new message copies the tokens of it that were computed."""
    model, eos, reference = tiny
    engine = engine_for(model)
    prompt = SYSTEM[:21]  # 2 full blocks + 5 tokens
    reply = run(engine, {0: [request("turn1", prompt, eos)]})["turn1"]
    assert len(reply) == MAX_NEW  # the test's arithmetic below needs the whole reply
    computed = len(prompt) + len(reply) - 1  # the last token sampled is never fed
    turn2 = prompt + reply + [301, 302]
    out = run(engine, {0: [request("turn2", turn2, eos)]})
    assert engine.scheduler.partial_prefix.reused_tokens == computed % BS
    assert out["turn2"] == reference(turn2)
    assert_no_leaks(engine)


def test_agents_admitted_together_all_reuse_the_cached_block(tiny):
    model, eos, reference = tiny
    engine = engine_for(model)
    run(engine, {0: [request("cold", SYSTEM + [1, 2, 3, 4], eos)]})
    agents = [SYSTEM + [50 + i, 60 + i, 70 + i] for i in range(8)]
    before = engine.counters.prefill_tokens
    out = run(engine, {0: [request(f"agent{i}", p, eos) for i, p in enumerate(agents)]})
    assert engine.counters.prefill_tokens - before == 8 * 3
    assert engine.scheduler.partial_prefix.reused_tokens == 8 * 5
    for i, prompt in enumerate(agents):
        assert out[f"agent{i}"] == reference(prompt), f"agent {i} diverged"
    assert_no_leaks(engine)


def test_requests_arriving_together_compute_their_new_shared_prompt_once(tiny):
    """Nothing cached yet: the first request computes the shared prompt, the others wait for
    its blocks rather than compute the same tokens beside it in the same step."""
    model, eos, reference = tiny
    shared = [_rng.randrange(5, 500) for _ in range(43)]  # 5 full blocks + 3 tokens
    prompts = {f"r{i}": shared + [90 + i, 7] for i in range(4)}
    computed = {}
    for partial in (True, False):
        engine = engine_for(model, partial=partial, max_num_batched_tokens=64)
        out = run(engine, {0: [request(rid, p, eos) for rid, p in prompts.items()]})
        for rid, prompt in prompts.items():
            assert out[rid] == reference(prompt), rid
        assert_no_leaks(engine)
        computed[partial] = engine.counters.prefill_tokens
    # Once: the 45 tokens of the first prompt, then 2 tokens of each other one (the 3 shared
    # tokens of the sixth block are copied).
    assert computed[True] == 45 + 3 * 2
    assert computed[False] > computed[True]


def test_many_requests_through_a_small_pool_never_leak(tiny):
    """Reuse under eviction pressure and preemption: a pool just big enough for a few
    sequences, prompts sharing prefixes of every length; every block comes back and every
    answer is exact."""
    model, eos, reference = tiny
    engine = engine_for(model, num_blocks=16, max_num_batched_tokens=24)
    rng = random.Random(3)
    arrivals: dict[int, list[GenerationRequest]] = {}
    prompts = {}
    for i in range(40):
        prompt = SYSTEM[: rng.randrange(0, len(SYSTEM) + 1)] + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 6))]
        prompts[f"r{i}"] = prompt
        arrivals.setdefault(rng.randrange(0, 60), []).append(request(f"r{i}", prompt, eos, max_tokens=rng.randrange(1, MAX_NEW + 1)))
    out = run(engine, arrivals)
    assert engine.scheduler.partial_prefix.reused_tokens > 0
    for rid, prompt in prompts.items():
        assert out[rid] == reference(prompt)[: len(out[rid])] and out[rid], rid
    assert_no_leaks(engine)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shared=st.lists(st.integers(0, len(SYSTEM)), min_size=2, max_size=6),
    arrivals=st.lists(st.integers(0, 6), min_size=6, max_size=6),
    block_size=st.sampled_from([4, 8, 16]),
    budget=st.sampled_from([7, 32]),
)
def test_any_shared_length_any_schedule_is_exact(tiny, shared, arrivals, block_size, budget):
    model, eos, reference = tiny
    engine = engine_for(model, block_size=block_size, num_blocks=48, max_num_batched_tokens=budget)
    plan: dict[int, list[GenerationRequest]] = {}
    prompts = {}
    for i, n in enumerate(shared):
        prompts[str(i)] = SYSTEM[:n] + [400 + i, 17 * i % 500 + 5]
        plan.setdefault(arrivals[i], []).append(request(str(i), prompts[str(i)], eos))
    out = run(engine, plan)
    for rid, prompt in prompts.items():
        assert out[rid] == reference(prompt), rid
    assert_no_leaks(engine)


def test_copy_is_a_kv_operation_of_the_step(tiny):
    """Another rank replays a step's KV operations on its own pools: the copy is one."""
    model, eos, _ = tiny
    engine = engine_for(model)
    run(engine, {0: [request("a", SYSTEM + [1, 2, 3], eos)]})
    engine.add_request(request("b", SYSTEM + [9, 9], eos))
    out = engine.scheduler.schedule()
    assert len(out.kv_ops.copies) == 1
    pool, src, dst = out.kv_ops.copies[0]
    assert pool == 0 and src != dst
    row = out.rows[0]
    assert row.start == len(SYSTEM) and row.block_table[len(SYSTEM) // BS] == dst
    result = engine.runner.execute(out)
    engine.scheduler.update_from_output(out, result)
    while engine.has_work:
        engine.step()
    assert_no_leaks(engine)


def test_quantized_kv_copies_as_stored(wide):
    """An 8-bit pool: reusing the copied rows gives exactly the tokens of computing them."""
    model, eos = wide
    prompts = [SYSTEM + [1, 2, 3]] + [SYSTEM + [60 + i, 61] for i in range(3)]
    outs = []
    for partial in (True, False):
        engine = engine_for(model, partial=partial, kv_bits=8)
        out = run(engine, {0: [request("cold", prompts[0], eos)]})
        out.update(run(engine, {0: [request(str(i), p, eos) for i, p in enumerate(prompts[1:])]}))
        outs.append(out)
        assert_no_leaks(engine)
        if partial:
            assert engine.scheduler.partial_prefix.reused_tokens == 3 * 5
    assert outs[0] == outs[1]


@pytest.mark.parametrize("start, reused", [(40, 3 * 5), (27, 3 * 2)])
def test_float_pool_under_quantized_kv_start(wide, start, reused):
    """With a float pool the copy is made there, and the sequences still move to the 8-bit
    pool at exactly the threshold.  (Start 27: the cold prompt moved at 27 tokens, leaving
    its fourth block in the float pool with 3 tokens; each agent copies 2 of them and
    computes the 27th itself, where it moves.)"""
    model, eos = wide
    prompts = [SYSTEM + [1, 2, 3]] + [SYSTEM + [60 + i, 61] for i in range(3)]
    outs = []
    for partial in (True, False):
        engine = engine_for(model, partial=partial, kv_bits=8, quantized_kv_start=start, num_float_blocks=32)
        out = run(engine, {0: [request("cold", prompts[0], eos)]})
        out.update(run(engine, {0: [request(str(i), p, eos) for i, p in enumerate(prompts[1:])]}))
        outs.append(out)
        for pool in (engine.blocks, engine.float_blocks):
            assert pool.leaked_blocks() == []
        if partial:
            assert engine.scheduler.partial_prefix.reused_tokens == reused
    assert outs[0] == outs[1]


def test_prefix_cache_off_reuses_nothing(tiny):
    model, eos, reference = tiny
    engine = engine_for(model, prefix_cache=False)
    run(engine, {0: [request("a", SYSTEM + [1, 2], eos)]})
    out = run(engine, {0: [request("b", SYSTEM + [3, 4], eos)]})
    assert out["b"] == reference(SYSTEM + [3, 4])
    assert engine.scheduler.partial_prefix.reused_tokens == 0


def test_n_greater_than_one_siblings_and_partial_reuse(tiny):
    """n > 1 forks share the parent's full blocks; a later request reuses the boundary block."""
    model, eos, reference = tiny
    engine = engine_for(model)
    prompt = SYSTEM + [5, 6]
    n_request = GenerationRequest("n", prompt, MAX_NEW, stop_token_ids=eos, n=2, sampling=SamplingParams())
    engine.add_request(n_request)
    while engine.has_work:
        engine.step()
    out = run(engine, {0: [request("b", SYSTEM + [7], eos)]})
    assert out["b"] == reference(SYSTEM + [7])
    assert engine.scheduler.partial_prefix.reused_tokens == 5
    assert_no_leaks(engine)


@pytest.mark.parametrize("family, reuses", [("qwen3_5", False), ("gemma3_text", True), ("gpt_oss", True)])
def test_layer_kinds(family, reuses, tmp_path):
    """Sliding windows in a pool of their own copy their part of the block too (gpt_oss: with
    attention sinks); recurrent state resumes only at its snapshots, so a hybrid model keeps
    whole-block reuse.  Exact either way, and every block comes back."""
    path = build_family_model(tmp_path / family, family, seed=2)
    model, tokenizer = load(str(path))
    eos = frozenset(tokenizer.eos_token_ids)
    engine = engine_for(model, num_blocks=96)
    assert engine.layers
    first, second = SYSTEM + [1, 2, 3], SYSTEM + [4, 5]
    out = run(engine, {0: [request("a", first, eos)]})
    agents = {f"agent{i}": SYSTEM + [40 + i, 5] for i in range(3)}
    out.update(run(engine, {0: [request("b", second, eos)]}))
    out.update(run(engine, {0: [request(rid, p, eos) for rid, p in agents.items()]}))
    reused = engine.scheduler.partial_prefix.reused_tokens
    assert reused == (4 * 5 if reuses else 0)
    for rid, prompt in {"a": first, "b": second, **agents}.items():
        assert out[rid] == greedy_reference(model, prompt, MAX_NEW, eos), rid
    assert engine.blocks.leaked_blocks() == []
    if engine.window is not None:
        assert engine.window.stats()["held_blocks"] == 0  # the copies' window blocks came back too
