"""The BLAS re-exec has to be checked in a fresh process: LD_PRELOAD only acts at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omlx import blas

# The child passes its own command line back so that the re-exec reruns this same code;
# sys.argv alone would lose the "-c" program text.
CHILD_CODE = (
    "import json, sys\n"
    "from omlx.blas import ensure_optimized_blas, blas_info\n"
    "ensure_optimized_blas(sys.orig_argv[1:])\n"
    "import mlx.core\n"
    "print(json.dumps(blas_info()))\n"
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="LD_PRELOAD re-exec is Linux-only")


def _child_blas_info(**env_overrides: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("LD_PRELOAD", blas.REEXEC_MARKER_ENV, blas.NO_REEXEC_ENV)}
    env.update(env_overrides)
    completed = subprocess.run([sys.executable, "-c", CHILD_CODE], env=env,
                               capture_output=True, text=True, timeout=60, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@linux_only
@pytest.mark.skipif(blas.find_optimized_blas() is None, reason="no OpenBLAS installed")
def test_reexec_preloads_openblas() -> None:
    info = _child_blas_info()
    assert info["blas"] == "openblas"
    assert info["preloaded"] is True
    assert info["backend"] == "cpu"
    assert os.path.samefile(info["blas_library"], blas.find_optimized_blas())


@linux_only
def test_opt_out_keeps_reference_blas() -> None:
    info = _child_blas_info(**{blas.NO_REEXEC_ENV: "1"})
    assert info["preloaded"] is False
    assert info["blas"] == "reference"


@linux_only
def test_marker_prevents_reexec_loop() -> None:
    info = _child_blas_info(**{blas.REEXEC_MARKER_ENV: "1"})
    assert info["preloaded"] is False


def test_env_override_wins(tmp_path, monkeypatch) -> None:
    library = tmp_path / "libcustomblas.so"
    library.write_bytes(b"")
    monkeypatch.setenv(blas.BLAS_LIBRARY_ENV, str(library))
    assert blas.find_optimized_blas() == str(library)


def test_env_override_ignored_when_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(blas.BLAS_LIBRARY_ENV, str(tmp_path / "missing.so"))
    expected = next((c for c in blas.OPENBLAS_CANDIDATES if os.path.isfile(c)), None)
    assert blas.find_optimized_blas() == expected


def test_no_candidate_warns_and_returns(monkeypatch, caplog) -> None:
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas, "OPENBLAS_CANDIDATES", [])
    for name in (blas.BLAS_LIBRARY_ENV, blas.NO_REEXEC_ENV, blas.REEXEC_MARKER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMLX_ALLOCATOR", "glibc")  # nothing else to preload either (see test_process_tuning)
    exec_calls: list[tuple] = []
    # Recorded rather than raised: ensure_optimized_blas swallows every exception.
    monkeypatch.setattr(blas.os, "execv", lambda *args: exec_calls.append(args))
    with caplog.at_level("WARNING", logger="omlx.blas"):
        blas.ensure_optimized_blas(["-c", "pass"])
    assert "libopenblas0-pthread" in caplog.text
    assert exec_calls == []


def test_never_raises_when_exec_fails(tmp_path, monkeypatch) -> None:
    library = tmp_path / "libfakeblas.so"
    library.write_bytes(b"")
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setenv(blas.BLAS_LIBRARY_ENV, str(library))
    monkeypatch.delenv(blas.NO_REEXEC_ENV, raising=False)
    monkeypatch.delenv(blas.REEXEC_MARKER_ENV, raising=False)
    # Registered so monkeypatch restores it afterwards; the code under test overwrites it.
    monkeypatch.setenv("LD_PRELOAD", "")

    def failing_execv(*_args: object) -> None:
        raise OSError("exec refused")

    monkeypatch.setattr(blas.os, "execv", failing_execv)
    blas.ensure_optimized_blas(["-c", "pass"])  # must not raise
    assert blas.REEXEC_MARKER_ENV not in os.environ
    assert os.environ["LD_PRELOAD"] == ""


def test_blas_info_shape() -> None:
    info = blas.blas_info()
    assert set(info) == {"backend", "blas", "blas_library", "preloaded"}
    assert info["backend"] in {"cpu", "metal", "cuda", "gpu", "unknown"}
    assert info["blas"] in {"openblas", "reference", "accelerate"}


def test_measure_matmul_gflops_is_positive() -> None:
    assert blas.measure_matmul_gflops(n=64) > 0
