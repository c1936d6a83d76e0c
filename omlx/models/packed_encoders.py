"""Encoders' linear layers packed bf16 at load: embedding models, cross-encoder rerankers and
vision towers, on CPUs where `omlx.kernels.linear.matmul_path()` chose the packed path.

The same kernel as the LLMs' (omlx/kernels/linear.py), swapped in the same way (exact
`nn.Linear` types only: subclasses may read `.weight`), with what differs for encoders:
  - only the linear layers: an encoder's token / position embeddings are lookups its own code
    often slices (`position_embedding.weight[:n]`), and no LM head shares them;
  - the probe that checks the swapped model still runs is the caller's (an encoder's forward
    takes its own inputs), and a failure puts the layers back;
  - what is left is widened to float32 only where the encoder ran in half precision, so a
    bf16 checkpoint's tower no longer runs MLX's (BLAS-less) bf16 matmuls on the CPU.

bench/encoder_bf16_bench.py measured which encoders gain (numbers in bench/README.md);
`pack_encoder` is called for those by their loaders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.nn as nn

from omlx.kernels.linear import PackedLinear, matmul_path
from omlx.models.layer_swap import swap_checked, widen_unswapped

log = logging.getLogger("omlx.pool")


def should_pack_encoder(model: nn.Module, setting: bool | None = None) -> bool:
    """The packed path is chosen here, the model has linear layers, and its `dequantize`
    setting does not keep the weights as stored (false); unset packs quantized encoders too,
    as it does quantized LLMs on a CPU with a bf16 unit (omlx/models/weight_form.py)."""
    if not matmul_path().bf16 or setting is False:
        return False
    return any(type(m) in (nn.Linear, nn.QuantizedLinear) for _, m in model.named_modules())


def pack_encoder(module: nn.Module, probe: Callable[[], object]) -> int:
    """Swap `module`'s `nn.Linear` / `nn.QuantizedLinear` layers for packed bf16 ones, in place,
    then run `probe()` (a forward pass of the encoder, evaluated here); if it fails the layers
    go back as they were and 0 is returned, else the number swapped."""
    originals, replacements = [], []
    for name, layer in module.named_modules():
        if type(layer) in (nn.Linear, nn.QuantizedLinear):
            originals.append((name, layer))
            replacements.append((name, PackedLinear.from_linear(layer)))
    if not replacements or not swap_checked(module, originals, replacements, probe, "encoder"):
        return 0
    del originals
    widen_unswapped(module, {name for name, _ in replacements})
    log.debug("packed %d encoder layer(s) in bf16", len(replacements))
    return len(replacements)
