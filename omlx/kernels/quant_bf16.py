"""Linear layers that hold 4- / 8-bit quantized weights as stored and compute in bf16.

The third form of a quantized model's weights on a CPU with AVX512-BF16 (beside packed bf16,
omlx/kernels/linear.py, and the int8 kernel, omlx/kernels/quant_linear.py): MLX's affine
groups (`nn.QuantizedLinear`, `nn.QuantizedEmbedding` and its tied LM head; GGUF Q4_0 / Q4_1 /
Q8_0 arrive in this form) stay in their codes, scales and biases, and `_quant_bf16_cpu`
(omlx/kernels/cpu/quant_bf16.cpp) unpacks each 64-column panel to bf16 on the fly and runs the
packed bf16 path's `vdpbf16ps` micro-kernel on it.  Resident bytes are about the stored bytes
(a 4-bit model holds under a third of its packed bf16 bytes) and a decode step reads them, not
2 bytes per weight.

Its results are bit-identical to packing the dequantized weights bf16 (`PackedLinear`): the
same dequantization (mx.dequantize's scale * q + bias), the same bf16 rounding of weights and
activations, the same float32 accumulation order.  So a model in this form answers exactly as
the packed bf16 model does, and a row's output does not depend on its batch.

The weights are repacked once, at load (`repack`), into the kernel's panel order; the scales
keep their stored dtype (float16, bfloat16 or float32), and so do the biases, except that
half-precision biases become float32 offsets (bias - M * scale, 2 more bytes a group) where
those are exact for every group: the kernel's cheapest unpack (quant_bf16_kernel.h).
`supports(layer)` says which layers it takes: affine mode, 4 or 8 bits, groups of 32 / 64 / 128.
A layer may also hold its packed bf16 panels (`HoldsPacked`, the dual form of
omlx/models/dual_form.py) for the calls with many rows.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .affine_quant import (
    AffineQuantWeights, QuantDims, QuantDimsAccessors, affine_layout_supported, load_cpu_extension, padded_codes,
    require_module, stored_quantization,
)
from .cpu_features import cpu_features

log = logging.getLogger("omlx.kernels")

MODULE = "_quant_bf16_cpu"
PANEL = 64  # output columns per panel: must equal PANEL in quant_bf16.cpp
SCALE_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str
    module: object | None = None


@functools.lru_cache(maxsize=None)
def availability() -> Availability:
    """Whether the kernel runs here: built for this MLX and source, on a CPU with AVX512-BF16
    (without it the module's portable loop is far slower than the other forms)."""
    module, why_not = load_cpu_extension(MODULE, "the quantized bf16 kernel")
    if module is None:
        return Availability(False, why_not)
    if module.PANEL != PANEL:
        return Availability(False, f"{MODULE}'s panel width differs from omlx/kernels/quant_bf16.py's")
    if module.isa() != "avx512_bf16" or not cpu_features().avx512_bf16:
        return Availability(False, "this CPU (or the build) has no AVX512-BF16", module)
    return Availability(True, f"MLX C++ extension, {module.isa()}", module)


def kernel():
    """The extension module, or raise with the reason it cannot be used."""
    avail = availability()
    return require_module(avail.module, avail.reason)


# ---------------------------------------------------------------------------- repacking
class QuantBf16Weights(AffineQuantWeights):
    """codes: uint8 (N_pad / 64, K / 2, 64 | 128); scales, biases: stored dtype,
    (N_pad / 64, K / group_size, 64), or (`offsets`) half-precision scales with float32
    c = bias - 2^bits * scale in place of the biases."""

    @property
    def codes(self) -> mx.array:
        return self.data

    @property
    def offsets(self) -> bool:
        return self.scales.dtype != mx.float32 and self.biases.dtype == mx.float32


BLOCK_PAIRS = 4  # k pairs per block of codes: must equal BLOCK_PAIRS in quant_bf16_kernel.h


def _panel_order(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (N_pad, K) -> the kernel's blocks (quant_bf16_kernel.h): per panel, blocks of 4 k
    pairs; in a block, per 16-column register t one little-endian 32-bit word per float lane
    (column in half, k parity), pair i in byte i: 4-bit, both halves in one word (the b half,
    columns 16t .. 16t+7, in the low nibble, the a half, 16t+8 .. 16t+15, in the high one);
    8-bit, the b half's words then the a half's."""
    n_pad, k = codes.shape
    # [panel, t, half, column in half, block, pair in block, k in pair]; a word's byte i is pair i
    c = codes.reshape(n_pad // PANEL, 4, 2, 8, k // 2 // BLOCK_PAIRS, BLOCK_PAIRS, 2)
    if bits == 4:  # -> [panel, block, t, column in half, k in pair, pair]: b | a << 4
        c = c.transpose(0, 4, 1, 3, 6, 5, 2)
        words = c[..., 0] | (c[..., 1] << 4)
    else:  # -> [panel, block, t, half, column in half, k in pair, pair]
        words = c.transpose(0, 4, 1, 2, 3, 6, 5)
    return np.ascontiguousarray(words).reshape(n_pad // PANEL, k // 2, -1)


def _dense_codes(w: "QuantBf16Weights") -> mx.array:
    """The codes back in (N_pad, K) order: _panel_order undone by reshapes and transposes."""
    panels, blocks = w.codes.shape[0], w.k // 2 // BLOCK_PAIRS
    if w.bits == 4:  # [panel, block, t, column in half, k in pair, pair] bytes of (b, a) nibbles
        grid = w.codes.reshape(panels, blocks, 4, 8, 2, BLOCK_PAIRS)
        grid = mx.stack([grid & 0x0F, mx.right_shift(grid, 4)], axis=-1)
        # -> [panel, t, half, column in half, block, pair, k in pair]
        grid = grid.transpose(0, 2, 6, 3, 1, 5, 4)
    else:  # [panel, block, t, half, column in half, k in pair, pair]
        grid = w.codes.reshape(panels, blocks, 4, 2, 8, 2, BLOCK_PAIRS).transpose(0, 2, 3, 4, 1, 6, 5)
    return grid.reshape(panels * PANEL, w.k)


def magic(bits: int, columns: np.ndarray) -> np.ndarray:
    """M per output column (quant_bf16_kernel.h's magic): 256, but 16 for the a halves of
    4-bit registers (columns 16t+8 .. 16t+15)."""
    if bits == 8:
        return np.full(columns.shape, 256.0)
    return np.where(columns % 16 < 8, 256.0, 16.0)


def _panel_groups(a: mx.array, n_pad: int) -> mx.array:
    """Scales or biases (N, groups) -> (panels, groups, 64) in their own dtype, zero rows padding N."""
    n, groups = a.shape
    if n_pad != n:
        a = mx.concatenate([a, mx.zeros((n_pad - n, groups), a.dtype)])
    return mx.contiguous(a.reshape(n_pad // PANEL, PANEL, groups).transpose(0, 2, 1))


def exact_offsets(scales: mx.array, biases: mx.array, bits: int) -> mx.array | None:
    """float32 c = bias - M * scale per group (M = magic(bits, column)) where that is exact for
    every group (then the kernel's one fma of M + q, a float built by integer ops, gives mx.dequantize's
    twice-rounded weight: scale * q is exact for half-precision scales, so rounding it first
    changes nothing), else None.  Tiny magnitudes are refused: a flush-to-zero mode could
    treat them differently from the reference."""
    if scales.dtype not in (mx.float16, mx.bfloat16) or biases.dtype not in (mx.float16, mx.bfloat16):
        return None
    s = np.array(scales.astype(mx.float32)).astype(np.float64)
    b = np.array(biases.astype(mx.float32)).astype(np.float64)
    c = b - magic(bits, np.arange(s.shape[0]))[:, None] * s
    c32 = c.astype(np.float32)
    tiny = 2.0 ** -100
    if not (np.all(np.isfinite(c32)) and np.array_equal(c32.astype(np.float64), c)):
        return None
    if np.any((np.abs(c) < tiny) & (c != 0)) or np.any((np.abs(s) < tiny) & (s != 0)):
        return None
    return mx.array(c32)


def repack(weight: mx.array, scales: mx.array, biases: mx.array | None, bits: int, group_size: int, *,
           allow_offsets: bool = True) -> QuantBf16Weights:
    """MLX affine-quantized (weight, scales, biases) -> the kernel's panels (same codes, N padded
    to a multiple of 64); half-precision scales keep their dtype, with float32 offsets in place
    of the biases where those are exact (a cheaper unpack, 2 more bytes per group)."""
    codes, n, k = padded_codes(weight, biases, bits, group_size, PANEL, "quant_bf16")
    n_pad = codes.shape[0]
    panels = mx.array(_panel_order(codes, bits))
    offsets = exact_offsets(scales, biases, bits) if allow_offsets else None
    if offsets is not None:
        return QuantBf16Weights(panels, _panel_groups(scales, n_pad), _panel_groups(offsets, n_pad), n, k, bits,
                                group_size)
    dtype = scales.dtype if scales.dtype in SCALE_DTYPES else mx.float32
    if biases.dtype != dtype:  # one dtype for both; widening to float32 is exact
        dtype = mx.float32
    return QuantBf16Weights(panels, _panel_groups(scales.astype(dtype), n_pad),
                            _panel_groups(biases.astype(dtype), n_pad), n, k, bits, group_size)


def quant_bf16_matmul(x: mx.array, w: QuantBf16Weights, bias: mx.array | None = None) -> mx.array:
    """x (..., K) @ dequant(W).T (+ bias) -> (..., N) float32, computed in bf16."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features, the weights expect {w.k}")
    return kernel().linear(x, w.codes, w.scales, w.biases, bias, out_features=w.n, bits=w.bits,
                           group_size=w.group_size)


def packed_panels(w: QuantBf16Weights, chunk: int = 8192) -> mx.array:
    """The same weights as `PackedLinear` packs them (omlx/kernels/linear.py's pack_bf16 of the
    dequantized weight): the bf16 values are equal bit for bit, so the packed kernel computes
    what this one does.  Dequantized a chunk of rows at a time (a 49152-row head would
    otherwise take a float32 copy of itself)."""
    from .linear import pack_bf16

    panels, groups = w.scales.shape[:2]
    codes = _dense_codes(w)
    scales = w.scales.transpose(0, 2, 1).reshape(panels * PANEL, groups).astype(mx.float32)
    biases = w.biases.transpose(0, 2, 1).reshape(panels * PANEL, groups).astype(mx.float32)
    if w.offsets:  # the stored bias is c + M * scale, exactly (it is representable)
        biases = biases + mx.array(np.tile(magic(w.bits, np.arange(PANEL)), panels), mx.float32)[:, None] * scales
    parts = []
    for start in range(0, w.n, chunk):
        stop = min(start + chunk, w.n)
        # mx.dequantize's order: scale * q rounded, then + bias rounded (two MLX ops, not fused)
        q = codes[start:stop].reshape(stop - start, groups, w.group_size).astype(mx.float32)
        rows = (q * scales[start:stop, :, None] + biases[start:stop, :, None]).astype(mx.bfloat16)
        mx.eval(rows)
        parts.append(rows.reshape(stop - start, w.k))
    packed = pack_bf16(mx.concatenate(parts) if len(parts) > 1 else parts[0])
    mx.eval(packed)
    return packed


def dequantized_rows(w: QuantBf16Weights, rows: mx.array) -> mx.array:
    """Rows `rows` of dequant(W) rounded to bf16, as float32 (..., K): an embedding lookup read
    from the panels the tied LM head already holds.  Computed as mx.dequantize does (scale * q,
    then + bias), so it equals the packed bf16 embedding's rows."""
    panels = w.codes.shape[0]
    blocks = w.k // 2 // BLOCK_PAIRS
    panel, column = rows // PANEL, rows % PANEL
    t, half, lane = column // 16, (column % 16) // 8, column % 8
    if w.bits == 4:  # [panel, block, t, column in half, k in pair, pair]: b / a in low / high nibbles
        grid = w.codes.reshape(panels, blocks, 4, 8, 2, BLOCK_PAIRS)
        shift = (4 * half).astype(mx.uint8).reshape(*rows.shape, 1, 1, 1)
        picked = mx.right_shift(grid[panel, :, t, lane], shift) & 0x0F
    else:  # [panel, block, t, half, column in half, k in pair, pair]
        grid = w.codes.reshape(panels, blocks, 4, 2, 8, 2, BLOCK_PAIRS)
        picked = grid[panel, :, t, half, lane]
    # rows.shape + (blocks, k in pair, pair) -> (blocks, pair, k in pair): k order
    codes = mx.swapaxes(picked, -1, -2).reshape(*rows.shape, w.k).astype(mx.float32)
    scales = w.scales[panel, :, column].astype(mx.float32)
    biases = w.biases[panel, :, column].astype(mx.float32)
    if w.offsets:  # the stored bias is c + M * scale, exactly (it is representable)
        m = mx.where(column % 16 < 8, 256.0, 16.0) if w.bits == 4 else mx.array(256.0)
        biases = biases + m.reshape(*m.shape, 1) * scales
    scales = mx.repeat(scales, w.group_size, axis=-1)
    biases = mx.repeat(biases, w.group_size, axis=-1)
    return (codes * scales + biases).astype(mx.bfloat16).astype(mx.float32)


# ---------------------------------------------------------------------------- layers
def _install(layer: nn.Module, w: QuantBf16Weights) -> None:
    # The arrays are parameters (update() / parameters() / the memory ledger see them), named
    # apart from a quantized layer's `scales` (code that finds those dequantizes `.weight`); the
    # dims are a plain attribute.
    layer._dims = QuantDims(w.n, w.k, w.bits, w.group_size)
    layer.codes, layer.panel_scales, layer.panel_biases = w.codes, w.scales, w.biases


def _without_offsets(w: QuantBf16Weights) -> QuantBf16Weights:
    """The same weights with their stored biases in place of offsets (c + M * scale is the
    stored bias exactly, so it goes back to the scales' dtype unchanged)."""
    if not w.offsets:
        return w
    column = mx.arange(PANEL)
    m = mx.where(column % 16 < 8, 256.0, 16.0) if w.bits == 4 else mx.full((PANEL,), 256.0)
    biases = (w.biases + m * w.scales.astype(mx.float32)).astype(w.scales.dtype)
    return QuantBf16Weights(w.codes, w.scales, biases, w.n, w.k, w.bits, w.group_size)


def _weights(layer: nn.Module) -> QuantBf16Weights:
    d = layer._dims
    return QuantBf16Weights(layer["codes"], layer["panel_scales"], layer["panel_biases"], d.n, d.k, d.bits, d.group_size)


class HoldsPacked:
    """A quantized-bf16 layer that may also hold its weights packed bf16 (the dual form,
    omlx/models/dual_form.py): a call of `packed_from_rows` rows or more then reads the packed
    panels, fewer rows the stored codes.  The kernel picks at evaluation from the call's rows
    (quant_bf16.cpp), and both give the same bits, so a row's result never depends on it."""

    _packed_from_rows = 0  # 0: no packed copy held

    def hold_packed(self, from_rows: int) -> None:
        if from_rows < 1:
            raise ValueError("from_rows must be at least 1")
        if "packed_weight" not in self:
            self.packed_weight = packed_panels(_weights(self))
        self._packed_from_rows = from_rows

    @property
    def packed_from_rows(self) -> int:
        return self._packed_from_rows

    def _linear(self, x: mx.array, bias: mx.array | None) -> mx.array:
        # Kept to a few Python operations: a decode step makes hundreds of these calls.
        d = self._dims
        return kernel().linear(x, self["codes"], self["panel_scales"], self["panel_biases"], bias,
                               out_features=d.n, bits=d.bits, group_size=d.group_size,
                               packed=self.get("packed_weight"), packed_from_rows=self._packed_from_rows)


class QuantBf16Linear(HoldsPacked, QuantDimsAccessors, nn.Module):
    """Drop-in for `nn.QuantizedLinear` (affine, 4 / 8 bits, groups 32 / 64 / 128) computing
    exactly what `PackedLinear` of its dequantized weight computes."""

    def __init__(self, w: QuantBf16Weights, bias: mx.array | None = None):
        super().__init__()
        _install(self, w)
        self.out_features, self.in_features = w.n, w.k
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        self.freeze()

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "QuantBf16Linear":
        return cls(repack(*stored_quantization(layer)), layer.get("bias"))

    @staticmethod
    def can_concatenate(parts: list) -> bool:
        """Whether `concatenate` can join these layers: one input width, bits, group size and
        scale dtype, and every part but the last filling whole panels (so the panels just
        follow each other)."""
        if not parts or not all(type(p) is QuantBf16Linear for p in parts):
            return False
        first = parts[0]
        same = {(p._dims.k, p._dims.bits, p._dims.group_size, p["panel_scales"].dtype) for p in parts}
        return len(same) == 1 and all(p._dims.n % PANEL == 0 for p in parts[:-1]) and first._dims.n > 0

    @classmethod
    def concatenate(cls, parts: list["QuantBf16Linear"]) -> "QuantBf16Linear":
        """One layer whose output columns are the parts' outputs side by side (q/k/v, gate/up:
        omlx/models/fused_projections.py), over the same bytes; each column's result is
        unchanged, since the kernel computes every column alone."""
        d = parts[0]._dims
        n = sum(p._dims.n for p in parts)
        weights = [_weights(p) for p in parts]
        if len({w.offsets for w in weights}) > 1:  # one form for the joined layer: the stored biases
            weights = [_without_offsets(w) for w in weights]
        w = QuantBf16Weights(*(mx.concatenate([getattr(w, key) for w in weights]) for key in ("codes", "scales", "biases")),
                             n, d.k, d.bits, d.group_size)
        bias = None
        if any("bias" in p for p in parts):
            bias = mx.concatenate([p["bias"] if "bias" in p else mx.zeros((p._dims.n,), mx.float32) for p in parts])
        fused = cls(w, bias)
        if all("packed_weight" in p for p in parts):  # dual-form parts: their packed panels, joined the same way
            fused.packed_weight = mx.concatenate([p["packed_weight"] for p in parts])
            fused._packed_from_rows = parts[0].packed_from_rows
        mx.eval(fused.parameters())
        return fused

    def _extra_repr(self) -> str:
        d = self._dims
        return (f"input_dims={d.k}, output_dims={d.n}, bias={'bias' in self}, bits={d.bits}, "
                f"group_size={d.group_size}, bf16 compute" + _dual_repr(self))

    def __call__(self, x: mx.array) -> mx.array:
        return self._linear(x, self.get("bias"))


class QuantBf16Embedding(HoldsPacked, QuantDimsAccessors, nn.Module):
    """Drop-in for `nn.QuantizedEmbedding`, held once in the kernel's panels: lookups
    dequantize the picked rows, `as_linear` (a tied LM head) runs the kernel over the same bytes."""

    def __init__(self, w: QuantBf16Weights):
        super().__init__()
        _install(self, w)
        self.num_embeddings, self.dims = w.n, w.k
        self.freeze()

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "QuantBf16Embedding":
        return cls(repack(*stored_quantization(layer)))

    def _extra_repr(self) -> str:
        d = self._dims
        return f"{d.n}, {d.k}, bits={d.bits}, group_size={d.group_size}, bf16 compute" + _dual_repr(self)

    def __call__(self, ids: mx.array) -> mx.array:
        return dequantized_rows(_weights(self), ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._linear(x, None)


def _dual_repr(layer: HoldsPacked) -> str:
    return f", packed bf16 from {layer.packed_from_rows} rows" if layer.packed_from_rows else ""


def supports(layer: nn.Module) -> bool:
    """Whether a layer (exactly an `nn.QuantizedLinear` / `nn.QuantizedEmbedding`: subclasses
    may read .weight) can run through this kernel."""
    return type(layer) in (nn.QuantizedLinear, nn.QuantizedEmbedding) and affine_layout_supported(layer)
