"""The step contract: `schedule()` -> SchedulerOutput -> `runner.execute()` -> RunnerOutput ->
`update_from_output()`.

Both outputs are plain data that survive pickle and a JSON / msgpack-style encoding; a step
driven by hand gives the engine's tokens (and mlx-lm's); and a SchedulerOutput sent through
that encoding to a second runner with its own KV pool (another rank, as part 2 of issue #25
runs them) produces the same RunnerOutput.
"""

import pickle
import random

import mlx.core as mx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from omlx.scheduler.kv_cache import PagedKVStorage
from omlx.scheduler.runner import ModelRunner
from omlx.scheduler.sampler import Sampler
from omlx.scheduler.step import KVOps, RunnerOutput, ScheduledRow, SchedulerOutput
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model

pytestmark = pytest.mark.usefixtures("attention_kernel")

MAX_NEW = 12
_PREFIX_RNG = random.Random(11)  # one generator: a new one per token would repeat one token 40 times
PREFIX = [_PREFIX_RNG.randrange(5, 500) for _ in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # head_dim 32: its KV quantizes (groups of 32), for the two-pool replay.
    path = build_model(tmp_path_factory.mktemp("qwen3") / "m", TinyModelSpec(model_type="qwen3", head_dim=32, seed=5))
    model, tokenizer = load(str(path))
    return model, frozenset(tokenizer.eos_token_ids)


def _requests(eos) -> list[GenerationRequest]:
    """Shared prefixes (prefix cache hits), a prompt that repeats itself (prompt-lookup drafts
    that verify), one asking for logprobs, one n = 2 (a fork), lengths that chunk."""
    rnd = random.Random(3)
    repeat = [rnd.randrange(5, 500) for _ in range(9)]
    return [
        GenerationRequest("a", PREFIX + [7, 8, 9], MAX_NEW, stop_token_ids=eos),
        GenerationRequest("b", PREFIX + [rnd.randrange(5, 500) for _ in range(13)], MAX_NEW, stop_token_ids=eos,
                          logprobs=2),
        GenerationRequest("c", repeat * 4, MAX_NEW, stop_token_ids=eos),
        GenerationRequest("d", PREFIX[:20] + [3, 1, 4], 5, stop_token_ids=eos,
                          sampling=SamplingParams(temperature=0.8, seed=42), n=2),
    ]


def _engine(model, **overrides) -> LLMEngine:
    config = dict(block_size=8, num_blocks=64, max_num_batched_tokens=24, num_draft_tokens=4, speculative=True)
    return LLMEngine(model, EngineConfig(**{**config, **overrides}), context_window=4096)


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _wire(out: SchedulerOutput) -> SchedulerOutput:
    """What another rank receives: the step through a JSON encoding (msgpack takes the same)."""
    return SchedulerOutput.from_plain(orjson.loads(orjson.dumps(out.to_plain())))


def _by_hand(engine: LLMEngine, requests, on_step=None) -> dict[tuple[str, int], list[int]]:
    """Drive the engine's three calls directly; returns each completion's tokens."""
    for request in requests:
        engine.add_request(request)
    tokens: dict[tuple[str, int], list[int]] = {}
    for _ in range(500):
        if not engine.has_work:
            break
        out = engine.scheduler.schedule()
        if out.empty:
            continue
        result = engine.runner.execute(out)
        if on_step is not None:
            on_step(out, result)
        for seq, event in engine.scheduler.update_from_output(out, result):
            if event.token_id is not None:
                tokens.setdefault((seq.request_id, event.index), []).append(event.token_id)
            if event.finish_reason is not None:
                tokens.setdefault((seq.request_id, event.index), [])
    assert not engine.has_work
    return tokens


def _through_engine(engine: LLMEngine, requests) -> dict[tuple[str, int], list[int]]:
    for request in requests:
        engine.add_request(request)
    tokens: dict[tuple[str, int], list[int]] = {}
    for _ in range(500):
        if not engine.has_work:
            break
        for request_id, event in engine.step():
            if event.token_id is not None:
                tokens.setdefault((request_id, event.index), []).append(event.token_id)
            elif event.finish_reason is not None:
                tokens.setdefault((request_id, event.index), [])
    assert not engine.has_work
    return tokens


def test_contract_types_are_plain_data_and_round_trip(tiny):
    model, eos = tiny
    engine = _engine(model)
    outputs = []
    _by_hand(engine, _requests(eos), lambda out, result: outputs.append((out, result)))
    assert any(r.draft for out, _ in outputs for r in out.rows), "no step carried a draft"
    assert any(r.fan_out == 2 for out, _ in outputs for r in out.rows), "no step forked"
    assert any(lp for _, result in outputs for lp in result.logprobs), "no logprobs came back"
    # The only KV operations this workload makes: copies of a partial block for a prompt that
    # shares part of it with a cached one (omlx.scheduler.partial_prefix).
    assert any(out.kv_ops.copies for out, _ in outputs), "no step copied a partial block"
    assert not any(out.kv_ops.migrations or out.kv_ops.disk_loads for out, _ in outputs)
    # KV operations of every kind travel too (bytes as hex in the plain form).
    outputs.append((SchedulerOutput(step=99, rows=[ScheduledRow("x", 1, 1, 16, [5, 6], [3, 4, 9], 1, [6], False, 1)],
                                    kv_ops=KVOps(copies=[(0, 4, 7)], migrations=[(2, 5)],
                                                 disk_loads=[(0, 8, bytes(range(16)))])),
                    RunnerOutput(sampled=[[1, 2]], logprobs=[[(-0.5, [(1, -0.5), (3, -1.25)])] * 2], accepted=[1])))
    for out, result in outputs:
        for value in (out, result):
            assert pickle.loads(pickle.dumps(value)) == value
            plain = value.to_plain()
            assert _is_plain(plain), plain
            assert type(value).from_plain(orjson.loads(orjson.dumps(plain))) == value


def test_a_step_driven_by_hand_gives_the_engines_tokens(tiny):
    model, eos = tiny
    by_hand = _by_hand(_engine(model), _requests(eos))
    engine = _engine(model)
    assert _through_engine(engine, _requests(eos)) == by_hand
    for request in _requests(eos):
        if request.sampling.greedy:
            assert by_hand[(request.request_id, 0)] == greedy_reference(model, request.prompt_token_ids,
                                                                       request.max_tokens, eos)
    assert len([key for key in by_hand if key[0] == "d"]) == 2  # both completions of n = 2
    # The engine's stats: one snapshot, published by the step.
    stats = engine.stats
    assert stats.steps > 0 and stats.running == stats.waiting == 0
    assert stats.generated_tokens == sum(len(t) for t in by_hand.values())
    # Every prompt token is computed once, unless the prefix cache gave it (whole blocks, or
    # copied from a shared partial block: omlx.scheduler.partial_prefix); d's second
    # completion shares whole blocks only, so it recomputes its prompt's partial last block
    # and feeds its first token.
    hits = engine.kv_stats()["prefix_cache_hit_tokens"]
    d = _requests(eos)[3]
    sibling = len(d.prompt_token_ids) % engine.blocks.block_size + 1
    assert hits > 0
    assert stats.prefill_tokens == sum(len(r.prompt_token_ids) for r in _requests(eos)) - hits + sibling
    assert stats.speculative_decoding["accepted_tokens"] > 0


def test_a_step_replayed_on_another_runner_gives_the_same_output(tiny):
    """A second runner with its own pool (and no scheduler) runs every step from the plain
    data alone and produces the same RunnerOutput, step after step: its pool then holds the
    same KV, prefix-cache hits, drafts and preemptions included."""
    model, eos = tiny
    # A pool small enough that sequences are preempted and recomputed.
    engine = _engine(model, num_blocks=13, max_num_batched_tokens=16)
    layout = engine.storage.layout
    replica = ModelRunner(model, PagedKVStorage(layout, engine.storage.num_blocks, engine.storage.block_size),
                          engine.kinds)
    replica.replica = True
    replica.sampler = Sampler()
    replica.resolve = engine.scheduler.scheduled  # sampling state lives with the scheduler's rank
    assert replica.ragged == engine.runner.ragged
    compared = []

    def replay(out, result):
        sent = _wire(out)
        assert sent == out
        again = replica.execute(sent)
        assert again.sampled == result.sampled
        assert again.accepted == result.accepted
        for mine, theirs in zip(result.logprobs, again.logprobs):
            assert (mine is None) == (theirs is None)
            for (lp, top), (lp2, top2) in zip(mine or [], theirs or []):
                assert lp2 == pytest.approx(lp, abs=1e-5) and [t for t, _ in top] == [t for t, _ in top2]
        compared.append(out)

    greedy = [r for r in _requests(eos) if r.sampling.greedy]  # seeded rows would draw twice
    _by_hand(engine, greedy, replay)
    assert engine.scheduler.num_preemptions > 0
    assert any(r.draft for out in compared for r in out.rows)
    assert engine.pool_growths == 0  # the replica's pool has the engine's size throughout
    # And the replica's pool holds the same KV as the engine's, block for block.
    for mine, theirs in zip(engine.storage.arrays(), replica.storage.arrays()):
        assert mx.allclose(mine, theirs).item()


def test_a_runner_without_the_scheduler_runs_the_pass_only(tiny):
    """No `resolve`: the rows still run (the KV lands in the pool) but nothing is sampled -
    a rank that is not the scheduler's leaves sampling to it."""
    model, eos = tiny
    engine = _engine(model, speculative=False)
    replica = ModelRunner(model, PagedKVStorage(engine.storage.layout, engine.storage.num_blocks,
                                                engine.storage.block_size), engine.kinds)
    replica.replica = True
    engine.add_request(GenerationRequest("a", PREFIX, 3, stop_token_ids=eos))
    out = engine.scheduler.schedule()
    result = replica.execute(_wire(out))
    assert result.sampled == [[]] * len(out.rows) and len(result.local) == 1
    # The KV it wrote is what the scheduler's own runner writes for the same step.
    engine.scheduler.update_from_output(out, engine.runner.execute(out))
    for mine, theirs in zip(engine.storage.arrays(), replica.storage.arrays()):
        assert mx.abs(theirs).sum().item() > 0 and mx.allclose(mine, theirs).item()


def test_a_replica_follows_pool_growth_and_moves_between_pools(tiny):
    """Two pools (`quantized_kv_start`: sequences move, quantized, from the float pool to the
    main one) that grow with the load: a replica that starts at the pools' initial sizes
    follows both from the steps' `pool_blocks` and KV operations alone."""
    model, eos = tiny
    probe = _engine(model, speculative=False)
    per_block = probe.storage.bytes_per_block
    engine = LLMEngine(model, EngineConfig(block_size=8, initial_kv_bytes=8 * per_block, kv_cache_bytes=400 * per_block,
                                           kv_bits=8, kv_group_size=32, quantized_kv_start=16,
                                           max_num_batched_tokens=16, speculative=False), context_window=4096)
    assert engine.float_pool is not None
    pools = [PagedKVStorage(s.layout, s.num_blocks, s.block_size, s.kv_bits, s.group_size)
             for s in (engine.storage, engine.float_storage)]
    replica = ModelRunner(model, pools[0], engine.kinds)
    replica.pools = pools
    replica.replica = True
    replica.sampler = Sampler()
    replica.resolve = engine.scheduler.scheduled
    moved = []

    def replay(out, result):
        moved.extend(out.kv_ops.migrations)
        assert replica.execute(_wire(out)).sampled == result.sampled

    tokens = _by_hand(engine, [r for r in _requests(eos) if r.sampling.greedy], replay)
    assert engine.pool_growths > 0 and moved
    assert [p.num_blocks for p in pools] == [engine.storage.num_blocks, engine.float_storage.num_blocks]
    for mine, theirs in zip(engine.storage.arrays() + engine.float_storage.arrays(),
                            pools[0].arrays() + pools[1].arrays()):
        assert mx.array_equal(mine, theirs).item()
    assert all(tokens.values())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(st.fixed_dictionaries({
        "shared": st.integers(0, len(PREFIX)), "suffix": st.lists(st.integers(5, 500), min_size=1, max_size=20),
        "max_tokens": st.integers(1, MAX_NEW), "arrival": st.integers(0, 8),
        "abort_after": st.one_of(st.none(), st.integers(0, 10)), "repeat": st.booleans(),
    }), min_size=1, max_size=6),
    block_size=st.sampled_from([4, 8]),
    budget=st.sampled_from([8, 32]),
    spare_blocks=st.integers(0, 24),
    ragged=st.booleans(),
)
@pytest.mark.slow
def test_any_schedule_replays_on_another_runner(tiny, requests, block_size, budget, spare_blocks, ragged):
    """Hypothesis picks the schedule (arrivals, shared prefixes, drafts from repeated prompts,
    aborts, a pool from just enough to roomy, one ragged pass or padded passes grouped by
    length): every step, sent through the plain encoding, gives the same output on a replica
    runner with its own pool."""
    model, eos = tiny
    prompts = []
    for r in requests:
        prompt = PREFIX[: r["shared"]] + r["suffix"]
        prompts.append(prompt + prompt if r["repeat"] else prompt)
    longest = max(len(p) + r["max_tokens"] for p, r in zip(prompts, requests))
    engine = _engine(model, block_size=block_size, max_num_batched_tokens=budget,
                     num_blocks=-(-longest // block_size) + 3 + spare_blocks)
    replica = ModelRunner(model, PagedKVStorage(engine.storage.layout, engine.storage.num_blocks, block_size),
                          engine.kinds)
    replica.replica, replica.sampler, replica.resolve = True, Sampler(), engine.scheduler.scheduled
    # Padded passes (as for a model whose attention is not routed to the cache); no drafts then.
    engine.runner.hooked = replica.hooked = ragged
    engine.scheduler.speculator.active = ragged
    finished: set[str] = set()
    for step in range(400):
        for i, r in enumerate(requests):
            if r["arrival"] == step:
                engine.add_request(GenerationRequest(str(i), prompts[i], r["max_tokens"], stop_token_ids=eos))
            if r["abort_after"] is not None and r["arrival"] + r["abort_after"] == step and str(i) not in finished:
                engine.abort(str(i))
                finished.add(str(i))
        if not engine.has_work and step > max(r["arrival"] for r in requests):
            break
        out = engine.scheduler.schedule()
        if out.empty:
            continue
        result = engine.runner.execute(out)
        again = replica.execute(_wire(out))
        assert (again.sampled, again.accepted) == (result.sampled, result.accepted), out.step
        for seq, event in engine.scheduler.update_from_output(out, result):
            if event.finish_reason is not None:
                finished.add(seq.request_id)
                engine.sequences.pop(seq.request_id, None)
    assert not engine.has_work
    assert not engine.blocks.leaked_blocks()


def test_blocks_read_back_from_the_disk_tier_are_kv_operations_of_the_step(tiny, tmp_path):
    """A prefix that comes back from the disk tier (here: after a restart) is loaded into the
    pool by the scheduler; the step says which blocks, under which hashes, so that another
    rank can load the same blocks from its own tier."""
    model, eos = tiny
    prompt = PREFIX + [9, 8, 7]
    first = _engine(model, speculative=False, kv_cache_dir=str(tmp_path))
    expected = _by_hand(first, [GenerationRequest("a", prompt, 4, stop_token_ids=eos)])
    first.close()  # its blocks are on disk now
    engine = _engine(model, speculative=False, kv_cache_dir=str(tmp_path))
    loads = []
    tokens = _by_hand(engine, [GenerationRequest("a", prompt, 4, stop_token_ids=eos)],
                      lambda out, result: loads.extend(out.kv_ops.disk_loads))
    assert tokens == expected
    full_blocks = (len(prompt) - 1) // 8
    assert [p for p, _, _ in loads] == [0] * full_blocks
    assert all(engine.blocks.block_hash[b] == h for _, b, h in loads)
