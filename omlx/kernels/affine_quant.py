"""What the two kernels that read MLX affine-quantized weights as stored share.

`quant_linear.py` (int8 VNNI) and `quant_bf16.py` (bf16 on the fly) load their CPU extension
the same way, accept the same weights (affine mode, 4 / 8 bits, groups 32 / 64 / 128), unpack
and pad the codes the same way before each lays them out for its own kernel, and give their
layers the same dims and accessors; this module holds that one copy.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
REBUILD = "(run: python -m omlx.kernels.build)"


def load_cpu_extension(module: str, what: str) -> tuple[object | None, str]:
    """(the extension `omlx.kernels.<module>`, "") or (None, why it cannot be loaded here): CPU
    device only, built, and built for this MLX and these sources.  `what` names the kernel in
    the CPU-only reason."""
    if mx.default_device() != mx.cpu:
        return None, f"{what} is CPU-only (device: {mx.default_device()})"
    from . import build

    if build.built_module(module) is None:
        return None, f"{module} is not built {REBUILD}"
    if not build.is_current(module):
        return None, f"{module} was built for another MLX version or source {REBUILD}"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see backend.py: idle threads must sleep
    try:
        return importlib.import_module(f"{__package__}.{module}"), ""
    except ImportError as exc:
        return None, f"{module} failed to load: {exc}"


def require_module(module: object | None, reason: str) -> object:
    """The loaded extension, or raise with the reason it cannot be used."""
    if module is None:
        raise RuntimeError(reason)
    return module


def unpack_codes(weight: mx.array, bits: int) -> np.ndarray:
    """MLX's packed uint32 words (N, K * bits / 32) -> codes (N, K) uint8 (values packed
    little end first: in bytes, 4-bit value 2i is byte i's low nibble)."""
    raw = np.ascontiguousarray(np.array(weight, copy=False).astype(np.uint32, copy=False)).view(np.uint8)
    if bits == 8:
        return raw
    codes = np.empty((raw.shape[0], raw.shape[1] * 2), np.uint8)
    codes[:, 0::2] = raw & 0x0F
    codes[:, 1::2] = raw >> 4
    return codes


def padded_codes(weight: mx.array, biases: mx.array | None, bits: int, group_size: int, multiple: int,
                 kernel_name: str) -> tuple[np.ndarray, int, int]:
    """Checks that the weights are ones the kernels take, then unpacks the codes and pads N with
    zero rows to a multiple of `multiple`: (codes (N_pad, K), N, K)."""
    if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"{kernel_name} supports bits {SUPPORTED_BITS} and group sizes {SUPPORTED_GROUPS}, "
                         f"not bits={bits} group_size={group_size}")
    if biases is None:
        raise ValueError(f"{kernel_name} needs affine biases (mode='affine')")
    codes = unpack_codes(weight, bits)
    n, k = codes.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    n_pad = -(-n // multiple) * multiple
    if n_pad != n:
        codes = np.concatenate([codes, np.zeros((n_pad - n, k), np.uint8)])
    return codes, n, k


def stored_quantization(layer: nn.Module) -> tuple:
    """A quantized layer's (weight, scales, biases, bits, group_size), the arguments of a
    kernel's `repack`."""
    return layer.weight, layer.scales, layer.get("biases"), layer.bits, layer.group_size


def affine_layout_supported(layer: nn.Module) -> bool:
    """Whether a quantized layer's weights are affine, 4 / 8 bits, in groups the kernels take
    (the layer's type is each kernel's own question)."""
    return (getattr(layer, "mode", "affine") == "affine" and layer.get("biases") is not None
            and layer.bits in SUPPORTED_BITS and layer.group_size in SUPPORTED_GROUPS
            and (layer.weight.shape[1] * 32 // layer.bits) % layer.group_size == 0)


@dataclass(frozen=True)
class QuantDims:
    """A kernel-backed layer's shape, kept as a plain attribute (not a parameter)."""
    n: int
    k: int
    bits: int
    group_size: int


class QuantDimsAccessors:
    """`bits` / `group_size` as `nn.QuantizedLinear` has them, read from the layer's `_dims`."""

    _dims: QuantDims

    @property
    def bits(self) -> int:
        return self._dims.bits

    @property
    def group_size(self) -> int:
        return self._dims.group_size


@dataclass
class AffineQuantWeights:
    """One layer's weights repacked for a kernel: `data` the codes in that kernel's layout,
    `scales` / `biases` per (block of output rows, group), N (unpadded) and K."""
    data: mx.array
    scales: mx.array
    biases: mx.array
    n: int
    k: int
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.biases.nbytes
