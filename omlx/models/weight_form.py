"""The form a loaded model's weights run in on this machine, chosen once at load.

Six forms, one per model (never two that round differently mixed by batch size: a row's
numbers would then depend on how many other rows share its step, and batching must not change
a request's tokens):

  bf16-packed      linear layers packed bf16 for the CPU's bf16 dot-product unit
                   (omlx/kernels/linear.py); half the bytes of float32
  quantized-bf16   4- / 8-bit layers held as stored, unpacked to bf16 inside the kernel
                   (omlx/kernels/quant_bf16.py): bit-identical to bf16-packed, with the
                   stored bytes (a quarter of bf16's for 4-bit)
  bf16-packed+quantized-decode
                   both of the above in each layer, picked per call by its rows (few: the
                   stored codes, many: packed bf16); they compute the same bits, so this mix
                   is batch-invariant (omlx/models/dual_form.py)
  quantized-kernel 4- / 8-bit layers read as stored by omlx's VNNI / AVX2 kernel
                   (omlx/kernels/quant_linear.py); a quarter of bf16's bytes
  float32          dequantized / widened, MLX's matmul through OpenBLAS (the old CPU path)
  stored           as loaded (MLX's own kernels: Metal, CUDA, or a setting that asks for it)

The per-model `dequantize` setting decides with the CPU:
  - unset (auto): a quantized model small enough to dequantize, on a CPU where the
    quantized-bf16 kernel runs, holds both bit-identical forms (bf16-packed+quantized-decode):
    decode steps of a few rows read the stored bytes, larger ones packed bf16
    (bench/README.md, "One stream reads the stored 4-bit bytes").  Before that form, and
    where it does not apply: what bench/weight_form_bench.py measured fastest for serving here.  On
    SmolLM2 Q4_1 (AMD EPYC, AVX512-BF16 + VNNI) packed bf16 won the 32-row decode step and
    prefill against the int8 quantized kernel, which won one stream; the server's workload
    is many streams, so a CPU with a bf16 unit runs a quantized model packed bf16 when it
    would have been dequantized (cpu_weights.should_dequantize: small enough).
    quantized-bf16 computes the same bits from the stored bytes but pays an in-kernel unpack
    (~11 vector ops per 32 weights): level with packed bf16 on one stream and prefill, 0.8-0.9x
    at 32 rows (compute-bound there), so it does not replace packed bf16; it does beat the
    int8 kernel at 32 rows and prefill (1.2-1.4x), so a quantized model too large to
    dequantize runs in quantized-bf16 on a bf16 CPU (resident bytes = stored bytes), and a
    CPU without the unit runs it through the int8 kernel (faster than float32 at every
    decode size measured).  bench/README.md, "Which form a 4-bit model runs in", has the runs.
  - true: dequantized (packed bf16 where the CPU has the unit, else float32).
  - false: the weights as stored, read by the quantized kernel where it runs here (MLX's
    own CPU quantized matmul is 8-20x slower), else by MLX.
`OMLX_MATMUL=float32` keeps the old float32 path for every model (the token-exact tests pin
it); `OMLX_QUANT_MATMUL=off` turns the quantized kernel off.
"""

from __future__ import annotations

import logging
import os

import mlx.nn as nn

from omlx.kernels import linear as linear_kernel
from omlx.kernels import quant_linear
from omlx.kernels.expert_linear import PackedSwitchLinear

from omlx.kernels import quant_bf16

from . import dual_form, packed_weights, quantized_bf16
from .cpu_weights import should_dequantize, to_float32
from .fused_mlp import fuse_mlps
from .fused_residual import fuse_residual_norms
from .ragged_attention import route_ragged_attention
from .shared_rope import share_rope_tables

log = logging.getLogger("omlx.pool")

BF16_PACKED = "bf16-packed"
DUAL = "bf16-packed+quantized-decode"
QUANTIZED_BF16 = "quantized-bf16"
QUANTIZED_KERNEL = "quantized-kernel"
FLOAT32 = "float32"
STORED = "stored"


def apply(model: nn.Module, setting: bool | None, memory_budget: int) -> str:
    """Put the model's weights in the form they run in here, in place; returns the form."""
    form = _apply(model, setting, memory_budget)
    # RoPE's cos / sin once a pass instead of per call: bit-identical to mx.fast.rope, so
    # every form takes it, the token-exact float32 path included (omlx/models/shared_rope.py).
    share_rope_tables(model)
    if form in (BF16_PACKED, DUAL, QUANTIZED_BF16):
        # llama-style attention in a ragged pass: a few nodes instead of ~33, bit-identical
        # (omlx/models/ragged_attention.py); needs the packed fused q/k/v and the shared rope.
        route_ragged_attention(model)
        fuse_mlps(model)  # SwiGLU over the fused gate / up call, two nodes (omlx/models/fused_mlp.py)
        fuse_residual_norms(model)  # each residual add and the norm after it, one node (fused_residual.py)
    return form


def _apply(model: nn.Module, setting: bool | None, memory_budget: int) -> str:
    dequantize = should_dequantize(setting, model, memory_budget)
    if dual_form.should_hold_both(model, setting, dequantize) and dual_form.convert(model) > 0:
        return DUAL
    if packed_weights.prepare(model, setting, dequantize):
        return BF16_PACKED
    if setting is None and quantized_bf16.available() and quantized_bf16.has_supported_layers(model):
        if quantized_bf16.swap_model(model) > 0:
            return QUANTIZED_BF16
    if setting is not True and _quantized(model) and _quantized_kernel_allowed():
        if quant_linear.swap_quantized_linears(model, widen_rest=True) > 0:
            return QUANTIZED_KERNEL
    if dequantize:
        to_float32(model)
        return FLOAT32
    return STORED


def runs_exactly(model: nn.Module) -> bool:
    """Whether the model's linear layers compute in float32 from float32 operands, so a
    ragged pass matches mlx-lm's to float32 rounding (the load-time self-check's bar)."""
    reduced = (linear_kernel.PackedLinear, linear_kernel.PackedEmbedding, PackedSwitchLinear,
               quant_linear.QuantLinear, quant_linear.QuantEmbedding,
               quant_bf16.QuantBf16Linear, quant_bf16.QuantBf16Embedding)
    return not any(isinstance(m, reduced) for _, m in model.named_modules())


def describe(form: str) -> str:
    return {
        BF16_PACKED: f"bf16 weights packed for this CPU ({linear_kernel.matmul_path().isa})",
        DUAL: (f"bf16 weights packed for this CPU, and the quantized weights as stored for calls of up to "
               f"{dual_form.decode_rows()} rows, computed in bf16 ({linear_kernel.matmul_path().isa})"),
        QUANTIZED_BF16: f"quantized weights held as stored, computed in bf16 ({linear_kernel.matmul_path().isa})",
        QUANTIZED_KERNEL: f"quantized weights read as stored ({quant_linear.availability().isa})",
        FLOAT32: "dequantized in float32 (model setting 'dequantize': false keeps the stored weights)",
        STORED: "weights as stored",
    }[form]


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def _quantized_kernel_allowed() -> bool:
    # OMLX_MATMUL=float32 asks for the old path for every model: the quantized kernel's
    # activations are rounded to ~15 bits, so it is not float32-exact either.
    return os.environ.get(linear_kernel.ENV, "auto").strip().lower() != "float32" \
        and quant_linear.availability().ok
