"""A KV pool that starts small and grows as requests need blocks, within a cap and a memory
budget shared with other models; what happens when the budget says no.

Growth must be invisible to outputs (greedy tokens equal mlx-lm run alone), keep every block's
contents, never leak a block, and stop at the cap or wherever the budget stops it; then the
scheduler preempts, and a request that could never get its blocks alone ends with a clear
error while the others carry on.
"""

import random

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load

from omlx.models.memory_ledger import MemoryLedger
from omlx.scheduler import EngineConfig, FinishReason, GenerationRequest, LLMEngine
from omlx.scheduler.block_manager import BlockManager
from omlx.scheduler.kv_cache import KVLayout, PagedKVStorage
from omlx.scheduler.sequence import Sequence
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model

MAX_NEW = 16
BLOCK = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("grow") / "m", TinyModelSpec(model_type="qwen3", seed=5))
    model, tokenizer = load(str(path))
    eos = frozenset(tokenizer.eos_token_ids)
    cache: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], max_tokens: int) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            cache[key] = greedy_reference(model, prompt, MAX_NEW, eos)
        return cache[key][:max_tokens]

    layout = KVLayout.probe(model)
    return model, eos, reference, layout


def block_bytes(layout: KVLayout, kv_bits=None) -> int:
    return PagedKVStorage.bytes_per_token(layout, kv_bits) * BLOCK


def run_to_end(engine: LLMEngine, requests: list[GenerationRequest], max_steps: int = 5000):
    outputs = {r.request_id: [] for r in requests}
    finished = {}
    for r in requests:
        engine.add_request(r)
    for _ in range(max_steps):
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[request_id].append(event.token_id)
            if event.finish_reason is not None:
                finished[request_id] = event
        if not engine.has_work:
            break
    assert not engine.has_work, "the engine never finished its work"
    return outputs, finished



# ---------------------------------------------------------------------------- storage


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_storage_grow_keeps_every_row(kv_bits):
    layout = KVLayout(num_layers=2, num_kv_heads=2, key_dim=64, value_dim=64, dtype=mx.float32)
    storage = PagedKVStorage(layout, num_blocks=3, block_size=BLOCK, kv_bits=kv_bits, group_size=32)
    rows = mx.arange(storage.num_blocks * layout.num_kv_heads * BLOCK)
    for layer in range(layout.num_layers):
        keys = mx.random.normal((1, layout.num_kv_heads, 3 * BLOCK, layout.key_dim), key=mx.random.key(layer))
        storage.write(layer, keys, keys * 2, rows)
    mx.eval(storage.arrays())
    before = [np.array(a) for a in storage.arrays()]
    storage.grow(10)
    after = [np.array(a) for a in storage.arrays()]
    assert storage.num_blocks == 10
    assert storage.nbytes == sum(a.nbytes for a in after)  # the accounting is the real arrays
    for old, new in zip(before, after):
        assert new.shape[0] == old.shape[0] * 10 // 3
        np.testing.assert_array_equal(new[: old.shape[0]], old)


def test_block_manager_grows_before_evicting_cached_prefixes():
    grown = []
    bm = BlockManager(num_blocks=3, block_size=4, max_blocks=8)

    def grower(needed: int) -> bool:
        extra = max(needed, bm.num_blocks)
        extra = min(extra, bm.max_blocks - bm.num_blocks)
        grown.append(extra)
        bm.add_blocks(extra)
        return True

    bm.grower = grower
    first = Sequence(GenerationRequest("a", list(range(10, 18)), 4))
    assert bm.allocate(first, 8)  # both free blocks
    first.num_computed_tokens = 8
    bm.cache_full_blocks(first)
    bm.free(first)  # two cached prefix blocks now sit in the free list
    other = Sequence(GenerationRequest("b", list(range(50, 58)), 4))
    assert bm.allocate(other, 8)
    assert grown == [3]  # grew rather than evict the cached prefix
    assert bm.num_cached_blocks == 2
    assert bm.usable_blocks == 5 and bm.max_usable_blocks == 7


# ---------------------------------------------------------------------------- engine


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.lists(st.integers(5, 500), min_size=1, max_size=40), min_size=1, max_size=8),
    budget_blocks=st.integers(0, 10),
    seed=st.integers(0, 1000),
)
@pytest.mark.slow
def test_growing_pool_matches_mlx_lm_alone(tiny, prompts, budget_blocks, seed):
    """The pool starts at 2 blocks; a budget (like another model's weights taking memory)
    stops its growth somewhere random; outputs never change and no block leaks."""
    model, eos, reference, layout = tiny
    per_block = block_bytes(layout)
    longest = max(len(p) for p in prompts) + MAX_NEW
    must_fit = -(-longest // BLOCK) + 1  # the longest request alone, plus the scratch block
    ledger = MemoryLedger(capacity=(must_fit + budget_blocks) * per_block)
    ledger.set("initial", 2 * per_block)
    engine = LLMEngine(
        model,
        EngineConfig(block_size=BLOCK, kv_cache_bytes=200 * per_block, initial_kv_bytes=1, max_num_batched_tokens=24),
        context_window=4096,
        kv_budget=lambda n: ledger.try_add("kv", n),
    )
    assert engine.storage.num_blocks == 2
    rng = random.Random(seed)
    requests = [GenerationRequest(str(i), p, rng.randint(1, MAX_NEW), stop_token_ids=eos) for i, p in enumerate(prompts)]
    outputs, finished = run_to_end(engine, requests)
    for r in requests:
        assert finished[r.request_id].error is None
        assert outputs[r.request_id] == reference(r.prompt_token_ids, r.max_tokens)
    assert engine.blocks.leaked_blocks() == []
    assert engine.blocks.num_free_blocks == engine.blocks.usable_blocks
    # Every grown byte was granted by the budget, and the pool's size is what it says.
    assert engine.storage.nbytes == 2 * per_block + ledger.held("kv")
    assert engine.storage.nbytes == sum(a.nbytes for a in engine.storage.arrays())
    assert ledger.used <= ledger.capacity


def test_pool_grows_to_its_cap_and_no_further(tiny):
    model, eos, reference, layout = tiny
    per_block = block_bytes(layout)
    engine = LLMEngine(
        model, EngineConfig(block_size=BLOCK, kv_cache_bytes=12 * per_block, initial_kv_bytes=1), context_window=4096
    )
    prompts = [[7 + i] * 30 for i in range(6)]  # 6 x 5-6 blocks: more than the cap at once
    requests = [GenerationRequest(str(i), p, MAX_NEW, stop_token_ids=eos) for i, p in enumerate(prompts)]
    outputs, finished = run_to_end(engine, requests)
    assert engine.storage.num_blocks == 12 and engine.pool_growths >= 2
    assert engine.scheduler.num_preemptions > 0  # at the cap, the scheduler preempts instead
    for r in requests:
        assert outputs[r.request_id] == reference(r.prompt_token_ids, MAX_NEW)
    stats = engine.kv_stats()
    assert stats["bytes"] == stats["max_bytes"] == 12 * per_block and stats["max_blocks"] == 11


def test_request_that_cannot_get_memory_fails_alone(tiny):
    """The budget lets the pool hold 6 blocks; one request needs 8: it ends with a
    kv_cache_exhausted error, and a short request beside it is served in full."""
    model, eos, reference, layout = tiny
    per_block = block_bytes(layout)
    ledger = MemoryLedger(capacity=4 * per_block)  # 2 initial blocks (not counted here) + 4
    engine = LLMEngine(
        model, EngineConfig(block_size=BLOCK, kv_cache_bytes=64 * per_block, initial_kv_bytes=1), context_window=4096,
        kv_budget=lambda n: ledger.try_add("kv", n),
    )
    long = GenerationRequest("long", list(range(20, 70)), 10, stop_token_ids=eos)  # 60 tokens: 8 blocks
    short = GenerationRequest("short", [5, 6, 7], 5, stop_token_ids=eos)
    engine.check(long)  # fits the cap: not rejected up front
    outputs, finished = run_to_end(engine, [long, short])
    assert finished["long"].finish_reason is FinishReason.ERROR
    assert finished["long"].error_code == "kv_cache_exhausted" and "KV cache memory" in finished["long"].error
    assert finished["short"].error is None
    assert outputs["short"] == reference(short.prompt_token_ids, 5)
    assert engine.blocks.leaked_blocks() == []
    assert engine.storage.num_blocks <= 6


def test_default_cap_is_what_the_budget_leaves_after_weights():
    from omlx.scheduler import default_kv_cache_bytes
    from omlx.scheduler.engine import INITIAL_KV_BYTES

    gib = 1 << 30
    assert default_kv_cache_bytes(2 * gib, 20 * gib) == 20 * gib - 2 * gib - 2 * gib  # margin: a tenth
    assert default_kv_cache_bytes(1 * gib, 4 * gib) == 4 * gib - 1 * gib - 1 * gib  # margin: at least 1 GiB
    assert default_kv_cache_bytes(10 * gib, 8 * gib) == INITIAL_KV_BYTES  # weights fill it: the minimum


def test_out_of_kv_memory_is_a_503_in_each_api_shape():
    from omlx.api.generation import EngineFailure

    error = EngineFailure("out of KV cache memory: ...", "kv_cache_exhausted").api_error()
    assert error.status == 503
    assert error.body()["error"]["code"] == "kv_cache_exhausted"
    assert error.anthropic_body()["error"]["type"] == "overloaded_error"
    internal = EngineFailure("boom").api_error()
    assert internal.status == 500 and internal.body()["error"]["code"] == "engine_error"


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_storage_shrink_keeps_the_leading_blocks(kv_bits):
    layout = KVLayout(num_layers=2, num_kv_heads=2, key_dim=64, value_dim=64, dtype=mx.float32)
    storage = PagedKVStorage(layout, num_blocks=6, block_size=BLOCK, kv_bits=kv_bits)
    rows = mx.arange(6 * layout.num_kv_heads * BLOCK)
    for layer in range(layout.num_layers):
        keys = mx.random.normal((1, layout.num_kv_heads, 6 * BLOCK, 64), key=mx.random.key(layer))
        storage.write(layer, keys, -keys, rows)
    before = [np.array(a) for a in storage.arrays()]
    storage.shrink(2)
    after = [np.array(a) for a in storage.arrays()]
    assert storage.num_blocks == 2 and storage.nbytes == sum(a.nbytes for a in after)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old[: old.shape[0] // 3])


def test_engine_gives_back_grown_memory_only_when_idle(tiny):
    model, eos, reference, layout = tiny
    per_block = block_bytes(layout)
    engine = LLMEngine(
        model, EngineConfig(block_size=BLOCK, kv_cache_bytes=64 * per_block, initial_kv_bytes=1), context_window=4096
    )
    prompts = [[9 + i] * 40 for i in range(4)]
    requests = [GenerationRequest(str(i), p, 6, stop_token_ids=eos) for i, p in enumerate(prompts)]
    run_to_end(engine, requests)
    grown = engine.storage.num_blocks
    assert grown > 2 and engine.blocks.num_cached_blocks > 0
    busy = GenerationRequest("busy", prompts[0] + [3], 4, stop_token_ids=eos)
    engine.add_request(busy)
    assert engine.shrink_pool() == 0 and engine.storage.num_blocks == grown  # a request in flight
    engine.abort("busy")
    freed = engine.shrink_pool()
    assert freed == (grown - 2) * per_block and engine.storage.num_blocks == 2
    assert engine.blocks.num_blocks == 2 and all(b < 2 for b in engine.blocks.hash_to_block.values())
    # It serves on, growing again as needed, with the same outputs.
    outputs, _ = run_to_end(engine, [GenerationRequest(f"again{i}", p, 6, stop_token_ids=eos) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert outputs[f"again{i}"] == reference(p, 6)
    assert engine.blocks.leaked_blocks() == []
