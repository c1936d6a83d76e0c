"""One-node RMSNorm and RoPE rotation on the CPU (omlx/kernels/cpu/fused_ops.cpp).

MLX's CPU backend runs `mx.fast.rms_norm` and `mx.fast.rope` as fallback graphs of ~7 and
~20 nodes per call; a decode step of a 30-layer model makes 61 norms and 60 ropes, and each
node costs microseconds whatever its size.  `kernel()` is the built `_fused_ops_cpu`
extension, or None where it is not built or not current (the callers then keep MLX's ops).
"""

from __future__ import annotations

import functools
import logging
import os

import mlx.core as mx

log = logging.getLogger("omlx.kernels")

MODULE = "_fused_ops_cpu"


@functools.lru_cache(maxsize=None)
def kernel():
    """The extension, or None (said once in the log) where it cannot run."""
    if mx.default_device() != mx.cpu:
        return None
    from . import build

    if build.built_module(MODULE) is None or not build.is_current(MODULE):
        log.info("fused norm / rope kernel not built or stale (python -m omlx.kernels.build): MLX's ops run")
        return None
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other kernels (backend.py)
    try:
        from . import _fused_ops_cpu as module  # type: ignore[attr-defined]
    except ImportError as exc:
        log.info("fused norm / rope kernel failed to load (%s): MLX's ops run", exc)
        return None
    return module
