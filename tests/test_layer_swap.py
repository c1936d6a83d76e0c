"""omlx/models/layer_swap.py: layers swapped in only when a forward pass still runs, and the
rest widened to float32."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from omlx.models.layer_swap import swap_checked, widen_unswapped


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.RMSNorm(8)

    def __call__(self, x):
        return self.norm(self.proj(x))


class Doubled(nn.Module):
    """A replacement layer: the original's weight, its output doubled (so it is seen)."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        return 2 * self.inner(x)


def test_a_probe_that_runs_keeps_the_new_layers():
    tower = Tower()
    original = tower.proj
    replacements = [("proj", Doubled(original))]
    assert swap_checked(tower, [("proj", original)], replacements, lambda: tower(mx.ones((1, 8))), "encoder")
    assert type(tower.proj) is Doubled


def test_a_failing_probe_puts_the_layers_back_and_logs_why(caplog):
    tower = Tower()
    original = tower.proj

    def probe():
        raise ValueError("reads .weight itself")

    with caplog.at_level("WARNING", logger="omlx.pool"):
        assert not swap_checked(tower, [("proj", original)], [("proj", Doubled(original))], probe, "encoder")
    assert tower.proj is original
    assert "the encoder fails with packed layers (ValueError: reads .weight itself)" in caplog.text


def test_only_the_unswapped_half_precision_parameters_widen():
    tower = Tower()
    tower.set_dtype(mx.bfloat16)
    widen_unswapped(tower, {"proj"})
    assert tower.proj.weight.dtype == mx.bfloat16 and tower.proj.bias.dtype == mx.bfloat16
    assert tower.norm.weight.dtype == mx.float32
