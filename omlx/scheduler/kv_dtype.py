"""The dtype a model's KV pools store keys and values in.

By default a pool keeps what the model's attention layers produce (the probed layout's dtype),
with one exception: a float32 model whose linear layers run packed bf16 on this CPU
(omlx/kernels/linear.py) stores its KV in bf16.  Its numbers already pass through bf16 at
every linear layer, so bf16 keys and values keep its agreement with the float32 model (≥ 99%
teacher-forced top-1 on SmolLM2, tests/test_kv_bf16.py), while decode attention - bound by
the K/V bytes it reads once many sequences run - reads half of them and twice the tokens fit
the same `--kv-cache-gb` (bench/kv_dtype_bench.py has the numbers).  The float32 path
(`OMLX_MATMUL=float32`) keeps float32 pools, so its token-exact tests are untouched.

`kv_dtype` (the `--kv-dtype` flag, `OMLX_KV_DTYPE`, or a model setting) overrides: auto (the
rule above), float32, bfloat16 or float16.  With `--kv-bits` the packed values are what they
are; the dtype then decides the quantization scales and biases (and the float pool of
`--quantized-kv-start`).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from omlx.settings_values import KV_DTYPES as CHOICES

AUTO = "auto"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
assert set(CHOICES) == {AUTO, *DTYPES}


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def check_setting(setting: str | None) -> str:
    """The setting, lower-cased (None: auto); ValueError for a name that is none of CHOICES."""
    value = (setting or AUTO).strip().lower()
    if value not in CHOICES:
        raise ValueError(f"kv_dtype must be one of {', '.join(CHOICES)}, got {setting!r}")
    return value


def runs_packed_bf16(model: nn.Module) -> bool:
    """Whether the model's linear layers were swapped for packed bf16 ones at load (or for
    quantized-bf16 ones, which compute the same bits from the stored codes)."""
    from omlx.kernels.linear import PackedEmbedding, PackedLinear
    from omlx.kernels.quant_bf16 import QuantBf16Embedding, QuantBf16Linear

    bf16 = (PackedLinear, PackedEmbedding, QuantBf16Linear, QuantBf16Embedding)
    return any(isinstance(m, bf16) for _, m in model.named_modules())


def pool_layout(model: nn.Module, setting: str | None):
    """(the model's KV layout with the pools' dtype, why that dtype): what a pool over this
    model holds per token (omlx.scheduler.kv_cache.KVLayout.probe, then `choose_kv_dtype`)."""
    from .kv_cache import KVLayout

    probed = KVLayout.probe(model)
    dtype, reason = choose_kv_dtype(setting, model, probed.dtype)
    return dataclasses.replace(probed, dtype=dtype), reason


def choose_kv_dtype(setting: str | None, model: nn.Module, model_dtype: mx.Dtype) -> tuple[mx.Dtype, str]:
    """(the pools' dtype, why) for a model whose attention produces `model_dtype` keys."""
    value = check_setting(setting)
    if value != AUTO:
        return DTYPES[value], f"kv_dtype={value}"
    if model_dtype == mx.float32 and runs_packed_bf16(model):
        return mx.bfloat16, "the model's matmuls run packed bf16"
    return model_dtype, "the model's own dtype"
