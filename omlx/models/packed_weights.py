"""A model's weights packed bf16 at load, on CPUs with a bf16 dot-product unit.

Where `omlx.kernels.linear.matmul_path()` chose the packed bf16 path, every `nn.Linear` and
`nn.QuantizedLinear` of a loaded model becomes a `PackedLinear`, and every `nn.Embedding` /
`nn.QuantizedEmbedding` a `PackedEmbedding` (its lookup and its `as_linear`, the tied LM
head, share one packed copy), and every MoE expert layer (mlx-lm's `SwitchLinear` /
`QuantizedSwitchLinear`) a `PackedSwitchLinear` (omlx/kernels/expert_linear.py: faster than
float32 gather_mm at 1 and 32 rows, bench/expert_linear_bench.py), swapped in place the way
`nn.quantize` swaps layers: mlx-lm's model code is unchanged.  bf16 checkpoints are packed
without widening; float16 / float32 weights and 4- / 8-bit ones (dequantized first) are
rounded to bf16 once.  The remaining small parameters (norms, routers' biases) are widened to
float32 as on the float32 path, so activations stay float32 between layers.  Resident weight bytes are the
packed bytes: about half of the float32 path's.

The per-model setting `dequantize` keeps its meaning: false keeps the weights as stored;
true, or unset for a model that is not quantized (or that the float32 path would have
dequantized), runs it in packed bf16 instead of float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from omlx.kernels.expert_linear import PackedSwitchLinear, switch_linear_types
from omlx.kernels.linear import PackedEmbedding, PackedLinear, matmul_path
from omlx.models.fused_projections import fuse_projections
from omlx.models.kernel_norms import swap_rms_norms
from omlx.models.layer_swap import swap_checked, widen_unswapped
from omlx.models.shared_rope import share_rope_tables

log = logging.getLogger("omlx.pool")

LINEARS = (nn.Linear, nn.QuantizedLinear)
EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


def should_pack(model: nn.Module, setting: bool | None, dequantize: bool) -> bool:
    """Whether this model runs packed bf16: the path is chosen, the setting does not keep
    the weights as stored, and quantized layers would have been dequantized anyway."""
    if not matmul_path().bf16 or setting is False:
        return False
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    return dequantize or not quantized


def pack_model(model: nn.Module, experts: bool = True,
               keep_quantized: Callable[[nn.Module], nn.Module | None] | None = None) -> int:
    """Swap the model's linear, embedding and (with `experts`; bench/expert_linear_bench.py
    turns it off to measure the form before) MoE expert layers for packed bf16 ones, in
    place; widen what is left to float32.  `keep_quantized` (the quantized-bf16 form,
    omlx/models/quantized_bf16.py) may give a layer its own replacement first, left unwidened.
    Returns the number of layers swapped: 0 when the model's own code reads a swapped layer's
    weight directly (a forward pass fails), after putting its layers back as they were."""
    originals, replacements = [], []
    switches = switch_linear_types() if experts else ()
    for name, module in model.named_modules():
        kept = keep_quantized(module) if keep_quantized is not None else None
        if kept is not None:
            originals.append((name, module))
            replacements.append((name, kept))
        # Exact types only: subclasses (LoRA / DoRA wrappers, custom heads) may read .weight.
        elif type(module) in LINEARS:
            originals.append((name, module))
            replacements.append((name, PackedLinear.from_linear(module)))
        elif type(module) in EMBEDDINGS:
            originals.append((name, module))
            replacements.append((name, PackedEmbedding.from_embedding(module)))
        elif type(module) in switches:
            originals.append((name, module))
            replacements.append((name, PackedSwitchLinear.from_switch(module)))
    probe = lambda: model(mx.array([[1, 2]]))  # noqa: E731 - a forward pass of two tokens
    if not replacements or not swap_checked(model, originals, replacements, probe, "model"):
        return 0
    del originals
    widen_unswapped(model, {name for name, _ in replacements})
    # Fewer graph nodes a token: q/k/v and gate/up of one input in one kernel call each
    # (omlx/models/fused_projections.py), RoPE's table once a pass and its rotation one node
    # (omlx/models/shared_rope.py), RMSNorm one node (omlx/models/kernel_norms.py).
    fuse_projections(model)
    share_rope_tables(model)
    swap_rms_norms(model)
    log.debug("packed %d layer(s) in bf16", len(replacements))
    return len(replacements)


def is_packed(model: nn.Module) -> bool:
    """Whether any of the model's layers computes in packed bf16."""
    return any(isinstance(m, (PackedLinear, PackedEmbedding, PackedSwitchLinear)) for _, m in model.named_modules())


def prepare(model: nn.Module, setting: bool | None, dequantize: bool) -> bool:
    """The load hook: pack the model when it should run packed bf16 (True if it was)."""
    if not should_pack(model, setting, dequantize):
        return False
    return pack_model(model) > 0
