"""RMSNorm as one graph node on the packed-bf16 path.

`mx.fast.rms_norm` on the CPU is MLX's fallback graph (square, mean, add, rsqrt, two
multiplies: ~7 nodes a call, 61 calls a token on a 30-layer model).  `KernelRMSNorm` stands in
for `nn.RMSNorm` (swapped at load, exact type only; mlx-lm's model code unchanged) and runs
omlx/kernels/cpu/fused_ops.cpp's `rms_norm`: one node, each row reduced by the same
instructions whatever the batch holds.  Its summation order differs from MLX's, so its last
bits do too: it is swapped in only where the weights are packed bf16, the path whose contract
is batch invariance (the float32 path stays token-exact with mlx-lm on MLX's own ops).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from omlx.kernels import fused_ops


class KernelRMSNorm(nn.Module):
    def __init__(self, weight: mx.array, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, one node"

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32 and self.weight.dtype == mx.float32:
            return fused_ops.kernel().rms_norm(x, self.weight, self.eps)
        return mx.fast.rms_norm(x, self.weight, self.eps)


def swap_rms_norms(model: nn.Module) -> int:
    """Swap the model's `nn.RMSNorm` layers (exact type) for `KernelRMSNorm` where the kernel
    is built; returns how many."""
    if fused_ops.kernel() is None:
        return 0
    swapped = 0
    for _, parent in model.named_modules():
        for name, child in list(parent.children().items()):
            if type(child) is nn.RMSNorm:
                parent[name] = KernelRMSNorm(child.weight, child.eps)
                swapped += 1
    return swapped
