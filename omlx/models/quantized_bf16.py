"""A quantized model's weights held as stored and computed in bf16, on CPUs with AVX512-BF16.

The "quantized-bf16" weight form (omlx/models/weight_form.py): every supported 4- / 8-bit
layer (`nn.QuantizedLinear`, `nn.QuantizedEmbedding` with its tied LM head) becomes a
`QuantBf16Linear` / `QuantBf16Embedding` (omlx/kernels/quant_bf16.py) that keeps its codes,
scales and biases and unpacks them to bf16 inside the kernel; everything else is packed bf16
exactly as the bf16-packed form packs it (float layers, MoE experts, quantized layers the
kernel does not take) and the small parameters are widened to float32.  The model then
computes the same bits as the bf16-packed form of the same checkpoint, with about the resident
weight bytes of the stored checkpoint (omlx/models/dual_form.py adds the packed copy beside).
"""

from __future__ import annotations

import mlx.nn as nn

from omlx.kernels import quant_bf16
from omlx.kernels.quant_bf16 import QuantBf16Embedding, QuantBf16Linear

from . import packed_weights


def available() -> bool:
    """Whether the kernel runs here and the packed bf16 path (which it matches) is chosen."""
    from omlx.kernels.linear import matmul_path

    return matmul_path().bf16 and quant_bf16.availability().ok


def has_supported_layers(model: nn.Module) -> bool:
    return any(quant_bf16.supports(m) for _, m in model.named_modules())


def convert(layer: nn.Module) -> nn.Module | None:
    """A supported quantized layer in the quantized-bf16 form; None for any other layer."""
    if not quant_bf16.supports(layer):
        return None
    if type(layer) is nn.QuantizedLinear:
        return QuantBf16Linear.from_quantized(layer)
    return QuantBf16Embedding.from_quantized(layer)


def swap_model(model: nn.Module) -> int:
    """Put the model in the quantized-bf16 form in place; returns how many of its layers read
    their quantized blocks (0, the model untouched, when a forward pass fails with swapped
    layers).  Sibling projections then run as one call each (pack_model fuses them)."""
    converted = []

    def count(layer: nn.Module) -> nn.Module | None:
        new = convert(layer)
        if new is not None:
            converted.append(new)
        return new

    if packed_weights.pack_model(model, keep_quantized=count) == 0:
        return 0
    return len(converted)


def is_quantized_bf16(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantBf16Linear, QuantBf16Embedding)) for _, m in model.named_modules())
