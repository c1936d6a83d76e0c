"""Sibling projections of one input computed by one packed-bf16 call.

mlx-lm's attention computes `self.q_proj(x), self.k_proj(x), self.v_proj(x)` and its MLP
`self.gate_proj(x)` and `self.up_proj(x)`: three (two) kernel calls over the same rows, each
a graph node, a dispatch and a wake-up of the OpenMP pool, paid ~30 layers x every token.
After packing (omlx/models/packed_weights.py), each such group's weights are concatenated
into one `PackedLinear` held by the parent module (`fused_qkv`, `fused_gate_up`), and the
siblings become `ProjectionSlice`s: the first one called with an input runs the fused call,
the others take their columns of that result.  mlx-lm's model code is unchanged.

Results are bit-identical to the separate calls: the packed kernel computes every output
column by the same instruction sequence whatever the other columns are (omlx/kernels/cpu/
linear_bf16.cpp), and the bf16 weights are copied, not re-rounded.

An input is matched by identity (`is`), so a slice called with another array recomputes
rather than returning stale columns; the fused result is dropped once every slice has taken
its part, so nothing outlives the pass.  A group whose siblings turn out not to share their
input in the model's forward pass (checked once, with a probe) is put back as it was.
"""

from __future__ import annotations

import logging
import threading

import mlx.core as mx
import mlx.nn as nn

from omlx.kernels.linear import PackedLinear, unpack_rows
from omlx.kernels.quant_bf16 import QuantBf16Linear

log = logging.getLogger("omlx.pool")

# (name of the fused layer on the parent, the sibling projections it replaces)
GROUPS = (
    ("fused_qkv", ("q_proj", "k_proj", "v_proj")),
    ("fused_gate_up", ("gate_proj", "up_proj")),
)


_ALL = slice(None)


class FusedCall:
    """The shared state of one group: the fused layer, where each part's columns are, and
    the last input's result until every part has taken its columns (per thread: two engines
    sharing a model never see each other's rows)."""

    def __init__(self, fused: PackedLinear, widths: list[int]):
        self.fused = fused
        self.bounds = []
        start = 0
        for width in widths:
            self.bounds.append((start, start + width))
            start += width
        self.local = threading.local()
        self.calls = 0
        self.computes = 0

    def part(self, x: mx.array, index: int) -> mx.array:
        self.calls += 1
        last = getattr(self.local, "last", None)
        if last is None or last[0] is not x or index in last[2]:
            self.computes += 1
            last = (x, self.fused(x), set())
            self.local.last = last
        taken = last[2]
        taken.add(index)
        if len(taken) == len(self.bounds):
            self.local.last = None  # every part has its columns: hold nothing past the pass
        lo, hi = self.bounds[index]
        out = last[1]
        # Full slices spelled out: MLX parses an Ellipsis index ~3x slower (microseconds a call).
        return out[(_ALL,) * (out.ndim - 1) + (slice(lo, hi),)]

    def forget(self) -> None:
        self.local.last = None


class ProjectionSlice(nn.Module):
    """Stands where one sibling projection was: its columns of the group's fused call.  It
    owns no parameters (the parent's fused layer holds them, counted once)."""

    def __init__(self, call: FusedCall, index: int, original: PackedLinear):
        super().__init__()
        object.__setattr__(self, "_call", call)  # not a child: the weights belong to the parent
        object.__setattr__(self, "_original", original)  # to put back if the probe refuses
        self.index = index
        self.out_features = original.out_features
        self.in_features = original.in_features

    def _extra_repr(self) -> str:
        return f"columns {self._call.bounds[self.index]} of the fused call"

    def __call__(self, x: mx.array) -> mx.array:
        return self._call.part(x, self.index)


def dense_bf16(layer: PackedLinear) -> mx.array:
    """The (N, K) bf16 weights a packed layer holds (the exact bf16 values, no rounding)."""
    return unpack_rows(layer.weight, mx.arange(layer.out_features), layer.in_features)


def fuse_group(parts: list[PackedLinear]) -> PackedLinear:
    """One packed layer whose output columns are the parts' outputs, side by side."""
    if type(parts[0]) is QuantBf16Linear:  # the quantized-bf16 form: its panels, joined as stored
        return QuantBf16Linear.concatenate(parts)
    weight = mx.concatenate([dense_bf16(p) for p in parts], axis=0)
    biases = [p.get("bias") for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = mx.concatenate([b if b is not None else mx.zeros((p.out_features,), mx.float32)
                               for b, p in zip(biases, parts)])
    fused = PackedLinear(weight, bias)
    mx.eval(fused.parameters())
    return fused


def candidate_groups(model: nn.Module):
    """(parent, fused name, sibling names) for every group of packed siblings of one width."""
    for _, parent in model.named_modules():
        for fused_name, names in GROUPS:
            parts = [parent.get(n) if isinstance(parent, dict) else None for n in names]
            if not (all(type(p) is PackedLinear for p in parts) or QuantBf16Linear.can_concatenate(parts)):
                continue
            if len({p.in_features for p in parts}) != 1 or fused_name in parent:
                continue
            yield parent, fused_name, names


def fuse_projections(model: nn.Module) -> int:
    """Fuse the model's sibling projections in place; returns how many groups were fused.
    A forward pass checks the result: groups whose siblings did not share one input are put
    back, and any change in the logits puts every group back."""
    probe = mx.array([[1, 2, 3]])
    groups = list(candidate_groups(model))
    if not groups:
        return 0
    try:
        before = model(probe)
        mx.eval(before)
    except Exception:  # noqa: BLE001 - a model the probe cannot run is left alone
        return 0
    applied = []
    for parent, fused_name, names in groups:
        parts = [parent[n] for n in names]
        call = FusedCall(fuse_group(parts), [p.out_features for p in parts])
        parent[fused_name] = call.fused
        for index, (name, part) in enumerate(zip(names, parts)):
            parent[name] = ProjectionSlice(call, index, part)
        applied.append((parent, fused_name, names, call))
    try:
        after = model(probe)
        mx.eval(after)
        same = after.shape == before.shape and mx.array_equal(after, before).item()
    except Exception as exc:  # noqa: BLE001
        log.warning("projection fusion skipped: the model fails with fused projections (%s: %s)",
                    type(exc).__name__, exc)
        same = False
    kept = 0
    for parent, fused_name, names, call in applied:
        call.forget()
        # Each sibling ran once per layer call; a group that had to recompute saw different inputs.
        if same and call.computes * len(names) == call.calls:
            kept += 1
            continue
        for name in names:
            parent[name] = parent[name]._original
        del parent[fused_name]
    if kept:
        for parent, _, names, _ in applied:
            for name in names:
                if isinstance(parent[name], ProjectionSlice):
                    object.__setattr__(parent[name], "_original", None)  # free the separate copies
    log.debug("fused %d projection group(s) of %d", kept, len(applied))
    return kept


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, ProjectionSlice) for _, m in model.named_modules())


