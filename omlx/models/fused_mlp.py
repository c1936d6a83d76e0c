"""A SwiGLU MLP over its fused gate / up projection in two nodes instead of four.

With its projections packed and fused (omlx/models/fused_projections.py), mlx-lm's MLP
`down_proj(swiglu(gate_proj(x), up_proj(x)))` builds the fused call, two slices of it and
MLX's compiled swiglu: four graph nodes per layer and token-step, each costing microseconds on
the CPU whatever its size.  Here the MLP runs the fused call and `swiglu_split`
(omlx/kernels/cpu/fused_ops.cpp), which reads both halves of the fused output and computes
the compiled kernel's exact per-element sequence: **bit-identical** to mlx-lm's path, for any
input shape, so the swap applies to every call (padded, ragged, mlx-lm's own caches).

The layer's class becomes a subclass whose only difference is `__call__` (mlx-lm's model code
and the parameter names are unchanged).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from omlx.kernels import fused_ops
from omlx.kernels.linear import PackedLinear
from omlx.kernels.quant_bf16 import QuantBf16Linear

from .call_swap import CallSwap, known_classes

# mlx-lm MLP classes whose __call__ is exactly `down_proj(swiglu(gate_proj(x), up_proj(x)))`.
_LAYERS = (
    ("mlx_lm.models.llama", "MLP"),
    ("mlx_lm.models.qwen2", "MLP"),
    ("mlx_lm.models.qwen3", "MLP"),
    ("mlx_lm.models.qwen3_moe", "MLP"),
    ("mlx_lm.models.granite", "MLP"),
    ("mlx_lm.models.olmo2", "MLP"),
)


def _known_layers() -> set[type]:
    return known_classes(_LAYERS)


def _fused_call(self, x: mx.array) -> mx.array:
    if x.dtype != mx.float32:
        return super(type(self), self).__call__(x)
    return self.down_proj(fused_ops.kernel().swiglu_split(self.fused_gate_up(x)))


_swap = CallSwap(_fused_call, "_omlx_fused_mlp", __name__)


def fuse_mlps(model: nn.Module) -> int:
    """Swap the model's SwiGLU MLPs whose gate / up run as one packed call.  Returns how many."""
    module = fused_ops.kernel()
    if module is None or not hasattr(module, "swiglu_split"):
        return 0
    known = _known_layers()
    swapped = 0
    for _, layer in model.named_modules():
        if type(layer) not in known:
            continue
        fused = layer.get("fused_gate_up")
        if not isinstance(fused, (PackedLinear, QuantBf16Linear)):
            continue
        widths = {getattr(layer.get(name), "out_features", None) for name in ("gate_proj", "up_proj")}
        if widths != {fused.out_features // 2} or fused.out_features % 2:
            continue  # gate columns first, then up, of one width: what swiglu_split reads
        layer.__class__ = _swap.subclass(type(layer))
        swapped += 1
    return swapped


def is_fused_mlp(model: nn.Module) -> bool:
    return any(_swap.swapped(m) for _, m in model.named_modules())
