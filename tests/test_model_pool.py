"""The model pool in-process: memory budget, LRU eviction of idle models, leases, TTL,
pinning, and that unloading really stops the engine and frees its memory.  Real tiny models
through the real loading path (mlx_lm.load)."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from pathlib import Path

import mlx.core as mx
import pytest

from omlx.models.pool import (
    InsufficientMemory,
    ModelBusy,
    ModelNotFound,
    ModelPool,
    ModelUnavailable,
    estimate_kv_bytes,
)
from omlx.scheduler import EngineConfig
from omlx.settings import SettingsStore
from omlx.testing.tiny_models import TinyModelSpec, build_model

NAMES = ("a", "b", "c")
ENGINE = EngineConfig(block_size=16, num_blocks=32, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool-models")
    for seed, name in enumerate(NAMES):
        build_model(root / name, TinyModelSpec(seed=seed))
    return root


def estimate(model_dir: Path, name: str = "a") -> int:
    """What the pool reserves before loading one of these models."""
    config = json.loads((model_dir / name / "config.json").read_text())
    size = (model_dir / name / "model.safetensors").stat().st_size
    return size + estimate_kv_bytes(config, ENGINE)


def make_pool(model_dir: Path, tmp_path: Path, models_fitting: float, settings: dict | None = None, **kw) -> ModelPool:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    if settings is not None:
        (home / "model_settings.json").write_text(json.dumps(settings))
    budget = int(estimate(model_dir) * models_fitting)
    return ModelPool([model_dir], ENGINE, memory_budget=budget, settings=SettingsStore(home), **kw)


async def use(pool: ModelPool, name: str) -> None:
    """One short generation through a lease, as a request would do it."""
    async with pool.lease(name) as model:
        assert model.model_id == name


@pytest.mark.slow
async def test_lru_idle_model_is_evicted_when_the_next_one_does_not_fit(model_dir, tmp_path):
    pool = make_pool(model_dir, tmp_path, models_fitting=2.5)
    try:
        await use(pool, "a")
        await use(pool, "b")
        await use(pool, "a")  # now b is the least recently used
        engine_b = pool.loaded["b"].engine
        await use(pool, "c")

        assert set(pool.loaded) == {"a", "c"}
        assert pool.evictions == 1
        assert not engine_b._thread.is_alive()
        assert pool.used_bytes <= pool.memory_budget
        # The measured footprint replaced the estimate: weights + the KV pool.
        resident = pool.resident("a")
        assert resident.memory_bytes == resident.model.weights_bytes + resident.model.engine.engine.storage.nbytes
        assert 0 < resident.memory_bytes <= estimate(model_dir)
    finally:
        await pool.close()


@pytest.mark.slow
async def test_leased_model_is_never_evicted_and_the_newcomer_gets_a_clear_error(model_dir, tmp_path):
    pool = make_pool(model_dir, tmp_path, models_fitting=1.5)
    try:
        async with pool.lease("a") as a:
            with pytest.raises(InsufficientMemory, match="in use or pinned: a \\(1 request"):
                await use(pool, "b")
            assert pool.loaded == {"a": a}
            # Generation on the leased model still works after the refused load.
            assert a.engine._thread.is_alive()
        await use(pool, "b")  # once a is idle it can make way
        assert set(pool.loaded) == {"b"}
    finally:
        await pool.close()


async def test_concurrent_leases_share_one_load_and_count(model_dir, tmp_path, monkeypatch):
    pool = make_pool(model_dir, tmp_path, models_fitting=3.5)
    loads = []
    original = pool._load_sync
    monkeypatch.setattr(pool, "_load_sync", lambda info: loads.append(info.model_id) or original(info))
    try:
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold():
            async with pool.lease("a"):
                if pool.resident("a").leases == 5:
                    entered.set()
                await release.wait()

        tasks = [asyncio.ensure_future(hold()) for _ in range(5)]
        await asyncio.wait_for(entered.wait(), 30)
        assert loads == ["a"]
        assert pool.resident("a").leases == 5
        with pytest.raises(ModelBusy):
            await pool.unload("a")
        release.set()
        await asyncio.gather(*tasks)
        assert pool.resident("a").leases == 0
        assert await pool.unload("a") is True
        assert await pool.unload("a") is False
    finally:
        await pool.close()


async def test_a_model_larger_than_the_whole_budget_is_refused(model_dir, tmp_path):
    pool = make_pool(model_dir, tmp_path, models_fitting=0.5)
    try:
        with pytest.raises(InsufficientMemory, match="more than the whole model memory budget"):
            await use(pool, "a")
        assert pool.loaded == {}
        assert pool.used_bytes == 0  # the failed reservation was given back
    finally:
        await pool.close()


class FakeClock:
    """The pool's idle clock (omlx.models.residency.idle_clock), moved by hand: a TTL test
    then says exactly how long a model was idle, however slow the machine is."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def idle_clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr("omlx.models.residency.idle_clock", clock)
    return clock


@pytest.mark.slow
async def test_idle_model_past_its_ttl_is_unloaded(model_dir, tmp_path, idle_clock):
    pool = make_pool(model_dir, tmp_path, models_fitting=3.5, settings={"a": {"ttl": 0.2}})
    try:
        await use(pool, "a")
        await use(pool, "b")  # no TTL: stays
        async with pool.lease("a"):
            idle_clock.advance(0.3)
            assert await pool.expire_idle() == []  # leased: the clock only starts when idle
        assert await pool.expire_idle() == []  # just released
        idle_clock.advance(0.3)
        assert await pool.expire_idle() == ["a"]
        assert set(pool.loaded) == {"b"}
    finally:
        await pool.close()


async def test_ttl_watch_runs_in_the_background(model_dir, tmp_path, monkeypatch, idle_clock):
    monkeypatch.setattr("omlx.models.pool.TTL_CHECK_INTERVAL_S", 0.05)
    pool = make_pool(model_dir, tmp_path, models_fitting=3.5, settings={"a": {"ttl": 0.1}})
    try:
        await pool.start()
        await use(pool, "a")
        idle_clock.advance(0.2)
        # The watch's own timer, not the TTL, is what this waits on: a generous deadline.
        deadline = asyncio.get_running_loop().time() + 30
        while "a" in pool.loaded and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert "a" not in pool.loaded
    finally:
        await pool.close()


@pytest.mark.slow
async def test_pinned_models_load_at_start_and_are_never_evicted(model_dir, tmp_path, idle_clock):
    pool = make_pool(model_dir, tmp_path, models_fitting=2.5,
                     settings={"a": {"pinned": True, "ttl": 0.01}}, pinned=["b"])
    try:
        await pool.start()
        assert set(pool.loaded) == {"a", "b"}
        idle_clock.advance(1.0)  # far past a's TTL
        assert await pool.expire_idle() == []  # pinned beats TTL
        with pytest.raises(InsufficientMemory, match="a \\(pinned\\), b \\(pinned\\)"):
            await use(pool, "c")
        assert set(pool.loaded) == {"a", "b"}
    finally:
        await pool.close()


@pytest.mark.slow
async def test_unload_stops_the_engine_thread_and_frees_the_memory(model_dir, tmp_path):
    pool = make_pool(model_dir, tmp_path, models_fitting=3.5)
    try:
        gc.collect()
        mx.clear_cache()
        baseline = mx.get_active_memory()
        await use(pool, "a")
        loaded = pool.loaded["a"]
        footprint = loaded.memory_bytes
        thread = loaded.engine._thread
        model_ref = weakref.ref(loaded.engine.engine.model)
        del loaded
        assert mx.get_active_memory() - baseline >= footprint * 0.9

        assert await pool.unload("a") is True
        gc.collect()
        assert not thread.is_alive()
        assert model_ref() is None
        assert mx.get_active_memory() - baseline < footprint * 0.1
        assert not any(t.name == "omlx-engine" and t is thread for t in threading.enumerate())
        assert pool.used_bytes == 0
    finally:
        await pool.close()


async def test_unknown_and_unservable_models(model_dir, tmp_path):
    vlm = tmp_path / "models" / "vision"
    build_model(vlm, TinyModelSpec())
    config = json.loads((vlm / "config.json").read_text())
    (vlm / "config.json").write_text(json.dumps({**config, "vision_config": {"depth": 1}}))
    pool = ModelPool([model_dir, tmp_path / "models"], ENGINE, memory_budget=1 << 30,
                     settings=SettingsStore(tmp_path / "home"))
    try:
        with pytest.raises(ModelNotFound):
            await use(pool, "nope")
        with pytest.raises(ModelUnavailable, match="'vision' is a vlm model"):
            await use(pool, "vision")
        with pytest.raises(ModelUnavailable, match="llm model and cannot serve this embedding"):
            async with pool.lease("a", "embedding"):
                pass
        assert pool.loaded == {}
    finally:
        await pool.close()


async def test_aliases_type_overrides_and_bare_folder_names_resolve(model_dir, tmp_path):
    org = tmp_path / "models" / "org" / "deep-model"
    build_model(org, TinyModelSpec())
    pool = ModelPool([model_dir, tmp_path / "models"], ENGINE, memory_budget=1 << 30,
                     settings=SettingsStore(tmp_path / "home"))
    try:
        assert pool.resolve("deep-model").model_id == "org/deep-model"
        pool.settings.update_model("a", {"alias": "my-chat"})
        pool.settings.update_model("b", {"model_type": "embedding"})
        assert pool.resolve("my-chat").model_id == "a"
        pool.rescan()
        assert pool.resolve("b").model_type == "embedding"
        async with pool.lease("my-chat") as model:
            assert model.model_id == "a"
    finally:
        await pool.close()


async def test_kv_pools_grow_inside_the_shared_budget(model_dir, tmp_path):
    """Without a KV size, a model's pool starts small and grows into what the budget leaves
    after the weights; growth is counted in the budget, and another model still loads within it."""
    from omlx.scheduler import GenerationRequest, default_kv_cache_bytes

    engine_config = EngineConfig(block_size=16, initial_kv_bytes=1, max_num_batched_tokens=64)
    home = tmp_path / "home"
    home.mkdir()
    size = (model_dir / "a" / "model.safetensors").stat().st_size
    budget = 8 * size
    pool = ModelPool([model_dir], engine_config, memory_budget=budget, settings=SettingsStore(home))
    try:
        async with pool.lease("a") as a:
            engine = a.engine.engine
            assert engine.storage.num_blocks == 2
            assert engine.max_kv_bytes <= default_kv_cache_bytes(a.weights_bytes, budget)
            before = pool.used_bytes
            streams = [a.engine.generate(GenerationRequest(f"r{i}", list(range(10 + i, 90 + i)), 8))
                       for i in range(4)]

            async def drain(stream):
                return [event async for event in stream]

            results = await asyncio.gather(*(drain(s) for s in streams))
            assert all(r[-1].error is None and r[-1].finish_reason is not None for r in results)
            assert engine.pool_growths > 0 and engine.storage.num_blocks > 2
            grown = engine.storage.nbytes - 2 * engine.storage.bytes_per_block
            assert pool.used_bytes == before + grown
            assert pool.used_bytes == pool.resident("a").memory_bytes
            assert pool.used_bytes <= budget
        await use(pool, "b")
        assert "b" in pool.loaded and pool.used_bytes <= budget
        assert pool.used_bytes == sum(pool.resident(m).memory_bytes for m in pool.loaded)
    finally:
        await pool.close()
    assert pool.used_bytes == 0


async def test_an_idle_models_grown_kv_pool_shrinks_before_any_model_is_evicted(model_dir, tmp_path):
    from omlx.scheduler import GenerationRequest

    engine_config = EngineConfig(block_size=16, initial_kv_bytes=1, max_num_batched_tokens=64)
    home = tmp_path / "home"
    home.mkdir()
    size = (model_dir / "a" / "model.safetensors").stat().st_size
    pool = ModelPool([model_dir], engine_config, memory_budget=int(2.3 * size), settings=SettingsStore(home))
    try:
        async with pool.lease("a") as a:
            engine = a.engine.engine
            for i in range(3):  # distinct prompts: the pool grows to keep their prefixes cached
                async for _ in a.engine.generate(GenerationRequest(f"r{i}", list(range(10 + 97 * i, 200 + 97 * i)), 4)):
                    pass
            grown = engine.storage.nbytes
            assert engine.pool_growths > 0
        assert pool.used_bytes + size > pool.memory_budget  # b does not fit beside a's grown pool
        await use(pool, "b")
        assert set(pool.loaded) == {"a", "b"} and pool.evictions == 0  # a shrank instead
        assert engine.storage.num_blocks == engine.main_pool.initial_blocks and engine.storage.nbytes < grown
        assert pool.used_bytes == pool.resident("a").memory_bytes + pool.resident("b").memory_bytes
        assert pool.used_bytes <= pool.memory_budget
    finally:
        await pool.close()
