"""MoE expert layers with every expert's weights packed bf16 for the CPU's bf16 unit.

mlx-lm's MoE blocks (`SwitchGLU` / `SwitchMLP`) call a `SwitchLinear` or
`QuantizedSwitchLinear` per projection: `mx.gather_mm(x, W.T, rhs_indices=indices)`, each
token's row multiplied by the weights of the experts its router chose.  `PackedSwitchLinear`
is the drop-in that omlx/models/packed_weights.py swaps in at load on the packed bf16 path:
all experts packed once, in the layout of omlx/kernels/linear.py, and one call of the
extension's `expert_linear` per projection, which groups the step's rows by expert where the
router's choices are known (inside the kernel's task, so the graph needs no host sync) and
streams each chosen expert's weights once for all its rows.

A row's result is computed by the same instruction sequence as a one-row packed linear call:
it equals a float32 reference on the same bf16-rounded operands to accumulation tolerance,
and does not depend on the other rows of the step (tests/test_packed_experts.py).
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .linear import kernel, pack_bf16


def switch_linear_types() -> tuple[type, ...]:
    """The expert layer classes of mlx-lm and mlx-vlm (whose copy has the same interface),
    of those already imported: a model built from one has imported it, and importing the
    other would cost a second or more for nothing."""
    found: list[type] = []
    for name in ("mlx_lm.models.switch_layers", "mlx_vlm.models.switch_layers"):
        module = sys.modules.get(name)
        if module is not None:
            found += [module.SwitchLinear, module.QuantizedSwitchLinear]
    return tuple(found)


def expert_weights(layer: nn.Module) -> mx.array:
    """A SwitchLinear's (E, N, K) weights as stored; a QuantizedSwitchLinear's dequantized
    (scales widened first, so the affine map is computed in float32 before the one bf16
    rounding), expert by expert so the float32 copy of one expert is all that is transient."""
    if "scales" not in layer:
        return layer.weight
    biases = layer.get("biases")
    global_scale = getattr(layer, "global_scale", None)
    experts = []
    for e in range(layer.weight.shape[0]):
        experts.append(mx.dequantize(
            layer.weight[e], layer.scales[e].astype(mx.float32),
            None if biases is None else biases[e].astype(mx.float32),
            group_size=layer.group_size, bits=layer.bits, mode=getattr(layer, "mode", "affine"),
            global_scale=None if global_scale is None else global_scale[e]).astype(mx.bfloat16))
    return mx.stack(experts)


def pack_experts(weights: mx.array) -> mx.array:
    """(E, N, K) -> (E, N_pad / 64, K_pad / 2, 128) bf16: each expert in pack_bf16's layout."""
    return mx.stack([pack_bf16(weights[e]) for e in range(weights.shape[0])])


def expert_linear(x: mx.array, indices: mx.array, packed: mx.array, bias: mx.array | None,
                  out_features: int, in_features: int = -1) -> mx.array:
    """gather_mm(x, W.T, rhs_indices=indices) (+ bias[indices]) with W packed by pack_experts:
    x (..., M, K) float, indices broadcastable with x's batch axes -> (batch..., M, N) float32.

    mlx-lm's layers call it in one of two forms, both passed to the kernel as they are (a
    decode step makes hundreds of these calls; each extra graph node costs microseconds): a
    token's row expanded over its top-k (x (..., 1, 1, K), indices (..., k): output row r
    reads x row r // k), or one row per output row (x (..., 1, K) matching indices)."""
    lead, m = x.shape[:-2], x.shape[-2]
    if m == 1 and len(lead) == indices.ndim and (
            lead == indices.shape or (lead[:-1] == indices.shape[:-1] and lead[-1] == 1)):
        return kernel().expert_linear(x, indices, packed, bias, out_features=out_features,
                                      in_features=in_features, row_axis=True)
    # Any other broadcast (not made by mlx-lm's layers): one materialized x row per output row.
    batch = tuple(np.broadcast_shapes(lead, indices.shape))
    rows = mx.broadcast_to(x, batch + (m, x.shape[-1]))
    experts = mx.broadcast_to(mx.expand_dims(indices, -1), batch + (m,))
    return kernel().expert_linear(rows, experts, packed, bias, out_features=out_features, in_features=in_features)


class PackedSwitchLinear(nn.Module):
    """`SwitchLinear` / `QuantizedSwitchLinear` with every expert packed bf16."""

    def __init__(self, weights: mx.array, bias: mx.array | None = None):
        super().__init__()
        # Plain int attributes (not parameters), named as SwitchLinear's properties.
        self.num_experts, self.output_dims, self.input_dims = weights.shape
        self.weight = pack_experts(weights)
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        self.freeze()

    @classmethod
    def from_switch(cls, layer: nn.Module) -> "PackedSwitchLinear":
        return cls(expert_weights(layer), layer.get("bias") if "bias" in layer else None)

    def _extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, num_experts={self.num_experts}, "
                f"bias={'bias' in self}, bf16 packed")

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # sorted_indices is a hint for gather_mm; the kernel groups rows by expert itself.
        return expert_linear(x, indices, self["weight"], self.get("bias"), self.output_dims, self.input_dims)
