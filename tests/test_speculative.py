"""Speculative decoding inside the batch: drafts verified as extra rows of the ragged pass.

- Greedy output is exactly what mlx-lm generates alone, whatever the drafts (an oracle that
  drafts the right tokens with deliberate mistakes, or prompt lookup), the schedule, the block
  size, preemption and the prefix cache; every block comes back and no unverified token is
  ever published in the prefix cache.
- Sampling with drafts keeps the distribution (the rejection rule, checked statistically on
  a small vocabulary) and seeded requests replay.
- The API: OpenAI `prediction` drafts, per-request opt-out, usage and /health counts.
"""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_reference, reference_greedy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.scheduler.sampler import Sampler
from omlx.scheduler.sequence import Sequence
from omlx.scheduler.speculation import DraftPolicy, NgramIndex, PromptLookupDrafter, SpeculationConfig
from omlx.scheduler.verification import filtered_probs, verify_drafts

pytestmark = pytest.mark.usefixtures("attention_kernel")

MAX_NEW = 24
BASE = [random.Random(5).randrange(5, 500) for _ in range(40)]


@pytest.fixture(scope="module")
def tiny(model_dir):
    path = model_dir / "tiny"
    model, tokenizer = load_reference(path)
    return path, model, frozenset(tokenizer.eos_token_ids)


class OracleDrafter:
    """Drafts the tokens mlx-lm would generate, with a wrong token at random places: every
    acceptance length and rollback happens, independent of what the tiny model repeats."""

    name = "oracle"
    immediate = True

    def __init__(self, expected: dict[str, list[int]], error_rate: float, seed: int):
        self.expected = expected
        self.error_rate = error_rate
        self.rng = random.Random(seed)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        truth = self.expected[seq.request_id][seq.num_output_tokens :][:limit]
        return [t if self.rng.random() >= self.error_rate else (t + 1) % 500 for t in truth]


def run_engine(engine: LLMEngine, requests: list[GenerationRequest], arrivals: list[int] | None = None):
    arrivals = arrivals or [0] * len(requests)
    outputs = {r.request_id: [] for r in requests}
    finished = {}
    step = 0
    while step < 5000:
        for r, at in zip(requests, arrivals):
            if at == step:
                engine.add_request(r)
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[request_id].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = event.finish_reason
        step += 1
        if len(finished) == len(requests) and not engine.has_work:
            break
    assert len(finished) == len(requests), "some requests never finished"
    assert engine.blocks.leaked_blocks() == []
    assert engine.blocks.num_free_blocks == engine.blocks.usable_blocks
    return outputs


def published_blocks_match_tokens(engine: LLMEngine, prompts: dict[str, list[int]], outputs: dict[str, list[int]]):
    """Every hash in the prefix cache is the hash of a real token prefix of some request:
    nothing drafted and rejected was ever published."""
    from omlx.scheduler.block_manager import hash_block

    blocks = engine.blocks
    bs = blocks.block_size
    valid = set()
    for rid, prompt in prompts.items():
        tokens = prompt + outputs[rid]
        parent = blocks.scope
        for i in range(len(tokens) // bs):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            valid.add(parent)
    assert set(blocks.hash_to_block) <= valid


request_strategy = st.fixed_dictionaries({
    "shared": st.integers(0, len(BASE)),
    "suffix": st.lists(st.integers(5, 500), min_size=1, max_size=12),
    "repeat": st.booleans(),  # the prompt repeats itself: prompt lookup finds drafts
    "max_tokens": st.integers(1, MAX_NEW),
    "arrival": st.integers(0, 8),
    "speculative": st.booleans(),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=6),
    block_size=st.sampled_from([4, 8, 16]),
    budget=st.sampled_from([8, 24, 64]),
    spare_blocks=st.integers(0, 30),
    drafter=st.sampled_from(["oracle", "prompt_lookup"]),
    error_rate=st.sampled_from([0.0, 0.2, 0.6]),
    max_draft=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
@pytest.mark.slow
def test_greedy_tokens_equal_mlx_lm_alone(tiny, requests, block_size, budget, spare_blocks, drafter,
                                          error_rate, max_draft, seed):
    path, model, eos = tiny
    prompts = {}
    for i, r in enumerate(requests):
        prompt = BASE[: r["shared"]] + r["suffix"]
        prompts[str(i)] = prompt + prompt if r["repeat"] else prompt
    longest = max(len(prompts[str(i)]) + r["max_tokens"] for i, r in enumerate(requests))
    num_blocks = -(-longest // block_size) + 2 + spare_blocks
    engine = LLMEngine(model, EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                                           num_draft_tokens=max_draft), context_window=4096)
    expected = {rid: reference_greedy(path, p, MAX_NEW)[0] for rid, p in prompts.items()}
    if drafter == "oracle":
        engine.scheduler.speculator.drafter = OracleDrafter(expected, error_rate, seed)
    reqs = [GenerationRequest(str(i), prompts[str(i)], r["max_tokens"], stop_token_ids=eos, speculative=r["speculative"])
            for i, r in enumerate(requests)]
    outputs = run_engine(engine, reqs, [r["arrival"] for r in requests])
    for i, r in enumerate(requests):
        assert outputs[str(i)] == expected[str(i)][: r["max_tokens"]], f"request {i} diverged"
    published_blocks_match_tokens(engine, prompts, outputs)
    if drafter == "oracle" and any(r["speculative"] and r["max_tokens"] > 2 for r in requests):
        assert engine.scheduler.speculator.drafted_tokens > 0


def test_oracle_drafts_cut_steps_and_rejections_roll_back(tiny):
    """Right drafts save steps; wrong ones cost only their rows (same tokens either way)."""
    path, model, eos = tiny
    prompt = BASE[:30]
    expected = reference_greedy(path, prompt, MAX_NEW)[0]
    steps = {}
    for label, error_rate in (("off", None), ("perfect", 0.0), ("noisy", 0.5)):
        engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=40, speculative=error_rate is not None),
                           context_window=4096)
        if error_rate is not None:
            engine.scheduler.speculator.drafter = OracleDrafter({"r": expected}, error_rate, 1)
        out = run_engine(engine, [GenerationRequest("r", prompt, len(expected), stop_token_ids=eos)])
        assert out["r"] == expected
        steps[label] = engine.stats.steps
        if error_rate == 0.0:
            stats = engine.scheduler.speculator.stats()
            assert stats["accepted_tokens"] == stats["drafted_tokens"] > 0
        if error_rate == 0.5:
            stats = engine.scheduler.speculator.stats()
            assert 0 < stats["accepted_tokens"] < stats["drafted_tokens"]
    assert steps["perfect"] < steps["noisy"] <= steps["off"]


def cheap_rows_drafts(tiny, sequences: int, error_rate: float):
    """Run `sequences` identical requests with an oracle drafter on an engine whose cheap
    decode form holds 2 rows; returns (decodes in the step, draft tokens) of every draft of a
    step of decodes alone (a step with a prompt chunk is past the cheap form anyway)."""
    path, model, eos = tiny
    prompt = BASE[:30]
    expected = reference_greedy(path, prompt, MAX_NEW)[0]
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=80), context_window=4096)
    engine.scheduler.config.cheap_rows = 2
    engine.scheduler.speculator.drafter = OracleDrafter({f"r{i}": expected for i in range(sequences)}, error_rate, 1)
    drafted = []
    plan, scheduler = engine.scheduler.speculator.plan, engine.scheduler

    def recording(seq, cap):
        k = plan(seq, cap)
        if not scheduler.waiting and not any(s.is_prefilling for s in scheduler.running):
            drafted.append((sum(1 for s in scheduler.running if s.status.name == "RUNNING"), k))
        return k

    engine.scheduler.speculator.plan = recording
    out = run_engine(engine, [GenerationRequest(f"r{i}", prompt, len(expected), stop_token_ids=eos)
                              for i in range(sequences)])
    assert all(tokens == expected for tokens in out.values())
    return drafted


def test_drafts_keep_a_step_within_the_cheap_decode_form(tiny):
    """A dual-form model reads its stored codes up to `cheap_rows` rows a call: while drafts
    are mostly rejected, a step of n decodes alone drafts at most cheap_rows - n tokens (a
    longer draft would make every row of the step read the packed bytes).  Tokens unchanged."""
    for sequences in (1, 2):
        drafted = cheap_rows_drafts(tiny, sequences, error_rate=0.75)
        assert drafted and all(k <= max(0, 2 - n) for n, k in drafted)
        assert ((1, 1) if sequences == 1 else (2, 0)) in drafted


def test_drafts_that_are_accepted_grow_past_the_cheap_form(tiny):
    """Drafts accepted (>= 60% of 8 or more tokens) pay for the expensive form: they grow."""
    drafted = cheap_rows_drafts(tiny, 1, error_rate=0.0)
    assert drafted[0] == (1, 1) and max(k for _, k in drafted) > 1


def test_prompt_lookup_speeds_up_a_repeating_output(tiny):
    """A prompt that holds the text the model goes on to write (its own earlier output):
    prompt lookup drafts it and most drafts are accepted; tokens unchanged."""
    path, model, eos = tiny
    head = BASE[:12]
    first = reference_greedy(path, head, MAX_NEW)[0]
    prompt = head + first + head  # the model's answer to `head` is now in its context
    expected = reference_greedy(path, prompt, MAX_NEW)[0]
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=60), context_window=4096)
    out = run_engine(engine, [GenerationRequest("r", prompt, MAX_NEW, stop_token_ids=eos)])
    assert out["r"] == expected
    stats = engine.scheduler.speculator.stats()
    if expected[:8] == first[:8]:  # the context's copy is what it writes again
        assert stats["accepted_tokens"] >= 4


def test_logprobs_with_drafts_equal_without(tiny):
    path, model, eos = tiny
    prompt = BASE[:20]
    expected = reference_greedy(path, prompt, MAX_NEW)[0]
    results = []
    for spec in (False, True):
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=40, speculative=spec), context_window=4096)
        if spec:
            engine.scheduler.speculator.drafter = OracleDrafter({"r": expected}, 0.3, 2)
        engine.add_request(GenerationRequest("r", prompt, MAX_NEW, stop_token_ids=eos, logprobs=3))
        events = []
        while engine.has_work:
            events += [e for _, e in engine.step() if e.token_id is not None]
        results.append(events)
    plain, drafted = results
    assert [e.token_id for e in plain] == [e.token_id for e in drafted] == expected[: len(plain)]
    for a, b in zip(plain, drafted):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert [t for t, _ in b.top_logprobs] == [t for t, _ in a.top_logprobs]


def test_stop_token_inside_accepted_draft_ends_there(tiny):
    """A stop token the model picks in the middle of a verified draft ends the request at
    that token; the draft's later tokens are never emitted."""
    path, model, _ = tiny
    prompt = BASE[:16]
    free = reference_greedy(path, prompt, MAX_NEW)[0]
    stop = free[5]
    expected = free[: free.index(stop)]
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=40), context_window=4096)
    engine.scheduler.speculator.drafter = OracleDrafter({"r": free}, 0.0, 3)
    out = run_engine(engine, [GenerationRequest("r", prompt, MAX_NEW, stop_token_ids=frozenset({stop}))])
    assert out["r"] == expected


def test_seeded_sampling_with_drafts_replays(tiny):
    path, model, eos = tiny
    prompt = BASE[:24] + BASE[:24]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    runs = []
    for neighbours in (0, 3):
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=120), context_window=4096)
        reqs = [GenerationRequest("s", prompt, MAX_NEW, sampling=params, stop_token_ids=eos)]
        reqs += [GenerationRequest(f"n{i}", BASE[i : i + 10], MAX_NEW, stop_token_ids=eos) for i in range(neighbours)]
        runs.append(run_engine(engine, reqs)["s"])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------- the rejection rule


def _fake_seqs(count: int, draft: list[int], params: SamplingParams) -> list[Sequence]:
    seqs = []
    for i in range(count):
        seq = Sequence(GenerationRequest(f"x{i}", [1, 2, 3], 10, sampling=params))
        seq.draft = list(draft)
        seqs.append(seq)
    return seqs


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was emitted"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
])
@pytest.mark.parametrize("draft_token", [0, 2, 5])
@pytest.mark.slow
def test_rejection_rule_keeps_the_distribution(params, draft_token):
    """Over a 6-token vocabulary: the first token emitted with a one-token draft is
    distributed as the non-speculative sampler's distribution, and so is the token after an
    accepted draft (the second row's distribution)."""
    trials = 6000
    row0 = mx.array([2.0, 1.0, 0.5, 0.0, -0.5, 1.5])
    row1 = mx.array([0.0, 0.3, 2.5, 1.0, -1.0, 0.2])
    logits = mx.concatenate([mx.stack([row0, row1])] * trials)
    seqs = _fake_seqs(trials, [draft_token], params)
    results = verify_drafts(Sampler(seed=0), logits, seqs)
    p0 = np.asarray(filtered_probs(row0[None], [params]))[0]
    p1 = np.asarray(filtered_probs(row1[None], [params]))[0]
    first = np.bincount([tokens[0] for tokens, _ in results], minlength=6)
    second = np.bincount([tokens[1] for tokens, _ in results if len(tokens) == 2], minlength=6)
    # Chi-square, 5 degrees of freedom: 20.5 is its 0.999 quantile (Sampler(seed=0) fixes
    # the draw, so the test is deterministic).
    assert _chi_square(first, p0) < 20.5
    if second.sum() > 200:
        assert _chi_square(second, p1) < 20.5
    assert abs(first[draft_token] / trials - p0[draft_token]) < 0.03


def test_filtered_probs_match_the_samplers_kept_set():
    """The distribution the verifier tests drafts against is the one the sampler samples."""
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(4, 50)).astype(np.float32))
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, min_p=0.3), SamplingParams(temperature=0.5)]
    probs = np.asarray(filtered_probs(logits, params))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs[0] > 0).sum() == 5
    assert (probs[3] > 0).sum() == 50
    # The sampler, run on many uniforms, never leaves each row's kept set.
    sampler = Sampler(seed=1)
    for row, p in enumerate(params):
        seqs = [Sequence(GenerationRequest(f"q{i}", [1], 4, sampling=p)) for i in range(400)]
        tokens = sampler(mx.repeat(logits[row : row + 1], 400, axis=0), seqs)
        assert all(probs[row, t] > 0 for t in tokens)


# ---------------------------------------------------------------------------- drafting


def test_ngram_index_finds_the_latest_continuation():
    index = NgramIndex(range(3, 1, -1))
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 1, 2, 3]
    # Tail (1, 2, 3) occurred at 0..2, followed by 4, 5, 9.
    assert index.continuation(tokens, 3) == [4, 5, 9]
    tokens += [4]
    # Tail (2, 3, 4): latest earlier occurrence at 6..8, followed by 7, 1.
    assert index.continuation(tokens, 2) == [7, 1]
    assert NgramIndex(range(3, 1, -1)).continuation([5, 6, 7, 8], 4) == []


def test_prompt_lookup_reads_the_prediction_too():
    drafter = PromptLookupDrafter(SpeculationConfig())
    request = GenerationRequest("p", [10, 11, 12], 20, predicted_token_ids=(11, 12, 40, 41, 42))
    seq = Sequence(request)
    from omlx.scheduler.speculation import SequenceSpeculation

    seq.speculation = SequenceSpeculation(SpeculationConfig())
    assert drafter.propose(seq, 4) == [40, 41, 42, 10]
    seq.token_ids += [40, 41]
    assert drafter.propose(seq, 2) == [42, 10]


def test_draft_policy_grows_shrinks_and_pauses():
    config = SpeculationConfig(initial_draft_tokens=4, max_draft_tokens=8, misses_before_pause=2)
    policy = DraftPolicy(config)
    assert policy.wanted() == 4
    policy.record(4, 4)
    assert policy.wanted() == 6
    policy.record(6, 2)
    assert policy.wanted() == 3
    policy.record(3, 0)
    assert policy.wanted() == 1
    policy.record(1, 0)  # second miss in a row: paused
    paused = [policy.wanted() for _ in range(2)]
    assert paused == [0, 0]
    assert policy.wanted() == 1  # resumes after the pause
    policy.record(1, 0)  # misses again: a longer pause
    assert [policy.wanted() for _ in range(4)] == [0, 0, 0, 0]


# ---------------------------------------------------------------------------- the API


def test_prediction_drafts_the_answer_and_usage_counts_it(client, model_dir):
    messages = [{"role": "user", "content": "Say something long about block tables."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                           extra_body={"speculative_decoding": False})
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    predicted = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0,
        prediction={"type": "content", "content": plain.choices[0].message.content},
    )
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert predicted.usage.completion_tokens == plain.usage.completion_tokens


def test_bad_prediction_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body={"prediction": {"type": "text", "content": "x"}})
    assert err.value.body["param"] == "prediction"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body={"speculative_decoding": "yes"})


def test_health_reports_drafted_and_accepted(client, server):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "repeat repeat repeat"}],
                                   max_tokens=8)
    health = server.health()
    spec = health["models_loaded"]["tiny"]["speculative_decoding"]
    assert spec["enabled"] is True and spec["drafter"] == "prompt_lookup"
    assert spec["accepted_tokens"] <= spec["drafted_tokens"]


# ---------------------------------------------------------------------------- draft model


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """A second tiny model with the same tokenizer: one layer, its own random weights."""
    from omlx.testing.tiny_models import TinyModelSpec, build_model

    path = build_model(tmp_path_factory.mktemp("draft") / "tiny-draft", TinyModelSpec(num_hidden_layers=1, seed=21))
    return load_reference(path)[0]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=5),
    block_size=st.sampled_from([4, 8, 16]),
    budget=st.sampled_from([8, 64]),
    spare_blocks=st.integers(0, 20),
    max_draft=st.integers(1, 6),
    same_model=st.booleans(),
)
@pytest.mark.slow
def test_draft_model_greedy_tokens_equal_mlx_lm_alone(tiny, small_draft, requests, block_size, budget,
                                                      spare_blocks, max_draft, same_model):
    """Drafts from a draft model, batched over all drafting sequences in its own paged KV:
    the main model's tokens never change, and both pools get every block back."""
    path, model, eos = tiny
    prompts = {}
    for i, r in enumerate(requests):
        prompt = BASE[: r["shared"]] + r["suffix"]
        prompts[str(i)] = prompt + prompt if r["repeat"] else prompt
    longest = max(len(prompts[str(i)]) + r["max_tokens"] for i, r in enumerate(requests))
    num_blocks = -(-longest // block_size) + 2 + spare_blocks
    draft = model if same_model else small_draft
    engine = LLMEngine(model, EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                                           num_draft_tokens=max_draft), context_window=4096, draft_model=draft)
    assert engine.scheduler.speculator.drafter.name == "draft_model"
    reqs = [GenerationRequest(str(i), prompts[str(i)], r["max_tokens"], stop_token_ids=eos, speculative=r["speculative"])
            for i, r in enumerate(requests)]
    outputs = run_engine(engine, reqs, [r["arrival"] for r in requests])
    for i, r in enumerate(requests):
        assert outputs[str(i)] == reference_greedy(path, prompts[str(i)], MAX_NEW)[0][: r["max_tokens"]]
    published_blocks_match_tokens(engine, prompts, outputs)
    draft_blocks = engine.scheduler.speculator.drafter.blocks
    assert draft_blocks.leaked_blocks() == []


def test_the_model_itself_as_draft_is_accepted(tiny):
    """Drafting with the main model's own weights: its drafts are its own greedy choices, so
    (almost) all are accepted, and decoding takes far fewer steps."""
    path, model, eos = tiny
    prompt = BASE[:24]
    expected = reference_greedy(path, prompt, MAX_NEW)[0]
    steps = {}
    for drafting in (False, True):
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=60, speculative=drafting),
                           context_window=4096, draft_model=model if drafting else None)
        out = run_engine(engine, [GenerationRequest("r", prompt, len(expected), stop_token_ids=eos)])
        assert out["r"] == expected
        steps[drafting] = engine.stats.steps
        if drafting:
            stats = engine.scheduler.speculator.stats()
            assert stats["accepted_tokens"] >= 0.9 * stats["drafted_tokens"] > 0
            assert stats["draft_passes"] > 0
    assert steps[True] < steps[False] / 2


def test_server_drafts_with_the_draft_model_setting(model_dir, tmp_path):
    """`--draft-model` names a model in the model dirs with the same tokenizer; the served
    tokens are the greedy reference and /health names the drafter."""
    import openai
    from conftest import chat_prompt_ids, decode
    from omlx_process import omlx_server

    messages = [{"role": "user", "content": "count the blocks twice"}]
    with omlx_server(model_dir, tmp_path, "--draft-model", "tiny-llama", failure=pytest.fail) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="x")
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
        expected, _ = reference_greedy(model_dir / "tiny", chat_prompt_ids(model_dir / "tiny", messages), 20)
        assert reply.choices[0].message.content == decode(model_dir / "tiny", expected)
        spec = running.health()["models_loaded"]["tiny"]["speculative_decoding"]
        assert spec["drafter"] == "draft_model" and spec["draft_passes"] > 0
        usage = reply.usage.completion_tokens_details
        assert usage.accepted_prediction_tokens + usage.rejected_prediction_tokens == spec["drafted_tokens"]


def test_stop_strings_n_and_grammar_behave_as_without_speculation(client):
    """Through the API with predictions (drafts that are mostly right): a stop string inside
    an accepted draft still ends the text there, n > 1 greedy choices all equal the plain
    answer, and a grammar-constrained request (which never drafts) is unchanged."""
    messages = [{"role": "user", "content": "Tell me about paged attention and blocks."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                           extra_body={"speculative_decoding": False})
    text = plain.choices[0].message.content
    prediction = {"type": "content", "content": text}
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0, stop=[stop],
                                         prediction=prediction)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0, n=2,
                                          prediction=prediction)
    assert [c.message.content for c in many.choices] == [text, text]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    outputs = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                              response_format=fmt, extra_body={"speculative_decoding": spec})
               .choices[0].message.content for spec in (False, True)]
    assert outputs[0] == outputs[1]


def test_metrics_count_drafted_and_accepted_tokens(client, server):
    """/metrics' speculative counters move by exactly what the responses' usage reported."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(server.root + "/metrics", timeout=10) as response:
            text = response.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("model_name") == "tiny" and s.name.startswith("omlx:spec_decode")}

    messages = [{"role": "user", "content": "Describe a block manager, twice."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                           extra_body={"speculative_decoding": False})
    before = scrape()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                           prediction={"type": "content", "content": plain.choices[0].message.content})
    after = scrape()
    details = reply.usage.completion_tokens_details
    drafted = after["omlx:spec_decode_num_draft_tokens_total"] - before.get("omlx:spec_decode_num_draft_tokens_total", 0)
    accepted = after["omlx:spec_decode_num_accepted_tokens_total"] - before.get("omlx:spec_decode_num_accepted_tokens_total", 0)
    assert accepted == details.accepted_prediction_tokens > 0
    assert drafted == details.accepted_prediction_tokens + details.rejected_prediction_tokens
