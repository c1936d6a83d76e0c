"""--quantized-kv-start: a sequence's KV stays in the model's dtype until it holds N tokens,
then it is quantized whole and stays quantized (mlx-lm's `maybe_quantize_kv_cache`).

The engine keeps a float pool and a quantized pool and moves a sequence between them at
exactly N computed tokens (see omlx.scheduler.scheduler).  The reference is mlx-lm alone:
its `KVCache` fed the first N tokens, converted with `to_quantized` when its offset reaches N,
then fed token by token, whatever the batch, prefix sharing or preemption around it.
"""

import random

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.engine import RequestRejected
from omlx.testing.tiny_models import TinyModelSpec, build_model

# Every engine invariant holds with the fused attention kernel and with the portable path.
pytestmark = pytest.mark.usefixtures("attention_kernel")

# Quantization groups run along the head dim, so the fixture needs head_dim >= 64.
SPEC = TinyModelSpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, seed=5)
MAX_NEW = 16
SHARED_PREFIX = [random.Random(17).randrange(5, 500) for _ in range(60)]
# Below this top-2 logit margin the reference's greedy pick is a tie that float noise of a
# different batch shape may decide either way (this random model has exactly tied logits at
# some positions); tokens are compared up to the first such position.
TIE = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = load(str(build_model(tmp_path_factory.mktemp("qs") / "m", SPEC)))
    eos = frozenset(tokenizer.eos_token_ids)
    cache: dict[tuple, tuple[list[int], int]] = {}

    def reference(prompt, max_tokens, bits, start):
        key = (tuple(prompt), bits, start)
        if key not in cache:
            cache[key] = mlx_lm_reference(model, prompt, MAX_NEW, bits, start, eos)
        tokens, decided = cache[key]
        return tokens[:max_tokens], min(decided, max_tokens)

    return model, eos, reference


def mlx_lm_reference(model, prompt, max_tokens, bits, start, eos):
    """mlx-lm run alone: a float `KVCache` converted by `to_quantized` as soon as its offset
    reaches `start` (`maybe_quantize_kv_cache` after every call); the first `start` tokens are
    fed at once, the rest one at a time.  Returns (tokens, how many of them are decided by
    a clear margin)."""
    caches = [KVCache() for _ in model.layers]

    def feed(tokens):
        out = model(mx.array([tokens]), cache=caches)
        if not isinstance(caches[0], QuantizedKVCache) and caches[0].offset >= start:
            for i, c in enumerate(caches):
                caches[i] = c.to_quantized(group_size=64, bits=bits)
        return out

    head = prompt[:start]
    logits = feed(head) if head else None
    for token in prompt[len(head) :]:
        logits = feed([token])
    out: list[int] = []
    decided = None
    for _ in range(max_tokens):
        row = logits[0, -1]
        top2 = mx.sort(row)[-2:]
        if decided is None and float(top2[1] - top2[0]) < TIE:
            decided = len(out)
        token = int(mx.argmax(row).item())
        if token in eos:
            break
        out.append(token)
        logits = feed([token])
    return out, len(out) if decided is None else decided


def drive(engine, prompts, requests, eos):
    outputs = {i: [] for i in range(len(requests))}
    finished = {}
    for step in range(5000):
        for i, r in enumerate(requests):
            if r["arrival"] == step:
                engine.add_request(GenerationRequest(str(i), prompts[i], r["max_tokens"], stop_token_ids=eos))
            if r.get("cancel_after") is not None and r["arrival"] + r["cancel_after"] == step and str(i) not in finished:
                if engine.abort(str(i)) is not None:
                    finished[str(i)] = "abort"
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = event.finish_reason.value
        if len(finished) == len(requests) and not engine.has_work:
            break
    assert len(finished) == len(requests), "some requests never finished"
    return outputs, finished


def assert_no_leaks(engine):
    for pool in (engine.blocks, engine.float_blocks):
        assert pool.leaked_blocks() == []
        assert pool.num_free_blocks == pool.usable_blocks


request_strategy = st.fixed_dictionaries(
    {
        "shared": st.integers(0, len(SHARED_PREFIX)),
        "suffix": st.lists(st.integers(5, 500), min_size=1, max_size=24),
        "max_tokens": st.integers(1, MAX_NEW),
        "arrival": st.integers(0, 10),
        "cancel_after": st.one_of(st.none(), st.none(), st.integers(0, 12)),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=8),
    bits=st.sampled_from([8, 4]),
    start=st.sampled_from([1, 7, 16, 33, 50, 70]),
    block_size=st.sampled_from([4, 8, 16]),
    budget=st.sampled_from([5, 16, 64]),
    spare_blocks=st.integers(0, 30),
)
@pytest.mark.slow
def test_engine_matches_mlx_lm_converting_at_the_threshold(tiny, requests, bits, start, block_size, budget, spare_blocks):
    model, eos, reference = tiny
    prompts = [SHARED_PREFIX[: r["shared"]] + r["suffix"] for r in requests]
    longest = max(len(p) + r["max_tokens"] for p, r in zip(prompts, requests))
    # From "just enough for the longest request" in each pool (constant preemption) to roomy.
    num_blocks = -(-longest // block_size) + 1 + spare_blocks
    float_blocks = -(-min(longest, start) // block_size) + 1 + spare_blocks // 2
    engine = LLMEngine(
        model,
        EngineConfig(block_size=block_size, num_blocks=num_blocks, num_float_blocks=float_blocks,
                     max_num_batched_tokens=budget, kv_bits=bits, quantized_kv_start=start),
        context_window=4096,
    )
    outputs, finished = drive(engine, prompts, requests, eos)
    for i, r in enumerate(requests):
        expected, decided = reference(prompts[i], r["max_tokens"], bits, start)
        got = outputs[i]
        if finished[str(i)] == "abort":
            assert got[:decided] == expected[: min(len(got), decided)], f"request {i} diverged"
        elif decided == len(expected):
            assert got == expected, f"request {i} diverged"
        else:  # past a tie in the reference either pick is right
            assert got[:decided] == expected[:decided], f"request {i} diverged before a tie"
    assert_no_leaks(engine)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.slow
def test_batched_shared_prefix_and_preemption(tiny, bits, one_pass):
    """A fixed schedule crossing the threshold in prefill and in decode, sharing prefixes in
    both pools, in pools small enough to preempt.  Rows of both pools share a forward pass;
    without the attention hook (`one_pass` False) each pool gets its own."""
    model, eos, reference = tiny
    rng = random.Random(bits)
    start = 20
    prompts = [SHARED_PREFIX[: rng.randrange(0, 45)] + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 12))]
               for _ in range(8)]
    requests = [{"arrival": i // 2, "max_tokens": MAX_NEW} for i in range(8)]
    engine = LLMEngine(
        model,
        EngineConfig(block_size=8, num_blocks=20, num_float_blocks=8, max_num_batched_tokens=16,
                     kv_bits=bits, quantized_kv_start=start),
        4096,
    )
    engine.runner.hooked = one_pass
    passes = []
    forward = engine.runner.forward
    # Each pass: how many pools its rows' blocks live in.
    engine.runner.forward = lambda seqs, counts, want, pools: passes.append(len(pools)) or forward(seqs, counts, want, pools)
    outputs, _ = drive(engine, prompts, requests, eos)
    assert any(n == 2 for n in passes) == one_pass
    for i, prompt in enumerate(prompts):
        expected, decided = reference(prompt, MAX_NEW, bits, start)
        assert outputs[i][:decided] == expected[:decided], i
    stats = engine.kv_stats()
    assert stats["migrations"] >= 4 and stats["pools"]["float"]["cached_blocks"] > 0
    assert engine.scheduler.num_preemptions > 0
    assert_no_leaks(engine)


def test_quantized_prefix_serves_a_later_request(tiny):
    """A conversation past the threshold continues from the quantized pool's cache."""
    model, eos, reference = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=40, kv_bits=8, quantized_kv_start=16), 4096)
    first = SHARED_PREFIX[:30]
    outputs, _ = drive(engine, [first], [{"arrival": 0, "max_tokens": MAX_NEW}], eos)
    second = first + outputs[0] + [7, 8, 9]
    outputs2, _ = drive(engine, [second], [{"arrival": 0, "max_tokens": 8}], eos)
    expected, decided = reference(second, 8, 8, 16)
    assert outputs2[0][:decided] == expected[:decided]
    # Its prefix came from the quantized pool: 40 of its tokens were cached, none recomputed in float.
    assert engine.blocks.stats()["prefix_cache_hit_tokens"] >= 40
    assert_no_leaks(engine)


def test_threshold_zero_is_one_quantized_pool(tiny):
    model, _, _ = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=16, kv_bits=8, quantized_kv_start=0), 4096)
    assert engine.float_blocks is None and engine.storage.kv_bits == 8
    assert "pools" not in engine.kv_stats()
    # Without kv_bits the threshold means nothing: one float pool.
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=16, quantized_kv_start=64), 4096)
    assert engine.float_blocks is None and engine.storage.kv_bits is None


def test_requests_that_could_never_fit_either_pool_are_rejected(tiny):
    model, eos, _ = tiny
    engine = LLMEngine(
        model, EngineConfig(block_size=8, num_blocks=10, num_float_blocks=3, kv_bits=8, quantized_kv_start=40), 4096
    )
    # 3 float blocks hold 16 tokens (the scratch block aside): a request reaching 40 needs 5.
    with pytest.raises(RequestRejected, match="float KV"):
        engine.check(GenerationRequest("a", [5] * 30, 20, stop_token_ids=eos))
    engine.check(GenerationRequest("b", [5] * 10, 6, stop_token_ids=eos))  # 16 tokens: float only
    big = LLMEngine(
        model, EngineConfig(block_size=8, num_blocks=4, num_float_blocks=20, kv_bits=8, quantized_kv_start=8), 4096
    )
    with pytest.raises(RequestRejected, match="whole KV cache"):
        big.check(GenerationRequest("c", [5] * 20, 20, stop_token_ids=eos))


def test_growable_pools_share_the_cap_and_the_budget(tiny):
    model, eos, reference = tiny
    asked = []

    def budget(n):
        asked.append(n)
        return True

    config = EngineConfig(block_size=8, kv_cache_bytes=4 << 20, initial_kv_bytes=64 << 10, max_num_seqs=4,
                          kv_bits=8, quantized_kv_start=24)
    engine = LLMEngine(model, config, 4096, kv_budget=budget)
    initial = engine.kv_bytes
    assert engine.max_kv_bytes <= 4 << 20
    float_max = engine.float_blocks.max_blocks * engine.float_storage.bytes_per_block
    assert float_max <= 2 << 20  # at most half the cap, and no more than the sequences could use
    assert engine.float_blocks.max_blocks <= 4 * 3 + 1
    prompts = [SHARED_PREFIX[i : i + 40] for i in range(6)]
    requests = [{"arrival": 0, "max_tokens": MAX_NEW} for _ in prompts]
    outputs, _ = drive(engine, prompts, requests, eos)
    for i, prompt in enumerate(prompts):
        expected, decided = reference(prompt, MAX_NEW, 8, 24)
        assert outputs[i][:decided] == expected[:decided]
    assert engine.pool_growths >= 1 and sum(asked) == engine.kv_bytes - initial  # every growth was asked for
    assert engine.kv_bytes == sum(a.nbytes for a in engine.storage.arrays() + engine.float_storage.arrays())
    assert_no_leaks(engine)
    # Idle, both pools give back what they grew, and serving goes on as before.
    grown = engine.kv_bytes
    assert engine.pool_grown and engine.shrink_pool() == grown - initial and engine.kv_bytes == initial
    assert not engine.pool_grown
    outputs, _ = drive(engine, prompts, requests, eos)
    for i, prompt in enumerate(prompts):
        expected, decided = reference(prompt, MAX_NEW, 8, 24)
        assert outputs[i][:decided] == expected[:decided]
    assert_no_leaks(engine)


@pytest.mark.slow
def test_disk_tier_keeps_each_pool_apart(tiny, tmp_path):
    model, eos, reference = tiny
    config = EngineConfig(block_size=8, num_blocks=40, kv_bits=8, quantized_kv_start=16, kv_cache_dir=str(tmp_path))
    engine = LLMEngine(model, config, 4096, scope=b"tiny", label="tiny")
    prompt = SHARED_PREFIX[:45]
    outputs, _ = drive(engine, [prompt], [{"arrival": 0, "max_tokens": 4}], eos)
    engine.close()
    assert engine.disk.dir != engine.float_disk.dir
    # A fresh engine (a restart) continues the prompt from the quantized pool's files.
    again = LLMEngine(model, config, 4096, scope=b"tiny", label="tiny")
    outputs2, _ = drive(again, [prompt], [{"arrival": 0, "max_tokens": 4}], eos)
    assert outputs2 == outputs
    assert again.blocks.stats()["prefix_cache_hit_tokens"] == 40
    again.close()
    assert engine.disk.dir.exists() and engine.float_disk.dir.exists()  # neither removed the other
    # A prompt under the threshold continues from the float pool's files.
    short = prompt[:15]
    third = LLMEngine(model, config, 4096, scope=b"tiny", label="tiny")
    outputs3, _ = drive(third, [short], [{"arrival": 0, "max_tokens": 4}], eos)
    expected, decided = reference(short, 4, 8, 16)
    assert outputs3[0][:decided] == expected[:decided]
    assert third.float_blocks.stats()["prefix_cache_hit_tokens"] == 8
    third.close()


@pytest.mark.parametrize("start", [12, 20, 26])  # the fork happens past, at, or under the threshold
@pytest.mark.slow
def test_n_completions_share_blocks_in_either_pool(tiny, start):
    from omlx.scheduler import SamplingParams

    model, eos, _ = tiny
    prompt = SHARED_PREFIX[:20]

    def run(request):
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=40, kv_bits=8, quantized_kv_start=start), 4096)
        engine.add_request(request)
        out = {}
        while engine.has_work:
            for _, event in engine.step():
                if event.token_id is not None:
                    out.setdefault(event.index, []).append(event.token_id)
        assert_no_leaks(engine)
        return out

    together = run(GenerationRequest("n3", prompt, 12, SamplingParams(temperature=1.0, seed=40), eos, n=3))
    for i in range(3):
        alone = run(GenerationRequest("one", prompt, 12, SamplingParams(temperature=1.0, seed=40 + i), eos))
        assert together[i] == alone[0], i


# ---------------------------------------------------------------------------- settings


def test_env_names_flag_and_settings_files():
    from omlx.cli import build_parser
    from omlx.settings import SettingsError, resolve_server_options

    assert resolve_server_options({}, {}, {})["quantized_kv_start"] == 0  # default: quantized from the start
    assert resolve_server_options({}, {"QUANTIZED_KV_START": "512"}, {})["quantized_kv_start"] == 512  # mlx-vlm
    env = {"OMLX_QUANTIZED_KV_START": "256", "QUANTIZED_KV_START": "512"}
    assert resolve_server_options({}, env, {"quantized_kv_start": 1024})["quantized_kv_start"] == 256
    assert resolve_server_options({}, {}, {"quantized_kv_start": 1024})["quantized_kv_start"] == 1024
    assert resolve_server_options({"quantized_kv_start": 64}, env, {})["quantized_kv_start"] == 64
    with pytest.raises(SettingsError, match="QUANTIZED_KV_START='-3'"):
        resolve_server_options({}, {"QUANTIZED_KV_START": "-3"}, {})

    args = build_parser().parse_args(["serve", "--kv-bits", "8", "--quantized-kv-start", "128"])
    assert (args.kv_bits, args.quantized_kv_start) == (8, 128)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantized-kv-start", "-1"])


def test_global_and_model_settings_validate_and_apply():
    from omlx.models.pool import engine_config_for
    from omlx.settings import GLOBAL_KEYS, SettingsError, validate_model_settings

    assert GLOBAL_KEYS["quantized_kv_start"](0, "quantized_kv_start") == 0
    with pytest.raises(SettingsError):
        GLOBAL_KEYS["quantized_kv_start"](-1, "quantized_kv_start")
    base = EngineConfig(kv_bits=8, quantized_kv_start=256)
    assert engine_config_for(base, validate_model_settings({"quantized_kv_start": 0})).quantized_kv_start == 0
    assert engine_config_for(base, {}).quantized_kv_start == 256
    for bad in (-1, 1.5, "64", True):
        with pytest.raises(SettingsError):
            validate_model_settings({"quantized_kv_start": bad})


def test_a_sequence_the_quantized_pool_can_never_hold_ends_cleanly(tiny):
    """The memory budget lets the quantized pool grow no further and nothing there will
    finish: the sequence reaching the threshold ends with kv_cache_exhausted, the rest run."""
    model, eos, reference = tiny
    config = EngineConfig(block_size=8, kv_cache_bytes=4 << 20, initial_kv_bytes=1, kv_bits=8, quantized_kv_start=16)
    engine = LLMEngine(model, config, 4096)
    engine.blocks.grower = lambda needed: False  # the budget says no to the quantized pool
    engine.add_request(GenerationRequest("long", SHARED_PREFIX[:12], 40, stop_token_ids=eos))
    engine.add_request(GenerationRequest("short", SHARED_PREFIX[20:26], 4, stop_token_ids=eos))
    events = {}
    while engine.has_work:
        for rid, event in engine.step():
            events.setdefault(rid, []).append(event)
    assert events["long"][-1].error_code == "kv_cache_exhausted"
    assert [e.token_id for e in events["short"] if e.token_id is not None] == reference(SHARED_PREFIX[20:26], 4, 8, 16)[0]
    assert_no_leaks(engine)
