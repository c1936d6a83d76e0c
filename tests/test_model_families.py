"""Every layer kind in the paged engine: hybrid linear attention (qwen3_5), short convolutions
(lfm2), Mamba-2 (nemotron_h), sliding windows (gemma3_text, olmo3), windows with attention
sinks and MoE (gpt_oss), no-RoPE layers (llama4_text).

Invariants 1 and 2 for each: greedy tokens equal mlx-lm run alone whatever the schedule
(arrivals, block sizes, budgets, pools tight enough to preempt, aborts, prompts longer than the
window), second turns that resume from the prefix cache are still exact, and every KV block
and state slot comes back.  Both attention paths run every test.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.scheduler.layer_kinds import UnsupportedLayout, describe, layer_kinds
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_families import build_family_model

pytestmark = pytest.mark.usefixtures("attention_kernel")

MAX_NEW = 12
SHARED = [random.Random(5).randrange(5, 500) for _ in range(48)]
FAMILIES = ["qwen3_5", "lfm2", "nemotron_h", "gemma3_text", "olmo3", "gpt_oss", "llama4_text"]
KINDS = {
    "qwen3_5": {"state": 2, "full": 2},
    "lfm2": {"state": 2, "full": 2},
    "nemotron_h": {"state": 2, "full": 2},
    "gemma3_text": {"window:8": 2, "full": 2},
    "olmo3": {"window:16": 3, "full": 1},
    "gpt_oss": {"window:8": 2, "full": 2},
    "llama4_text": {"full": 4},
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = build_family_model(tmp_path_factory.mktemp(request.param) / "m", request.param, seed=2)
    model, tokenizer = load(str(path))
    eos = frozenset(tokenizer.eos_token_ids)
    cache: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], max_tokens: int) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            cache[key] = greedy_reference(model, prompt, MAX_NEW, eos)
        return cache[key][:max_tokens]

    return request.param, model, eos, reference


def run(engine: LLMEngine, arrivals: dict[int, list[GenerationRequest]], cancels: dict[int, list[str]] = {}):
    """Step the engine until every request ends; returns (tokens, finish reasons, events)."""
    outputs: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    events = {}
    total = sum(len(r) for r in arrivals.values())
    for step in range(5000):
        for request in arrivals.get(step, []):
            engine.add_request(request)
            outputs.setdefault(request.request_id, [])
        for request_id in cancels.get(step, []):
            if request_id not in finished and engine.abort(request_id) is not None:
                finished[request_id] = "abort"
        for request_id, event in engine.step():
            assert event.error is None, event.error
            events.setdefault(request_id, []).append(event)
            if event.token_id is not None:
                outputs[request_id].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = event.finish_reason.value
        if len(finished) == total and not engine.has_work and step > max(arrivals, default=0):
            break
    assert len(finished) == total, "some requests never finished"
    return outputs, finished, events


def assert_nothing_leaked(engine: LLMEngine) -> None:
    assert engine.blocks.leaked_blocks() == []
    assert engine.blocks.num_free_blocks == engine.blocks.usable_blocks
    if engine.state is not None:
        assert engine.state.pool.used_slots == 0
        assert len(engine.state.pool.free_slots) == engine.state.pool.capacity
    if engine.window is not None:
        assert not any(engine.window.held.values()) and not engine.window.refs.any()
        # Every window block is free again (cached ones among them).
        assert len(engine.window.free) == engine.window.storage.num_blocks - 1


def test_layer_kinds_are_read_from_the_caches(family):
    name, model, _, _ = family
    assert describe(layer_kinds(model)) == KINDS[name]
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64), context_window=4096)
    info = engine.serving_info()
    assert info["engine"] == "paged" and info["layer_kinds"] == KINDS[name]
    assert (engine.state is not None) == ("state" in KINDS[name])
    assert info["speculative_decoding"]


request_strategy = st.fixed_dictionaries({
    "shared": st.integers(0, len(SHARED)),
    "suffix": st.lists(st.integers(5, 500), min_size=1, max_size=24),
    "max_tokens": st.integers(1, MAX_NEW),
    "arrival": st.integers(0, 8),
    "cancel_after": st.one_of(st.none(), st.integers(0, 10)),
})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=6),
    block_size=st.sampled_from([4, 8, 16]),
    budget=st.sampled_from([5, 16, 48]),
    spare_blocks=st.integers(0, 24),
    snapshot_tokens=st.sampled_from([4, 16, 32]),
)
@pytest.mark.slow
def test_greedy_tokens_match_mlx_lm_alone(family, requests, block_size, budget, spare_blocks, snapshot_tokens):
    _, model, eos, reference = family
    prompts = [SHARED[: r["shared"]] + r["suffix"] for r in requests]
    longest = max(len(p) + r["max_tokens"] for p, r in zip(prompts, requests))
    engine = LLMEngine(model, EngineConfig(
        block_size=block_size, num_blocks=-(-longest // block_size) + 1 + spare_blocks,
        max_num_batched_tokens=budget, state_snapshot_tokens=snapshot_tokens,
    ), context_window=4096)
    arrivals: dict[int, list] = {}
    cancels: dict[int, list] = {}
    for i, (prompt, r) in enumerate(zip(prompts, requests)):
        arrivals.setdefault(r["arrival"], []).append(
            GenerationRequest(str(i), prompt, r["max_tokens"], stop_token_ids=eos))
        if r["cancel_after"] is not None:
            cancels.setdefault(r["arrival"] + r["cancel_after"], []).append(str(i))
    outputs, finished, _ = run(engine, arrivals, cancels)
    for i, (prompt, r) in enumerate(zip(prompts, requests)):
        expected = reference(prompt, r["max_tokens"])
        got = outputs[str(i)]
        if finished[str(i)] == "abort":
            assert got == expected[: len(got)]
        else:
            assert got == expected, f"request {i} diverged"
    assert_nothing_leaked(engine)


@pytest.mark.slow
def test_second_turn_resumes_from_the_prefix_cache_exactly(family):
    """An agent's next turn resends the conversation: it is served from the cache (for state
    layers: from the last snapshot inside the cached prefix) and stays token-exact."""
    name, model, eos, reference = family
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=128, max_num_batched_tokens=32,
                                           state_snapshot_tokens=8), context_window=4096)
    first = SHARED[:40]
    out, _, _ = run(engine, {0: [GenerationRequest("t1", first, MAX_NEW, stop_token_ids=eos)]})
    assert out["t1"] == reference(first, MAX_NEW)
    second = first + out["t1"] + [11, 12, 13, 14, 15]
    out2, _, events = run(engine, {0: [GenerationRequest("t2", second, MAX_NEW, stop_token_ids=eos)]})
    assert out2["t2"] == reference(second, MAX_NEW)
    cached = events["t2"][0].cached_prompt_tokens
    # The whole first turn but its unfinished last block and last snapshot interval.
    assert cached >= (len(first) + MAX_NEW) // 8 * 8 - 8, cached
    assert_nothing_leaked(engine)


@pytest.mark.slow
def test_n_completions_share_the_prompt(family):
    """n > 1: siblings fork after the prompt (state models copy the state and the partial
    block); greedy siblings all give mlx-lm's tokens."""
    name, model, eos, reference = family
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=96, max_num_batched_tokens=16), context_window=4096)
    prompt = SHARED[:21]
    request = GenerationRequest("n", prompt, 6, stop_token_ids=eos, n=3)
    _, _, events = run(engine, {0: [request]})
    by_index: dict[int, list[int]] = {}
    for event in events["n"]:
        if event.token_id is not None:
            by_index.setdefault(event.index, []).append(event.token_id)
    assert sorted(by_index) == [0, 1, 2]
    for tokens in by_index.values():
        assert tokens == reference(prompt, 6)
    assert_nothing_leaked(engine)


@pytest.mark.slow
def test_seeded_sampling_is_independent_of_the_batch(family):
    name, model, eos, _ = family
    prompt = SHARED[:30]

    def sample(others: int) -> list[int]:
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=160, max_num_batched_tokens=24),
                           context_window=4096)
        requests = [GenerationRequest("s", prompt, 8, stop_token_ids=eos,
                                      sampling=SamplingParams(temperature=0.9, seed=1234))]
        requests += [GenerationRequest(f"o{i}", SHARED[i:i + 17], 8, stop_token_ids=eos) for i in range(others)]
        out, _, _ = run(engine, {0: requests})
        return out["s"]

    assert sample(0) == sample(4)


def test_models_the_paged_pass_cannot_run_are_refused_at_load(tmp_path):
    """Llama 4 trims its chunked caches and builds its chunk mask from integer offsets itself:
    the load-time check finds the paged pass cannot run it (the fallback engine serves it)."""
    model, _ = load(str(build_family_model(tmp_path / "llama4", "llama4")))
    with pytest.raises(UnsupportedLayout, match="paged pass"):
        LLMEngine(model, EngineConfig(block_size=8, num_blocks=32), context_window=4096)
    model, _ = load(str(build_family_model(tmp_path / "falcon", "falcon_h1")))
    with pytest.raises(UnsupportedLayout, match="CacheList"):
        LLMEngine(model, EngineConfig(block_size=8, num_blocks=32), context_window=4096)


@pytest.mark.parametrize("name", ["qwen3_5", "gemma3_text"])
@pytest.mark.slow
def test_second_turn_after_a_restart_resumes_from_the_disk_tier(tmp_path, name):
    """Memory empty after a restart: the KV blocks and (for state layers) the snapshots come
    back from the disk tier, and the tokens are still exact."""
    model, tokenizer = load(str(build_family_model(tmp_path / name, name, seed=6)))
    eos = frozenset(tokenizer.eos_token_ids)
    config = EngineConfig(block_size=8, num_blocks=128, max_num_batched_tokens=32, state_snapshot_tokens=8,
                          kv_cache_dir=str(tmp_path / "kv"))
    first = SHARED[:40]
    engine = LLMEngine(model, config, context_window=4096, scope=b"family-disk")
    out, _, _ = run(engine, {0: [GenerationRequest("t1", first, MAX_NEW, stop_token_ids=eos)]})
    engine.close()
    second = first + out["t1"] + [21, 22, 23]
    restarted = LLMEngine(model, config, context_window=4096, scope=b"family-disk")
    out2, _, events = run(restarted, {0: [GenerationRequest("t2", second, MAX_NEW, stop_token_ids=eos)]})
    assert out2["t2"] == greedy_reference(model, second, MAX_NEW, eos)
    assert events["t2"][0].cached_prompt_tokens >= 40
    if restarted.state is not None:
        assert restarted.state.disk.stats()["loads"] >= 1
    assert_nothing_leaked(restarted)
    restarted.close()


@pytest.mark.parametrize("name, kinds", [("qwen3_5", {"state": 2, "full": 2}), ("gemma3", {"window:8": 2, "full": 2})])
@pytest.mark.slow
def test_vision_language_families_run_their_language_model_exactly(name, kinds):
    """Qwen3.5 and Gemma 3 checkpoints are vision-language models, loaded through mlx-vlm: the
    engine reads the layer kinds from mlx-vlm's own caches and runs its layers (with the pass
    inputs the server gives VLMs), token-exact against the model recomputing each prefix."""
    from mlx_lm.models.cache import make_prompt_cache

    from omlx.testing.tiny_vlm_families import build_vlm_language

    import mlx.core as mx

    _, adapter, inputs = build_vlm_language(name)
    engine = LLMEngine(adapter, EngineConfig(block_size=8, num_blocks=160, max_num_batched_tokens=24,
                                             state_snapshot_tokens=16), context_window=4096, vision=inputs)
    assert engine.serving_info()["layer_kinds"] == kinds

    def reference(prompt: list[int], n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            logits = adapter(mx.array([prompt + out]), cache=make_prompt_cache(adapter))[:, -1]
            out.append(int(mx.argmax(logits, -1).item()))
        return out

    rng = random.Random(3)
    prompts = [SHARED[: rng.randrange(0, 40)] + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 12))]
               for _ in range(4)]
    arrivals = {2 * i: [GenerationRequest(str(i), p, 8)] for i, p in enumerate(prompts)}
    outputs, _, _ = run(engine, arrivals)
    for i, prompt in enumerate(prompts):
        assert outputs[str(i)] == reference(prompt, 8), f"request {i} diverged"
    assert_nothing_leaked(engine)


@pytest.mark.slow
def test_sliding_window_kv_is_bounded_by_the_window(tmp_path):
    """Gemma-style: the windowed layers' pool holds, per running sequence, at most its window
    plus one pass's rows, however long the sequence gets; the full layers' pool holds it all."""
    model, tokenizer = load(str(build_family_model(tmp_path / "g", "gemma3_text", seed=8)))
    eos = frozenset(tokenizer.eos_token_ids)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=256, max_num_batched_tokens=16,
                                           speculative=False), context_window=4096)
    window = engine.window
    assert window is not None and window.window == 8
    assert window.storage.layout.num_layers == 2 and engine.storage.layout.num_layers == 2
    prompt = [random.Random(9).randrange(5, 500) for _ in range(150)]
    engine.add_request(GenerationRequest("long", prompt, 40, stop_token_ids=eos))
    seq = engine.sequences["long"]
    out, most_held = [], 0
    while engine.has_work:
        for _, event in engine.step():
            if event.token_id is not None:
                out.append(event.token_id)
        if engine.has_work:
            most_held = max(most_held, len(window.held.get(id(seq), ())))
            # What the next query reads is held; nothing before its window is.
            reach = window.reach(seq.num_computed_tokens)
            assert window.held[id(seq)] == set(seq.block_table[reach:])
    assert out == greedy_reference(model, prompt, 40, eos)
    assert most_held <= window.blocks_per_seq
    assert most_held <= -(-(8 + 16) // 4) + 1  # the window and one chunk, not 190 tokens' worth
    stats = engine.kv_stats()["window"]
    assert stats["held_blocks"] == 0 and stats["bytes"] == window.nbytes
    assert_nothing_leaked(engine)


@pytest.mark.parametrize("name", ["gemma3_text", "qwen3_5"])
@pytest.mark.slow
def test_quantized_kv_on_windowed_and_state_models(tmp_path, name):
    """8-bit KV: the window pool is quantized like the main one (the same rows, so the same
    tokens as with windowed layers kept in the main pool), and a hybrid model quantizes its
    attention layers' KV while its state stays in the model's dtype."""
    # Head dim 32: the smallest KV quantization group.
    model, tokenizer = load(str(build_family_model(tmp_path / name, name, seed=10, head_dim=32)))
    eos = frozenset(tokenizer.eos_token_ids)
    prompts = {f"q{i}": SHARED[: 10 + 9 * i] for i in range(3)}

    def serve(**overrides):
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=128, max_num_batched_tokens=24,
                                               kv_bits=8, kv_group_size=32, **overrides), context_window=4096)
        out, _, _ = run(engine, {0: [GenerationRequest(k, p, 10, stop_token_ids=eos) for k, p in prompts.items()]})
        assert_nothing_leaked(engine)
        return engine, out

    engine, out = serve()
    assert engine.storage.kv_bits == 8
    if name == "gemma3_text":
        assert engine.window.storage.kv_bits == 8
        _, shared_pool = serve(window_kv=False)
        assert out == shared_pool
    else:
        assert engine.state is not None
        for key, prompt in prompts.items():
            assert len(out[key]) == 10


@pytest.mark.parametrize("name", ["qwen3_5", "lfm2", "nemotron_h"])
@pytest.mark.slow
def test_speculative_decoding_takes_rejected_rows_back_out_of_the_state(tmp_path, name):
    """Drafts on a hybrid model: rejected rows went through the recurrent layers too; the
    state is replayed to the accepted rows, and greedy output stays exactly mlx-lm's.  The
    drafts come from a predicted output (OpenAI `prediction`) that is right but for a few
    tokens, so some drafts are accepted and some cut short."""
    model, tokenizer = load(str(build_family_model(tmp_path / name, name, seed=11)))
    eos = frozenset(tokenizer.eos_token_ids)
    rng = random.Random(12)
    prompts = {f"s{i}": [rng.randrange(5, 500) for _ in range(12 + 7 * i)] for i in range(3)}
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=160, max_num_batched_tokens=48,
                                           num_draft_tokens=6), context_window=4096)
    requests = []
    for key, prompt in prompts.items():
        predicted = list(greedy_reference(model, prompt, 24, eos))
        for position in (5, 13, 19):
            predicted[position] = (predicted[position] + 1) % 500
        requests.append(GenerationRequest(key, prompt, 24, stop_token_ids=eos,
                                          predicted_token_ids=tuple(predicted)))
    out, _, events = run(engine, {0: requests})
    for key, prompt in prompts.items():
        assert out[key] == greedy_reference(model, prompt, 24, eos), key
    drafted = sum(e.drafted_tokens or 0 for evs in events.values() for e in evs)
    accepted = sum(e.accepted_tokens or 0 for evs in events.values() for e in evs)
    assert drafted > accepted > 0, (drafted, accepted)
    assert engine.state.rollbacks > 0
    assert_nothing_leaked(engine)
