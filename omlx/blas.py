"""Make MLX's CPU matmul use an optimized BLAS on Linux.

The Linux CPU wheel of MLX links a bundled reference BLAS that runs float32 matmul at a few
GFLOP/s.  Its `cblas_sgemm` is resolved through the dynamic linker, so a faster library
loaded with LD_PRELOAD takes its place (OpenBLAS is ~30x faster).  LD_PRELOAD only takes
effect when a process starts, so `omlx serve` re-executes itself once with it set.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from omlx.process_tuning import start_preloads

logger = logging.getLogger("omlx.blas")

# Debian's pthread OpenBLAS first: its libblas.so.3 is a drop-in for the reference library.
OPENBLAS_CANDIDATES: list[str] = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
]

BLAS_LIBRARY_ENV = "OMLX_BLAS_LIBRARY"
NO_REEXEC_ENV = "OMLX_NO_BLAS_REEXEC"
REEXEC_MARKER_ENV = "OMLX_BLAS_REEXEC"

# numpy and scipy wheels bundle an OpenBLAS whose symbols carry a suffix; it never serves
# MLX, so its presence in the address space must not be mistaken for an optimized BLAS.
_NON_INTERPOSING_OPENBLAS = ("scipy_openblas", "numpy.libs", "scipy.libs")


def find_optimized_blas() -> str | None:
    """Path of the optimized BLAS to preload, or None if none is installed."""
    override = os.environ.get(BLAS_LIBRARY_ENV)
    if override and os.path.isfile(override):
        return override
    for candidate in OPENBLAS_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    return None


def _preload_entries() -> list[str]:
    # ld.so accepts both spaces and colons as separators in LD_PRELOAD.
    raw = os.environ.get("LD_PRELOAD", "")
    return [entry for entry in raw.replace(":", " ").split() if entry]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _is_preloaded(library: str) -> bool:
    return any(_same_file(entry, library) for entry in _preload_entries())


def ensure_optimized_blas(argv: list[str]) -> None:
    """Re-exec the interpreter with an optimized BLAS preloaded, if that would help.

    Call before anything imports mlx.  `argv` is what follows the interpreter on the new
    command line (normally `sys.argv`).  Returns normally when no re-exec is needed or
    possible; never raises, since a slow server beats one that does not start.
    """
    try:
        _reexec_with_blas(argv)
    except Exception:  # noqa: BLE001 - startup must go on whatever happens here
        logger.warning("could not arrange an optimized BLAS; continuing", exc_info=True)


def _reexec_with_blas(argv: list[str]) -> None:
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get(NO_REEXEC_ENV):
        return
    # The marker stops a loop if the preload silently failed to take effect.
    if os.environ.get(REEXEC_MARKER_ENV) == "1":
        return
    library = find_optimized_blas()
    if library is None:
        logger.warning(
            "no optimized BLAS found; CPU matmul will be slow (MLX's bundled reference "
            "BLAS). Fix: apt-get install libopenblas0-pthread, or set %s to an "
            "OpenBLAS library path.",
            BLAS_LIBRARY_ENV,
        )
    # The same start-up also swaps in a faster malloc where one is installed (process_tuning).
    missing = [lib for lib in ([library] if library else []) + start_preloads() if not _is_preloaded(lib)]
    if not missing:
        return

    previous_preload = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = " ".join([*missing, *_preload_entries()])
    os.environ[REEXEC_MARKER_ENV] = "1"
    logger.info("re-executing with LD_PRELOAD=%s (faster matmul and malloc)", " ".join(missing))
    # Buffered output would be lost when the process image is replaced.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *argv])
    except OSError:
        # Undo, so that processes this one starts do not inherit a half-applied setup.
        os.environ.pop(REEXEC_MARKER_ENV, None)
        if previous_preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = previous_preload
        raise


def _mapped_files() -> list[str]:
    """Files mapped into this process, in first-mapped order (Linux only)."""
    seen: dict[str, None] = {}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    seen.setdefault(fields[5].strip(), None)
    except OSError:
        return []
    return list(seen)


def _mapped_openblas() -> list[str]:
    return [
        path
        for path in _mapped_files()
        if "openblas" in path.lower()
        and not any(marker in path for marker in _NON_INTERPOSING_OPENBLAS)
    ]


def _backend() -> str:
    try:
        import mlx.core as mx

        device_type = str(mx.default_device().type)
        if "gpu" not in device_type:
            return "cpu"
        if getattr(getattr(mx, "cuda", None), "is_available", lambda: False)():
            return "cuda"
        if getattr(getattr(mx, "metal", None), "is_available", lambda: False)():
            return "metal"
        return "gpu"
    except Exception:  # noqa: BLE001 - a health report must not fail on a probe
        return "unknown"


def blas_info() -> dict:
    """What compute backend and BLAS this process actually uses, for /health."""
    info: dict = {"backend": _backend(), "blas": "reference", "blas_library": None,
                  "preloaded": False}
    if sys.platform == "darwin":
        info["blas"] = "accelerate"
        return info
    mapped = _mapped_openblas()
    if not mapped:
        return info
    info["blas"] = "openblas"
    preloaded = [entry for entry in _preload_entries()
                 if any(_same_file(entry, path) for path in mapped)]
    info["preloaded"] = bool(preloaded)
    info["blas_library"] = preloaded[0] if preloaded else mapped[0]
    return info


def measure_matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    """Float32 n x n matmul throughput on the default device, in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a, b, a @ b)  # warm-up: first call pays for allocation and thread start-up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    elapsed = time.perf_counter() - start
    flops = 2.0 * n**3 * repeats
    return flops / max(elapsed, 1e-9) / 1e9


__all__ = [
    "OPENBLAS_CANDIDATES",
    "blas_info",
    "ensure_optimized_blas",
    "find_optimized_blas",
    "measure_matmul_gflops",
]
