"""Load-time swaps of a layer's `__call__`: mlx-lm classes found by name, and per class a
subclass that differs only in `__call__` (parameters, their names and mlx-lm's model code stay
as they are).  Used by the fused MLP and the fused residual norms."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def known_classes(names: tuple[tuple[str, str], ...]) -> set[type]:
    """The classes of (module, class name) pairs that this mlx-lm has."""
    known = set()
    for module_name, class_name in names:
        try:
            known.add(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return known


class CallSwap:
    """Subclasses with `call` as their `__call__` and `marker` set to True, one per class."""

    def __init__(self, call: Callable, marker: str, module: str):
        self.call, self.marker, self.module = call, marker, module
        self._made: dict[type, type] = {}

    def subclass(self, cls: type) -> type:
        if cls not in self._made:
            self._made[cls] = type(cls.__name__, (cls,), {"__call__": self.call, "__module__": self.module,
                                                          self.marker: True})
        return self._made[cls]

    def swapped(self, layer) -> bool:
        return getattr(type(layer), self.marker, False)
