"""How a quantized or half-precision model's weights are held when it runs on the CPU.

On the CPU MLX's float32 matmul goes through BLAS (OpenBLAS, see omlx.blas), while
quantized matmul and float16 / bfloat16 matmul run MLX's own unblocked loops.  So a small
4-bit model decodes faster dequantized to float32 (bench/cpu_dequant_bench.py: SmolLM2-135M
Q4_1 at 1 stream, results in bench/README.md), at 8x the weight memory of 4 bits.

The per-model setting `dequantize`: true runs the model in float32 (quantized layers
dequantized, half-precision weights widened), false keeps the weights as stored, unset
(the default) decides by backend and size: float32 on the CPU when the float32 weights stay
under AUTO_MAX_BYTES and a quarter of the memory budget, as stored everywhere else (on
Metal and CUDA quantized kernels are the fast path).  On a CPU with a bf16 dot-product unit
the same decision packs the weights in bf16 instead of widening them to float32
(omlx/models/packed_weights.py): half the bytes, and faster.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

log = logging.getLogger("omlx.pool")

# Past this the 8x memory of float32 over 4-bit weights costs more than MLX's slower CPU
# quantized matmul does: decode becomes bandwidth-bound and the budget fills up.
AUTO_MAX_BYTES = 2 << 30


def on_cpu() -> bool:
    try:
        return mx.default_device().type == mx.DeviceType.cpu
    except Exception:  # an MLX build without a device query: assume the accelerator
        return False


def float32_bytes(model: nn.Module) -> int:
    """The model's weights in float32 (packed quantized values counted unpacked)."""
    total = 0
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += module.weight.size * 32 // module.bits * 4
            if getattr(module, "bias", None) is not None:
                total += module.bias.size * 4
    quantized = {name for name, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    for name, value in tree_flatten(model.parameters()):
        if name.rsplit(".", 1)[0] not in quantized:
            total += value.size * 4
    return total


def should_dequantize(setting: bool | None, model: nn.Module, memory_budget: int) -> bool:
    if setting is not None:
        return bool(setting)
    if not on_cpu() or not _has_reduced_precision(model):
        return False
    return float32_bytes(model) <= min(AUTO_MAX_BYTES, memory_budget // 4)


def _has_reduced_precision(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()) \
        or any(v.dtype in (mx.float16, mx.bfloat16) for _, v in tree_flatten(model.parameters()))


def to_float32(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float32 ones and widen half-precision weights, in place."""
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            replacements.append((name, _dense_linear(module)))
        elif isinstance(module, nn.QuantizedEmbedding):
            replacements.append((name, _dense_embedding(module)))
    if replacements:
        model.update_modules(_nest(replacements))
    model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v,
                          model.parameters()))
    mx.eval(model.parameters())
    log.debug("dequantized %d layer(s) to float32", len(replacements))
    return model


def _dense(module) -> mx.array:
    # Scales and biases widened first, so w = scale * q + bias is computed in float32.
    return mx.dequantize(module.weight, module.scales.astype(mx.float32),
                         None if module.biases is None else module.biases.astype(mx.float32),
                         group_size=module.group_size, bits=module.bits, mode=module.mode)


def _dense_linear(module: nn.QuantizedLinear) -> nn.Linear:
    out_dims, _ = module.weight.shape
    weight = _dense(module)
    has_bias = "bias" in module
    linear = nn.Linear(weight.shape[1], out_dims, bias=has_bias)
    linear.weight = weight
    if has_bias:
        linear.bias = module.bias.astype(mx.float32)
    return linear


def _dense_embedding(module: nn.QuantizedEmbedding) -> nn.Embedding:
    weight = _dense(module)
    embedding = nn.Embedding(weight.shape[0], weight.shape[1])
    embedding.weight = weight
    return embedding


def _nest(flat: list[tuple[str, nn.Module]]) -> dict:
    """[("model.layers.0.mlp.up_proj", m)] -> {"model": {"layers": [{"mlp": {...}}]}} as
    Module.update_modules expects (lists for numbered children)."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(flat)
