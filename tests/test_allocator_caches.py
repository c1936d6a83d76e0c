"""Freed memory the allocators keep: MLX's buffer cache capped by the budget, malloc's free
pages given back (after big frees, under growth, when quiet), and both reported in /health."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import mlx.core as mx
import pytest
import pytest_asyncio

from omlx import allocator_caches
from omlx.allocator_caches import HeapTrimmer, allocator_stats, configure_mlx_cache
from omlx.models.pool import ModelPool
from omlx.models.residency import Residence
from omlx.scheduler import EngineConfig
from omlx.scheduler.kv_cache import KVLayout, PagedKVStorage
from omlx.server import ServerConfig, quiet_since
from omlx.settings import SettingsStore
from omlx.testing.tiny_models import TinyModelSpec, build_model
from in_process_server import running_app

GLIBC = allocator_caches._LIBC is not None
REPO = Path(__file__).resolve().parent.parent
MLX_DEFAULT_CACHE_LIMIT = mx.set_cache_limit(0)
mx.set_cache_limit(MLX_DEFAULT_CACHE_LIMIT)


@pytest.fixture
def restore_cache_limit():
    before = mx.set_cache_limit(0)
    mx.set_cache_limit(before)
    yield
    mx.set_cache_limit(before)
    allocator_caches._mlx_cache_limit = None


def test_mlx_cache_limit_follows_the_budget_below_mlx_default(restore_cache_limit):
    default = MLX_DEFAULT_CACHE_LIMIT
    small_budget = 8 * allocator_caches.MLX_CACHE_FLOOR_BYTES  # 1/64 of it is under the floor
    assert configure_mlx_cache(small_budget) == min(default, allocator_caches.MLX_CACHE_FLOOR_BYTES)
    big_budget = 1 << 50  # 1/64 of it is far above MLX's own default: the default stays
    assert configure_mlx_cache(big_budget) == default
    assert mx.set_cache_limit(default) == default  # what configure set is what MLX holds


def test_mlx_cache_stays_under_its_limit_after_churn(restore_cache_limit):
    limit = configure_mlx_cache(8 * allocator_caches.MLX_CACHE_FLOOR_BYTES)
    for n in range(1, 40):  # freed buffers of many sizes, 1-39 MiB each: far more than the limit
        a = mx.ones((n << 18,), mx.float32)
        mx.eval(a)
        del a
    assert 0 < mx.get_cache_memory() <= limit
    assert allocator_stats()["mlx"]["cache_limit_bytes"] == limit


# A subprocess, so the heap it fragments is its own: 128 MiB freed between live chunks, where
# malloc cannot give it back by shrinking the heap.
_FRAGMENT = textwrap.dedent("""
    import ctypes, json, sys
    sys.path.insert(0, {repo!r})
    from omlx import allocator_caches
    from omlx.memory_watch import resident_bytes
    libc = allocator_caches._LIBC
    assert libc.mallopt(-3, 8 << 20) == 1  # M_MMAP_THRESHOLD: 4 MiB chunks from the arena, not mmap
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(4 << 20) for _ in range(64)]
    for c in chunks:
        ctypes.memset(c, 1, 4 << 20)
    for c in chunks[::2]:  # every other one: live chunks between keep them from coalescing
        libc.free(c)
    before = resident_bytes()
    released = allocator_caches.{call}()
    stats = allocator_caches.allocator_stats()["malloc"]
    print(json.dumps({{"before": before, "after": resident_bytes(), "released": released, "stats": stats}}))
""")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
@pytest.mark.parametrize("call", ["release_freed", "trim_heap"])
def test_freed_arena_memory_goes_back_to_the_system(call):
    run = subprocess.run([sys.executable, "-c", _FRAGMENT.format(repo=str(REPO), call=call)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["released"] >= 120 << 20, out
    assert out["before"] - out["after"] >= 120 << 20, out
    assert out["stats"]["trims"] == 1 and out["stats"]["trimmed_bytes"] == out["released"]
    assert out["stats"]["free_bytes"] >= 120 << 20  # still free chunks to malloc, no longer resident


class _Process:
    """A fake RSS that trims take down to `floor`."""

    def __init__(self, rss: int):
        self.rss, self.floor, self.trims = rss, rss, 0

    def trim(self) -> int:
        self.trims += 1
        released, self.rss = self.rss - self.floor, self.floor
        return released


def test_trimmer_trims_after_growth_not_before():
    p = _Process(500 << 20)
    trimmer = HeapTrimmer(step_bytes=64 << 20, rss=lambda: p.rss, trim=p.trim)
    assert trimmer.check() == 0 and trimmer.mark == 500 << 20
    p.rss += 63 << 20
    assert trimmer.check() == 0 and p.trims == 0
    p.rss += 2 << 20
    assert trimmer.check() == 65 << 20 and p.trims == 1
    assert trimmer.mark == 500 << 20
    # Growth that a trim cannot take back (a KV pool grew) moves the mark: no trim per check.
    p.floor = p.rss = 800 << 20
    assert trimmer.check() == 0 and p.trims == 2 and trimmer.mark == 800 << 20
    assert trimmer.check() == 0 and p.trims == 2


def test_trimmer_trims_once_per_quiet_spell():
    p, now = _Process(500 << 20), [100.0]
    quiet = [None]
    trimmer = HeapTrimmer(lambda: quiet[0], quiet_s=4.0, clock=lambda: now[0], rss=lambda: p.rss, trim=p.trim)
    trimmer.check()
    p.rss += 30 << 20  # under the growth step: only quiet trims it
    assert trimmer.check() == 0  # busy
    quiet[0] = now[0]
    now[0] += 3.0
    assert trimmer.check() == 0 and p.trims == 0  # not quiet long enough
    now[0] += 1.0
    assert trimmer.check() == 30 << 20 and p.trims == 1
    now[0] += 10.0
    assert trimmer.check() == 0 and p.trims == 1  # the same spell: once
    quiet[0] = None  # a request
    p.rss += 10 << 20
    trimmer.check()
    quiet[0] = now[0]
    now[0] += 5.0
    assert trimmer.check() == 10 << 20 and p.trims == 2


def test_kv_pool_resize_gives_the_old_arrays_back(monkeypatch):
    released = []
    monkeypatch.setattr("omlx.scheduler.kv_cache.release_freed", lambda: released.append(1) or 0)
    storage = PagedKVStorage(KVLayout(num_layers=2, num_kv_heads=2, key_dim=16, value_dim=16, dtype=mx.float32),
                             num_blocks=4, block_size=16)
    storage.grow(8)
    storage.shrink(4)
    assert len(released) == 2


@pytest_asyncio.fixture(loop_scope="function")
async def app_server(tmp_path, restore_cache_limit):
    config = ServerConfig(model_dirs=[tmp_path / "models"], engine=EngineConfig(), settings_home=tmp_path / "home",
                          packaged_models=False, memory_budget=1 << 30)
    (tmp_path / "models").mkdir()
    async with running_app(config) as server:
        yield server


async def test_health_reports_each_allocator_cache_with_its_bound(app_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(app_server.make_url("/health")) as response:
            assert response.status == 200
            body = await response.json()
    caches = body["process"]["allocator_caches"]
    mlx = caches["mlx"]
    # The 1 GiB budget's 1/64 is 16 MiB, under the floor: the floor (or MLX's default, if less).
    assert mlx["cache_limit_bytes"] == min(allocator_caches.MLX_CACHE_FLOOR_BYTES, MLX_DEFAULT_CACHE_LIMIT)
    assert 0 <= mlx["cache_bytes"] <= mlx["cache_limit_bytes"]
    assert mlx["active_bytes"] >= 0 and mlx["peak_bytes"] >= 0
    if GLIBC:
        malloc = caches["malloc"]
        assert set(malloc) == {"arena_bytes", "in_use_bytes", "free_bytes", "mmapped_bytes", "trims", "trimmed_bytes",
                               "trim_seconds"}
        assert malloc["arena_bytes"] >= malloc["in_use_bytes"] > 0
        assert malloc["trims"] >= 0 and malloc["trimmed_bytes"] >= 0 and malloc["trim_seconds"] >= 0


class _Pool:
    def __init__(self, residences: dict):
        self.residences = residences

    @property
    def loaded(self) -> dict:
        return dict.fromkeys(self.residences)

    def resident(self, model_id: str):
        return self.residences.get(model_id)


def test_the_server_is_quiet_when_no_request_holds_a_model():
    assert quiet_since(_Pool({})) == 0.0  # nothing loaded: quiet since ever
    a, b = Residence(model=None, last_used=10.0), Residence(model=None, last_used=12.5)
    pool = _Pool({"a": a, "b": b})
    assert quiet_since(pool) == 12.5  # the latest end of a request
    a.leases = 1
    assert quiet_since(pool) is None  # a request running on any model


async def test_a_model_load_and_unload_each_give_freed_memory_back(tmp_path, monkeypatch):
    build_model(tmp_path / "models" / "tiny", TinyModelSpec())
    calls = []
    monkeypatch.setattr("omlx.models.pool.release_freed", lambda: calls.append("load") or 0)
    monkeypatch.setattr("omlx.models.residency.release_freed", lambda: calls.append("unload") or 0)
    (tmp_path / "home").mkdir()
    pool = ModelPool([tmp_path / "models"], EngineConfig(block_size=16, num_blocks=32), memory_budget=1 << 30,
                     settings=SettingsStore(tmp_path / "home"))
    try:
        async with pool.lease("tiny"):
            assert calls == ["load"]
        assert await pool.unload("tiny") is True
        assert calls == ["load", "unload"]
    finally:
        await pool.close()
