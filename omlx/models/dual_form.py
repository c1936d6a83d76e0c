"""A quantized model holding its weights twice, each call reading the copy fastest for its rows.

The "bf16-packed+quantized-decode" weight form (omlx/models/weight_form.py).  The quantized-bf16
kernel (omlx/kernels/quant_bf16.py) computes bit-identical results to packed bf16 from the
stored 4- / 8-bit codes: it reads a quarter of the bytes but unpacks every weight, so it wins
where bytes bound the call (a decode step of a few rows) and loses where the dot products do
(many rows: prefill, a busy batch).  Because the two agree to the bit, a layer may hold both and
pick per call by its row count without a row's result depending on its batch (the invariant
that rules out mixing forms that round differently).  The pick happens inside the kernel, at
evaluation, from the rows the call has (quant_bf16.cpp), so one graph serves every step.

The model is put in the quantized-bf16 form first (quantized_bf16.swap_model: sibling
projections fused, the tied embedding / LM head held once), then every quantized-bf16 layer
also packs its own weights (`HoldsPacked.hold_packed`): fused q/k/v and gate/up layers pack
their joined panels, the tied head once.  Resident bytes are both copies (~2.6 bytes a weight
for 4-bit groups of 32), counted by the memory ledger as the layers' parameters.

When: auto (no `dequantize` setting), a CPU with the bf16 unit where the kernel runs, a model
with layers the kernel takes, and small enough that it would have been dequantized (packed
bf16 alone): cpu_weights.should_dequantize bounds its float32 bytes by min(2 GiB, a quarter of
the budget), and both copies together take at most 0.65x those bytes.  `OMLX_DECODE_ROWS`
(default DECODE_ROWS, measured by bench/quant_bf16_decode_bench.py) is the most rows a call
sends to the stored codes; 0 turns the dual form off (the model runs packed bf16 alone).
"""

from __future__ import annotations

import logging
import os

import mlx.nn as nn

from omlx.kernels.quant_bf16 import HoldsPacked

from . import packed_weights, quantized_bf16

log = logging.getLogger("omlx.pool")

ENV = "OMLX_DECODE_ROWS"
# Calls of up to this many rows read the stored codes (bench/README.md, "One stream reads the
# stored 4-bit bytes": quantized-bf16 per call against packed bf16 at SmolLM2's shapes).
DECODE_ROWS = 2


def decode_rows() -> int:
    """The most rows a call sends to the stored codes (0: the dual form is off)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DECODE_ROWS
    try:
        rows = int(raw)
    except ValueError:
        log.warning("%s=%r is not a row count; using %d", ENV, raw, DECODE_ROWS)
        return DECODE_ROWS
    return max(rows, 0)


def should_hold_both(model: nn.Module, setting: bool | None, dequantize: bool) -> bool:
    """Whether this model runs in the dual form: auto, the packed bf16 form would be chosen
    for it (a quantized model small enough to dequantize), and the quantized-bf16 kernel runs
    here and takes some of its layers."""
    return (setting is None and decode_rows() > 0 and packed_weights.should_pack(model, setting, dequantize)
            and quantized_bf16.available() and quantized_bf16.has_supported_layers(model))


def convert(model: nn.Module, rows: int | None = None) -> int:
    """Put the model in the dual form in place; returns how many layers hold both copies (0:
    the model is untouched, the quantized-bf16 swap having refused it)."""
    rows = decode_rows() if rows is None else rows
    if rows < 1 or quantized_bf16.swap_model(model) == 0:
        return 0
    held = 0
    for _, module in model.named_modules():
        if isinstance(module, HoldsPacked):
            module.hold_packed(rows + 1)
            held += 1
    log.debug("dual form: %d layer(s) hold packed bf16 beside their codes (codes up to %d rows)", held, rows)
    return held


def is_dual(model: nn.Module) -> bool:
    return any(isinstance(m, HoldsPacked) and m.packed_from_rows for _, m in model.named_modules())


def codes_rows(model: nn.Module) -> int | None:
    """The most rows a call of every dual layer runs on the stored codes (None: no dual layer)."""
    rows = [m.packed_from_rows for _, m in model.named_modules() if isinstance(m, HoldsPacked) and m.packed_from_rows]
    return min(rows) - 1 if rows else None
