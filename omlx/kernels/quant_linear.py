"""Linear layers that read 4- / 8-bit quantized weights as they are stored, on the CPU.

MLX's affine-quantized layers (`nn.QuantizedLinear`, the tied LM head of an
`nn.QuantizedEmbedding`; GGUF Q4_0 / Q4_1 / Q8_0 arrive in this form, see omlx/gguf/weights.py)
run here through `_quant_linear_cpu` (omlx/kernels/cpu/quant_linear.cpp): each row of x is
quantized per weight group (to ~15 bits held as two int8 parts, see PRECISION) and multiplied
against the 4/8-bit codes with AVX512-VNNI int8 dot products (AVX2 `vpmaddubsw` where VNNI is
missing), the group's scale and bias folded in afterwards.  One stream
of a small model is bound by weight bytes per token: this reads ~5 bits per weight (4-bit
codes + float16 scale and bias per group of 32) where the float32-dequantized path reads 32.

Numbers differ slightly from float32: the result equals `dequant(W) @ dequant(quant(x))`
(the tests check that, and top-1 agreement on the real SmolLM2).  Rows never influence each
other: a row's output is bit-identical alone or in any batch.

The weights are repacked once, at swap time (`repack`), into the kernel's layout: output
rows in tiles of 16, each 64-byte vector the 16 rows' codes for 4 consecutive k (the operand
order of `vpdpbusd`), scales and biases per (tile, group) in float16 when that is exact.

`swap_quantized_linears(model)` replaces a model's quantized layers in place, the way
`nn.quantize` swaps them; mlx-lm's model code is unchanged.  Without the built extension,
on a device other than the CPU, or (unless asked) on a CPU with neither AVX512-VNNI nor AVX2,
it swaps nothing and `availability()` says why.

For the loader: on the CPU, for a model with quantized layers that is *not* dequantized to
float32, after `mlx_lm.load` call `swap_quantized_linears(model, widen_rest=True)` once (the
remaining float16 / bfloat16 parameters, norms and the embedding's scales, become float32, so
activations stay float32 as on the float32 path); it serves every row count (decode and prefill
chunks alike: bench/README.md has the per-shape numbers), a row's result is independent of
the batch, and it needs no setting per call.  `availability().info()` is what /health can
report.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .affine_quant import (
    AffineQuantWeights, QuantDims, QuantDimsAccessors, affine_layout_supported, load_cpu_extension, padded_codes,
    require_module, stored_quantization,
)
from .affine_quant import unpack_codes  # noqa: F401 - read here by tests/test_quant_linear.py

log = logging.getLogger("omlx.kernels")

MODULE = "_quant_linear_cpu"
TILE = 16  # output rows per tile (one zmm of lanes); N is padded to a multiple of it
ENV = "OMLX_QUANT_MATMUL"  # auto (default): AVX512-VNNI or AVX2 | portable: the scalar path too | off
FAST_ISAS = ("avx512-vnni", "avx2")  # the paths measured faster than float32 (bench/README.md)
# x is quantized per weight group to integer codes v = round(x * levels / max|x|):
#   1: int8 (levels 127), one VNNI dot per weight vector, as llama.cpp's Q8_1 activations;
#   2: ~15 bits (levels 127 * 128) held as two int8 parts, two VNNI dots per weight vector;
#   3: not quantized but rounded to bf16, the 4-bit codes unpacked to bf16 in registers and
#      multiplied with vdpbf16ps (the alternative the issue asked to measure; 4-bit weights
#      and AVX512-BF16 only).
# Int8 activations moved SmolLM2's teacher-forced top-1 off float32's on 3.4% of tokens (and
# it stopped answering "Paris"); the split keeps it >= 99% for the same weight bytes (see
# bench/README.md, "Quantized weights read as stored").
PRECISION_LEVELS = {1: 127, 2: 127 * 128}
BF16 = 3
PRECISION = 2


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str
    isa: str = ""
    module: object | None = None

    def info(self) -> dict:
        return {"quant_matmul": "vnni-int8" if self.ok else "none", "isa": self.isa, "reason": self.reason}


@functools.lru_cache(maxsize=None)
def availability() -> Availability:
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode == "off":
        return Availability(False, f"{ENV}=off")
    module, why_not = load_cpu_extension(MODULE, "the quantized-weight kernel")
    if module is None:
        return Availability(False, why_not)
    isa = module.isa()
    if isa not in FAST_ISAS and mode != "portable":
        return Availability(False, f"this CPU has neither AVX512-VNNI nor AVX2 (the scalar path is slower than "
                                   f"float32; {ENV}=portable forces it)", isa, module)
    return Availability(True, f"MLX C++ extension, {isa}", isa, module)


def kernel():
    """The extension module, or raise with the reason it cannot be used."""
    avail = availability()
    return require_module(avail.module, avail.reason)


# ---------------------------------------------------------------------------- repacking
class PackedWeights(AffineQuantWeights):
    """packed: uint8, tiles * 16 * K * bits / 8; scales, biases: float16 or float32,
    (tiles, groups, 16)."""

    @property
    def packed(self) -> mx.array:
        return self.data


def _as_numpy_float(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a, copy=False)


def _scale_storage(scales: np.ndarray, biases: np.ndarray) -> np.dtype:
    """float16 when both round-trip exactly (GGUF's are float16), else float32."""
    for a in (scales, biases):
        if a.dtype == np.float16:
            continue
        with np.errstate(over="ignore"):
            if not np.array_equal(a.astype(np.float16).astype(a.dtype), a):
                return np.dtype(np.float32)
    return np.dtype(np.float16)


def repack(weight: mx.array, scales: mx.array, biases: mx.array | None, bits: int, group_size: int) -> PackedWeights:
    """MLX affine-quantized (weight, scales, biases) -> the kernel's tiled layout."""
    codes, n, k = padded_codes(weight, biases, bits, group_size, TILE, "quant_linear")
    padded_n = codes.shape[0]
    tiles = padded_n // TILE
    if bits == 4:
        # [tile, row, k/8, half, 4]: low nibble k..k+3, high nibble k+4..k+7.
        c = codes.reshape(tiles, TILE, k // 8, 2, 4)
        packed = (c[:, :, :, 0, :] | (c[:, :, :, 1, :] << 4)).transpose(0, 2, 1, 3)
    else:
        packed = codes.reshape(tiles, TILE, k // 4, 4).transpose(0, 2, 1, 3)
    s = _as_numpy_float(scales)
    b = _as_numpy_float(biases)
    dtype = _scale_storage(s, b)
    groups = k // group_size

    def tiled(a: np.ndarray) -> mx.array:
        a = a.astype(dtype)
        if padded_n != n:
            a = np.concatenate([a, np.zeros((padded_n - n, groups), dtype)])
        return mx.array(np.ascontiguousarray(a.reshape(tiles, TILE, groups).transpose(0, 2, 1)))

    return PackedWeights(mx.array(np.ascontiguousarray(packed).reshape(-1)), tiled(s), tiled(b), n, k, bits,
                         group_size)


def quant_matmul(x: mx.array, w: PackedWeights, bias: mx.array | None = None, *, precision: int | None = None,
                 isa: str = "auto") -> mx.array:
    """x (..., K) @ dequant(W).T (+ bias) -> (..., N), in x's dtype (computed in float32).
    `precision`: how finely x is quantized per group (PRECISION_LEVELS), default PRECISION;
    `isa`: "auto" (the best this CPU has), or force "avx512-vnni", "avx2", "portable" (tests:
    all three give the same bits)."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features, the weights expect {w.k}")
    y = kernel().quant_linear(x, w.packed, w.scales, w.biases, bias, n=w.n, bits=w.bits,
                              group_size=w.group_size, precision=precision or PRECISION, isa=isa)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


# ---------------------------------------------------------------------------- layers
def precision_for(rows: int, bits: int) -> int:
    """Which activation precision a call of `rows` rows uses (see PRECISION_LEVELS)."""
    return PRECISION


def _install(layer: nn.Module, packed: PackedWeights) -> None:
    # The arrays are parameters (so update() / parameters() / memory accounting see them);
    # the dims are a plain attribute.
    layer._dims = QuantDims(packed.n, packed.k, packed.bits, packed.group_size)
    layer.packed, layer.packed_scales, layer.packed_biases = packed.packed, packed.scales, packed.biases


def _apply(layer: nn.Module, x: mx.array, bias: mx.array | None) -> mx.array:
    """The layer's kernel call, kept to a few Python operations: a decode step makes hundreds."""
    d = layer._dims
    rows = x.size // d.k if d.k else 0
    y = kernel().quant_linear(x, layer["packed"], layer["packed_scales"], layer["packed_biases"], bias, n=d.n,
                              bits=d.bits, group_size=d.group_size, precision=precision_for(rows, d.bits))
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


class QuantLinear(QuantDimsAccessors, nn.Module):
    """Drop-in for `nn.QuantizedLinear` (affine, 4 / 8 bits, groups 32 / 64 / 128)."""

    def __init__(self, packed: PackedWeights, bias: mx.array | None = None):
        super().__init__()
        _install(self, packed)
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        self.freeze()

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "QuantLinear":
        return cls(repack(*stored_quantization(layer)), layer.get("bias"))

    def _extra_repr(self) -> str:
        d = self._dims
        return f"input_dims={d.k}, output_dims={d.n}, bias={'bias' in self}, bits={d.bits}, group_size={d.group_size}"

    def __call__(self, x: mx.array) -> mx.array:
        return _apply(self, x, self.get("bias"))


class QuantEmbedding(nn.QuantizedEmbedding):
    """An `nn.QuantizedEmbedding` whose `as_linear` (the tied LM head) runs through the kernel.
    Lookups still read MLX's layout, so the table is held twice (packed + as stored)."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "QuantEmbedding":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        new.num_embeddings, new.dims = layer.num_embeddings, layer.dims
        new.weight, new.scales = layer.weight, layer.scales
        if layer.get("biases") is not None:
            new.biases = layer.biases
        _install(new, repack(*stored_quantization(layer)))
        new.freeze()
        return new

    def as_linear(self, x: mx.array) -> mx.array:
        return _apply(self, x, None)


def supports(layer: nn.Module) -> bool:
    return (isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            and not isinstance(layer, QuantEmbedding) and affine_layout_supported(layer))


def swap_quantized_linears(model: nn.Module, *, embeddings: bool = True, widen_rest: bool = False,
                           force: bool = False) -> int:
    """Replace the model's supported `nn.QuantizedLinear` layers (and, with `embeddings`, the
    `nn.QuantizedEmbedding`s, for a tied LM head) by kernel-backed ones, in place.  With
    `widen_rest`, the float16 / bfloat16 parameters first become float32 (norms, embedding
    scales), so activations run in float32.  Returns the number swapped; 0 (and a log line,
    the model untouched) where the kernel is not available here, unless `force` (tests: the
    portable path)."""
    avail = availability()
    if not avail.ok and not (force and avail.module is not None):
        log.info("quantized weights: kernel not used (%s)", avail.reason)
        return 0
    if widen_rest:
        from mlx.utils import tree_map

        model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v,
                              model.parameters()))
    replacements = []
    for name, module in model.named_modules():
        if not supports(module):
            continue
        if isinstance(module, nn.QuantizedLinear):
            replacements.append((name, QuantLinear.from_quantized(module)))
        elif embeddings:
            replacements.append((name, QuantEmbedding.from_quantized(module)))
    if replacements:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replacements))
        mx.eval([m.parameters() for _, m in replacements])
    log.info("quantized weights: %d layer(s) read as stored through %s", len(replacements), avail.isa or "?")
    return len(replacements)
