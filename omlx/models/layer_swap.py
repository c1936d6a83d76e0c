"""Swapping a module's layers for packed ones, checked by a forward pass, and widening the rest.

LLMs (omlx/models/packed_weights.py) and encoders (omlx/models/packed_encoders.py) swap their
layers the same way: in place, evaluated layer by layer, put back as they were when a forward
pass fails (the model's own code may read a swapped layer's weight), and what was not swapped
widened from half precision to float32 so activations stay float32 between layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path, tree_unflatten

log = logging.getLogger("omlx.pool")


def swap_checked(module: nn.Module, originals: list, replacements: list, probe: Callable[[], object],
                 what: str) -> bool:
    """Put `replacements` ((name, layer) pairs) into `module`, then evaluate `probe()`; on any
    failure put `originals` back, log why (naming `what`: "model", "encoder") and return False."""
    module.update_modules(tree_unflatten(replacements))
    # Evaluate layer by layer so the transient dequantized / padded copies of one layer are
    # freed before the next is built.
    for _, layer in replacements:
        mx.eval(layer.parameters())
    try:
        mx.eval(probe())
    except Exception as exc:  # noqa: BLE001 - any failure: the module keeps its own layers
        module.update_modules(tree_unflatten(originals))
        log.warning("bf16 packing skipped: the %s fails with packed layers (%s: %s)", what, type(exc).__name__, exc)
        return False
    return True


def widen_unswapped(module: nn.Module, swapped: set[str]) -> None:
    """float16 / bfloat16 parameters of layers not in `swapped` (norms, biases, lookups)
    become float32; the swapped layers keep their own dtypes."""
    def widen(path: str, value: mx.array) -> mx.array:
        if path.rsplit(".", 1)[0] in swapped or value.dtype not in (mx.float16, mx.bfloat16):
            return value
        return value.astype(mx.float32)

    module.update(tree_map_with_path(widen, module.parameters()))
    mx.eval(module.parameters())
