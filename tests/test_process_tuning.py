"""The process's malloc: chosen before start (OMLX_ALLOCATOR, preloaded by omlx.blas's re-exec),
reported from the symbol the process actually calls, trimmed and measured through that allocator,
and glibc's malloc kept (and said) where the library is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omlx import blas, process_tuning
from omlx.process_tuning import ALLOCATOR_ENV, AUTO_ALLOCATOR, allocator_to_preload, find_allocator_library

REPO = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")

# Started the way `omlx serve` starts: the re-exec first, then MLX; reports what runs.
CHILD = (
    "import json, sys\n"
    "from omlx.blas import ensure_optimized_blas\n"
    "ensure_optimized_blas(sys.orig_argv[1:])\n"
    "import mlx.core as mx\n"
    "from omlx import allocator_caches\n"
    "from omlx.process_tuning import allocator_info\n"
    "print(json.dumps({'allocator': allocator_info(), 'stats': allocator_caches.allocator_stats()}))\n"
)


def _child(**env_overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", ALLOCATOR_ENV, blas.REEXEC_MARKER_ENV, blas.NO_REEXEC_ENV)}
    env.update(env_overrides)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["log"] = done.stderr
    return out


def test_glibc_and_unknown_names_preload_nothing(monkeypatch):
    monkeypatch.setattr(process_tuning.sys, "platform", "linux")
    monkeypatch.setenv(ALLOCATOR_ENV, "glibc")
    assert allocator_to_preload() == (None, f"{ALLOCATOR_ENV}=glibc")
    monkeypatch.setenv(ALLOCATOR_ENV, "hoard")
    path, why = allocator_to_preload()
    assert path is None and "not one of auto, glibc" in why


def test_a_missing_library_falls_back_to_glibc_and_names_the_package(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(process_tuning.sys, "platform", "linux")
    monkeypatch.setattr(process_tuning, "LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    path, why = allocator_to_preload()
    assert path is None
    assert process_tuning.ALLOCATORS[AUTO_ALLOCATOR].debian_package in why
    with caplog.at_level("WARNING", logger="omlx.process_tuning"):
        assert process_tuning.start_preloads() == []
    assert "glibc's malloc runs" in caplog.text


def test_a_library_path_or_a_name_is_found(monkeypatch, tmp_path):
    monkeypatch.setattr(process_tuning.sys, "platform", "linux")
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    monkeypatch.setattr(process_tuning, "LIBRARY_DIRS", (str(tmp_path),))
    assert find_allocator_library("tcmalloc") == str(fake)
    monkeypatch.setenv(ALLOCATOR_ENV, "tcmalloc")
    assert allocator_to_preload()[0] == str(fake)
    monkeypatch.setenv(ALLOCATOR_ENV, str(fake))
    assert allocator_to_preload()[0] == str(fake)
    monkeypatch.setenv(ALLOCATOR_ENV, str(tmp_path / "missing.so"))
    path, why = allocator_to_preload()
    assert path is None and "does not exist" in why


def test_allocator_names_come_from_the_library_file():
    assert process_tuning.allocator_name("/lib/x86_64-linux-gnu/libc.so.6") == "glibc"
    assert process_tuning.allocator_name("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2") == "jemalloc"
    assert process_tuning.allocator_name("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10") == "tcmalloc"
    assert process_tuning.allocator_name("/opt/libhoard.so") == "libhoard.so"


@linux_only
def test_this_test_process_runs_glibc_malloc():
    # pytest is not started through the re-exec: what serves malloc is glibc's own.
    assert process_tuning.malloc_library() is not None
    info = process_tuning.allocator_info()
    assert info["name"] == "glibc"


@linux_only
def test_a_started_process_runs_the_auto_allocator_where_installed():
    out = _child()
    info, stats = out["allocator"], out["stats"]
    assert stats["allocator"]["name"] == info["name"]
    if find_allocator_library(AUTO_ALLOCATOR) is None:  # a machine without it keeps glibc, and says why
        assert info["name"] == "glibc" and "not installed" in info["reason"], info
        assert "not installed" in out["log"]
        return
    assert info["name"] == AUTO_ALLOCATOR and "reason" not in info, info
    assert os.path.samefile(info["library"], find_allocator_library(AUTO_ALLOCATOR))
    heap = stats["malloc"]  # the allocator's own figures, not glibc's idle arenas
    assert heap["in_use_bytes"] > 1 << 20 and heap["arena_bytes"] >= heap["in_use_bytes"], heap


@linux_only
def test_glibc_requested_keeps_todays_malloc():
    out = _child(**{ALLOCATOR_ENV: "glibc"})
    assert out["allocator"]["name"] == "glibc"
    assert out["allocator"]["reason"] == f"{ALLOCATOR_ENV}=glibc"
    assert set(out["stats"]["malloc"]) >= {"arena_bytes", "in_use_bytes", "free_bytes", "mmapped_bytes"}


@linux_only
@pytest.mark.skipif(find_allocator_library("jemalloc") is None or find_allocator_library(AUTO_ALLOCATOR) is None,
                    reason="needs two allocators installed")
def test_an_allocator_the_user_preloaded_stays():
    jemalloc = find_allocator_library("jemalloc")
    out = _child(LD_PRELOAD=jemalloc)
    assert out["allocator"]["name"] == "jemalloc", out["allocator"]
    assert out["allocator"]["reason"] == "jemalloc was preloaded by the user"
    assert out["stats"]["malloc"]["in_use_bytes"] > 1 << 20  # jemalloc's own counters


@linux_only
def test_a_missing_library_path_starts_on_glibc():
    out = _child(**{ALLOCATOR_ENV: "/nonexistent/libmalloc.so"})
    assert out["allocator"]["name"] == "glibc"
    assert "does not exist" in out["allocator"]["reason"]
    assert "does not exist" in out["log"]


# Under the allocator a started server runs: freed memory goes back through its own purge.
_RELEASE = """
import ctypes, json, sys
from omlx.blas import ensure_optimized_blas
ensure_optimized_blas(sys.orig_argv[1:])
from omlx import allocator_caches
libc = ctypes.CDLL(None)
if allocator_caches.allocator_stats()["allocator"]["name"] == "glibc":
    libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD: 1 MiB chunks from the arena, not mmap (freed at once)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
chunks = [libc.malloc(1 << 20) for _ in range(256)]
for c in chunks:
    ctypes.memset(c, 1, 1 << 20)
for c in chunks[::2]:  # half of it freed, between live chunks
    libc.free(c)
released = allocator_caches.trim_heap()
print(json.dumps({"released": released, "name": allocator_caches.allocator_stats()["allocator"]["name"]}))
"""


@linux_only
def test_trim_gives_freed_memory_back_under_the_allocator_that_runs():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV, blas.REEXEC_MARKER_ENV)}
    done = subprocess.run([sys.executable, "-c", _RELEASE], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["name"] == (AUTO_ALLOCATOR if find_allocator_library(AUTO_ALLOCATOR) else "glibc")
    assert out["released"] >= 100 << 20, out  # of the 128 MiB freed


@linux_only
def test_a_started_server_says_which_allocator_runs(tmp_path):
    from omlx_process import omlx_server

    (tmp_path / "models").mkdir()
    expected = AUTO_ALLOCATOR if find_allocator_library(AUTO_ALLOCATOR) else "glibc"
    with omlx_server(tmp_path / "models", tmp_path) as server:
        health = server.health()
        log = server.log_path.read_text(errors="replace")
    allocator = health["process"]["allocator_caches"]["allocator"]
    assert allocator["name"] == expected, allocator
    assert health["compute"]["process_tuning"]["allocator"] == allocator
    # The policy the kernels' libgomp read (PASSIVE where a kernel module loaded), as /health says.
    assert f"allocator: {expected}" in log
    assert f"OpenMP wait policy: {health['compute']['process_tuning']['omp_wait_policy']}" in log
    if expected != "glibc":
        assert os.path.samefile(allocator["library"], find_allocator_library(AUTO_ALLOCATOR))
        assert health["process"]["allocator_caches"]["malloc"]["in_use_bytes"] > 1 << 20


@linux_only
def test_a_started_server_keeps_glibc_when_asked(tmp_path):
    from omlx_process import omlx_server

    (tmp_path / "models").mkdir()
    with omlx_server(tmp_path / "models", tmp_path, env={ALLOCATOR_ENV: "glibc"}) as server:
        health = server.health()
    allocator = health["process"]["allocator_caches"]["allocator"]
    assert allocator["name"] == "glibc" and allocator["reason"] == f"{ALLOCATOR_ENV}=glibc"
    assert health["compute"]["process_tuning"]["allocator"] == allocator
