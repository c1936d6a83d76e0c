"""A decoder layer's residual adds fused with the RMSNorms that read them: two nodes fewer a
layer and token-step.

mlx-lm's llama-style block is `h = x + attn(norm1(x)); out = h + mlp(norm2(h))`, and the next
layer starts with its own `norm1(out)` (the last one: the model's final norm).  Each add and
the norm after it are one node of omlx/kernels/cpu/fused_ops.cpp here, `add_rms_norm`, with
both the sum and the normed sum as outputs:

- `h, n2 = add_rms_norm(x, attn(...), norm2)`;
- `out, n1_next = add_rms_norm(h, mlp(n2), next layer's norm1)`; the block returns `out` and
  leaves `n1_next` beside it, and the next block (or the final norm) takes it when its input
  *is* that `out` (the same array object: mlx-lm's loop passes `h` from layer to layer
  untouched), computing its norm itself otherwise.

Bit-identical to the separate Add and OmlxRMSNorm nodes (one float add per element, then the
same row reduction), so it applies wherever the norms are `KernelRMSNorm` (the packed-bf16
path; the float32 path keeps MLX's own norm).  On a 30-layer model a decode step loses 60
nodes (SmolLM2: 417 -> 357), and every node costs the graph-building thread and MLX's stream thread a few
microseconds whatever its size.  The block's class becomes a subclass whose only difference is
`__call__`; parameters and their names are unchanged.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn

from omlx.kernels import fused_ops

from .call_swap import CallSwap, known_classes
from .kernel_norms import KernelRMSNorm

# mlx-lm decoder blocks whose __call__ is exactly
#   r = self.self_attn(self.input_layernorm(x), mask, cache); h = x + r
#   r = self.mlp(self.post_attention_layernorm(h)); return h + r
_BLOCKS = (
    ("mlx_lm.models.llama", "TransformerBlock"),
    ("mlx_lm.models.qwen2", "TransformerBlock"),
    ("mlx_lm.models.qwen3", "TransformerBlock"),
    ("mlx_lm.models.qwen3_moe", "Qwen3MoeDecoderLayer"),
    ("mlx_lm.models.phi3", "TransformerBlock"),
)

# The last block's sum and its normed form, waiting for the next block (per thread: a draft
# model's pass on another engine thread keeps its own).
_pending = threading.local()


def _fusable(x: mx.array, r: mx.array, norm) -> bool:
    return (isinstance(norm, KernelRMSNorm) and norm.weight.dtype == mx.float32 and x.dtype == mx.float32
            and r.dtype == mx.float32 and x.shape == r.shape)


def add_then_norm(x: mx.array, r: mx.array, norm) -> tuple[mx.array, mx.array]:
    """(x + r, norm(x + r)) in one node where it is bit-identical, else as two."""
    if _fusable(x, r, norm):
        return tuple(fused_ops.kernel().add_rms_norm(x, r, norm.weight, norm.eps))
    h = x + r
    return h, norm(h)


def normed_input(x: mx.array, norm, compute=None) -> mx.array:
    """`norm(x)` (or `compute(x)`), taken from the block before when it computed it beside `x`."""
    pending = getattr(_pending, "value", None)
    if pending is not None:
        _pending.value = None
        out, normed, by = pending
        if out is x and by is norm:
            return normed
    return (compute or norm)(x)


def _fused_block_call(self, x: mx.array, mask=None, cache=None) -> mx.array:
    r = self.self_attn(normed_input(x, self.input_layernorm), mask, cache)
    h, normed = add_then_norm(x, r, self.post_attention_layernorm)
    r = self.mlp(normed)
    following = self._omlx_next_norm
    if following is None:
        return h + r
    out, normed_next = add_then_norm(h, r, following)
    _pending.value = (out, normed_next, following)
    return out


class PendingRMSNorm(KernelRMSNorm):
    """The model's final norm: takes the last block's normed sum when handed that sum."""

    def __call__(self, x: mx.array) -> mx.array:
        return normed_input(x, self, lambda v: KernelRMSNorm.__call__(self, v))


_swap = CallSwap(_fused_block_call, "_omlx_fused_residual", __name__)


def fuse_residual_norms(model: nn.Module) -> int:
    """Swap the model's llama-style blocks (consecutive, with kernel norms) for the fused
    form; returns how many.  Each block learns the norm that reads its output: the next
    block's input norm, or the model's final norm."""
    if fused_ops.kernel() is None or not hasattr(fused_ops.kernel(), "add_rms_norm"):
        return 0
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    final = getattr(body, "norm", None)
    if not isinstance(layers, list) or not layers:
        return 0
    known = known_classes(_BLOCKS)
    blocks = [layer for layer in layers if type(layer) in known or _swap.swapped(layer)]
    if len(blocks) != len(layers) or not all(
            isinstance(b.input_layernorm, KernelRMSNorm) and isinstance(b.post_attention_layernorm, KernelRMSNorm)
            for b in blocks):
        return 0
    if type(final) is KernelRMSNorm:
        final.__class__ = PendingRMSNorm
    for block, following in zip(blocks, blocks[1:] + [None]):
        nxt = following.input_layernorm if following is not None else final
        if not isinstance(nxt, KernelRMSNorm):
            nxt = None
        object.__setattr__(block, "_omlx_next_norm", nxt)
        if not _swap.swapped(block):
            block.__class__ = _swap.subclass(type(block))
    return len(blocks)
