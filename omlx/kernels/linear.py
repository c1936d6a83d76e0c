"""Linear layers with bf16 weights packed for the CPU's bf16 dot-product unit.

On a CPU with AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+) a linear layer
runs through `_linear_cpu` (omlx/kernels/cpu/linear_bf16.cpp): float32 activations rounded to
bf16, bf16 weights, float32 accumulation.  It reads half the bytes of MLX's float32 matmul
(decode is bound by them) and multiplies at twice its rate; bench/matmul_bench.py measures
it against MLX float32 through OpenBLAS on our shapes (numbers in bench/README.md).

Which path runs is decided once, at start (`matmul_path()`), from the CPU's flags
(omlx/kernels/cpu_features.py) and `OMLX_MATMUL`: auto (default: bf16 where the CPU has a
bf16 unit and the kernel is built), float32 (today's path: MLX float32 through BLAS), or
bf16 (the packed path wherever the built kernel can run).  The log and `/health`
(`compute.matmul`) say which and why.

`PackedLinear` / `PackedEmbedding` are the modules omlx/models/packed_weights.py swaps into a
model at load; their weights are packed once (`pack_bf16`), never at call time.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cpu_features import cpu_features

log = logging.getLogger("omlx.kernels")

MODULE = "_linear_cpu"
ENV = "OMLX_MATMUL"  # auto | bf16 | float32
PANEL = 64  # output columns per packed panel: must equal PANEL in linear_bf16.cpp


@dataclass(frozen=True)
class MatmulPath:
    name: str  # "bf16-packed" or "float32"
    reason: str
    isa: str = ""
    library: str = ""
    module: object | None = None

    @property
    def bf16(self) -> bool:
        return self.module is not None

    def info(self) -> dict:
        return {"matmul": self.name, "isa": self.isa, "library": self.library, "reason": self.reason}


@functools.lru_cache(maxsize=None)
def matmul_path() -> MatmulPath:
    chosen = _choose()
    log.info("matmul: %s (%s; isa %s; %s)", chosen.name, chosen.reason, chosen.isa or "-", chosen.library or "-")
    return chosen


def _float32(reason: str, isa: str) -> MatmulPath:
    from omlx.blas import blas_info

    blas = blas_info()
    library = f"MLX float32 via {blas['blas']}" + (f" ({blas['blas_library']})" if blas.get("blas_library") else "")
    return MatmulPath("float32", reason, isa, library)


def _choose() -> MatmulPath:
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in ("", "auto", "bf16", "float32"):
        log.warning("%s=%r is not one of auto, bf16, float32; using auto", ENV, mode)
        mode = "auto"
    features = cpu_features()
    isa = features.summary()
    if mode == "float32":
        return _float32(f"{ENV}=float32", isa)
    if mx.default_device() != mx.cpu:
        return MatmulPath("native", f"the packed kernel is for the CPU; {mx.default_device()} runs MLX's own matmul", isa)
    if features.bf16_isa is None and mode != "bf16":
        return _float32("this CPU has no bf16 dot-product unit (AVX512-BF16 / AMX-BF16)", isa)
    try:
        module = kernel()
    except RuntimeError as exc:
        return _float32(str(exc), isa)
    built_for = module.isa()
    if built_for == "avx512_bf16" and not features.avx512_bf16:
        return _float32("the kernel was built for AVX512-BF16, which this CPU lacks (rebuild: python -m omlx.kernels.build)", isa)
    if built_for != "avx512_bf16" and mode != "bf16":
        return _float32("the kernel was built without AVX512-BF16 (its portable loop is slower than BLAS)", isa)
    unused_amx = " (AMX-BF16 present, not used yet)" if features.amx_bf16 else ""
    reason = f"{ENV}=bf16" if mode == "bf16" else "this CPU has a bf16 dot-product unit"
    library = f"omlx {MODULE} ({'vdpbf16ps' if built_for == 'avx512_bf16' else 'portable loop'}, " \
              f"{module.num_threads()} threads, decode calls' worker spin {module.spin_us()} us), mlx {mx.__version__}"
    return MatmulPath("bf16-packed", reason, built_for + unused_amx, library, module)


@functools.lru_cache(maxsize=None)
def kernel():
    """The built `_linear_cpu` extension (raises RuntimeError saying why when it cannot load)."""
    from . import build

    if build.built_module(MODULE) is None:
        raise RuntimeError("the bf16 kernel is not built (run: python -m omlx.kernels.build)")
    if not build.is_current(MODULE):
        raise RuntimeError("the bf16 kernel was built for another MLX version or source (run: python -m omlx.kernels.build)")
    # Idle OpenMP threads sleep rather than spin (see omlx/kernels/backend.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from . import _linear_cpu as module  # type: ignore[attr-defined]
    except ImportError as exc:
        raise RuntimeError(f"the bf16 kernel failed to load: {exc}") from None
    if module.PANEL != PANEL:
        raise RuntimeError("the bf16 kernel's panel width differs from omlx/kernels/linear.py's")
    return module


def pack_bf16(weight: mx.array) -> mx.array:
    """(N, K) weights -> the kernel's layout (N_pad / 64, K_pad / 2, 128) in bf16.

    Rounded to bf16 once (round to nearest even); bf16 weights are not widened on the way."""
    n, k = weight.shape
    n_pad, k_pad = -(-n // PANEL) * PANEL, k + (k & 1)
    w = weight.astype(mx.bfloat16)
    if (n_pad, k_pad) != (n, k):
        w = mx.pad(w, [(0, n_pad - n), (0, k_pad - k)])
    w = w.reshape(n_pad // PANEL, PANEL, k_pad // 2, 2).transpose(0, 2, 1, 3)
    return mx.contiguous(w.reshape(n_pad // PANEL, k_pad // 2, 2 * PANEL))


def unpack_rows(packed: mx.array, rows: mx.array, in_features: int) -> mx.array:
    """Rows `rows` of the (N, K) matrix packed in `packed`, as bf16 (..., K): an embedding
    lookup that reads the packed copy a tied LM head already holds, instead of a second one."""
    panels, pairs, _ = packed.shape
    grid = packed.reshape(panels, pairs, PANEL, 2)
    picked = grid[rows // PANEL, :, rows % PANEL, :]  # rows.shape + (pairs, 2)
    return picked.reshape(*rows.shape, 2 * pairs)[..., :in_features]


def packed_linear(x: mx.array, packed: mx.array, bias: mx.array | None, out_features: int,
                  in_features: int = -1) -> mx.array:
    """y = x @ W.T (+ bias), float32, W packed by pack_bf16 (in_features, when given, is
    checked: the packing pads K to even, so the packed shape alone cannot tell K from K + 1)."""
    return kernel().linear(x, packed, bias, out_features=out_features, in_features=in_features)


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight packed bf16: y = x @ W.T (+ b), float32 in and out."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = pack_bf16(weight)
        if bias is not None:
            self.bias = bias.astype(mx.float32)

    @classmethod
    def from_linear(cls, layer: nn.Module) -> "PackedLinear":
        """From an `nn.Linear` or `nn.QuantizedLinear` (dequantized, then rounded to bf16)."""
        bias = layer.get("bias") if "bias" in layer else None
        return cls(dense_weight(layer), bias)

    def _extra_repr(self) -> str:
        return f"input_dims={self.in_features}, output_dims={self.out_features}, bias={'bias' in self}, bf16 packed"

    def __call__(self, x: mx.array) -> mx.array:
        return packed_linear(x, self.weight, self.get("bias"), self.out_features, self.in_features)


class PackedEmbedding(nn.Module):
    """`nn.Embedding` held once, packed bf16: lookups gather float32 rows out of the packed
    layout, and `as_linear` (a tied LM head) runs the packed kernel over the same bytes."""

    def __init__(self, weight: mx.array):
        super().__init__()
        self.num_embeddings, self.dims = weight.shape
        self.weight = pack_bf16(weight)

    @classmethod
    def from_embedding(cls, layer: nn.Module) -> "PackedEmbedding":
        return cls(dense_weight(layer))

    def _extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dims}, bf16 packed"

    def __call__(self, ids: mx.array) -> mx.array:
        return unpack_rows(self.weight, ids, self.dims).astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return packed_linear(x, self.weight, None, self.num_embeddings, self.dims)


def dense_weight(layer: nn.Module) -> mx.array:
    """A linear or embedding layer's (N, K) weight as stored, quantized ones dequantized (scales
    widened first, so the affine map is computed in float32 before the one bf16 rounding)."""
    if "scales" not in layer:
        return layer.weight
    biases = layer.get("biases")
    return mx.dequantize(layer.weight, layer.scales.astype(mx.float32),
                         None if biases is None else biases.astype(mx.float32),
                         group_size=layer.group_size, bits=layer.bits, mode=getattr(layer, "mode", "affine"))
