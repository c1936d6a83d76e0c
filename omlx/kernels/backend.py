"""Which attention implementation runs: the fused kernel, or the portable MLX-ops path.

The fused CPU kernel is an MLX extension built by `python -m omlx.kernels.build` (setup
does it).  It is used when the default device is the CPU, the build matches the installed
MLX, and `OMLX_KERNELS` is not `portable`; otherwise the portable path runs, which computes
the same attention from MLX ops.  Whichever is chosen, and why, is logged and reported in
`/health`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import mlx.core as mx

log = logging.getLogger("omlx.kernels")

ENV = "OMLX_KERNELS"  # auto (default) | portable


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # "fused-cpu" or "portable"
    reason: str
    module: object | None = None  # the extension, when fused
    threads: int = 1

    @property
    def fused(self) -> bool:
        return self.module is not None

    def info(self) -> dict:
        return {"attention": self.name, "reason": self.reason, "threads": self.threads}


@functools.lru_cache(maxsize=None)
def attention_backend() -> AttentionBackend:
    choice = _choose()
    log.info("attention: %s (%s)", choice.name, choice.reason)
    return choice


def _choose() -> AttentionBackend:
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode == "portable":
        return AttentionBackend("portable", f"{ENV}=portable")
    if mode not in ("", "auto", "fused"):
        log.warning("%s=%r is not one of auto, fused, portable; using auto", ENV, mode)
    if mx.default_device() != mx.cpu:
        return AttentionBackend("portable", f"no fused kernel for {mx.default_device()} yet")
    from . import build

    if build.built_module() is None:
        return AttentionBackend("portable", "the CPU kernel is not built (run: python -m omlx.kernels.build)")
    if not build.is_current():
        return AttentionBackend(
            "portable", "the CPU kernel was built for another MLX version or source (run: python -m omlx.kernels.build)"
        )
    # OpenMP threads that spin after a parallel region take the core from OpenBLAS's threads
    # in the matmul that follows (and on 2 cores that doubled a 32-row decode step's
    # attention time here): idle kernel threads sleep.  Read by libgomp when it loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from . import _paged_attention_cpu as module  # type: ignore[attr-defined]
    except ImportError as exc:
        return AttentionBackend("portable", f"the CPU kernel failed to load: {exc}")
    return AttentionBackend("fused-cpu", "MLX C++ extension, built for this machine", module, module.num_threads())
