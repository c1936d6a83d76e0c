"""Recurrent and convolution state (mlx-lm's `ArraysCache` layers) in the batched engine.

Gated DeltaNet (Qwen3.5 / Qwen3-Next), Mamba-2 (Nemotron-H, Granite 4) and short convolutions
(LFM2) keep a fixed-size state per sequence instead of keys and values per token.  Here:

- `StatePool`: one slot per running sequence, the same slot in every state layer; each layer's
  state is a few arrays of shape `(slots, ...)`.  A step gathers its sequences' rows, the layer
  runs, and the new state is scattered back.
- `StateRouter`: state layers must see each sequence's new tokens in order, while the ragged
  pass gives the model one row per token (see runner).  The module that receives a state
  layer's cache (found by watching which module reads it, not from a list of names) gets a
  class whose `__call__` regroups the pass's rows: every decode row of the step together as
  one batch `(sequences, 1, hidden)`, each prefill chunk as `(1, tokens, hidden)`, each with a
  plain `ArraysCache` holding its sequences' state.  Calls with mlx-lm's own caches are untouched.
- `StateSnapshots`: the state at block boundaries every `interval` tokens, keyed by the prefix
  hash of the block ending there, so a request that resends a conversation resumes from the
  longest cached prefix that has a snapshot (the KV blocks alone do not give the state).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

from .layer_kinds import Kind, LayerKind, UnsupportedLayout


@dataclass(frozen=True)
class StateLayout:
    """Shape and dtype of each array of each state layer, for one sequence."""

    layers: tuple[tuple[tuple[tuple[int, ...], mx.Dtype], ...], ...]
    # Each layer's own cache class (mlx-lm's ArraysCache, or mlx-vlm's, whose layers call
    # methods of their own on it): a group's state is handed to the layer in one of these.
    classes: tuple[type, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_slot(self) -> int:
        return sum(int(np.prod(shape)) * dtype.size for layer in self.layers for shape, dtype in layer)


class StatePool:
    """Per-sequence state slots for every state layer; slots are handed out and taken back."""

    def __init__(self, layout: StateLayout, capacity: int):
        self.layout = layout
        self.capacity = 0
        self.arrays: list[list[mx.array]] = [[mx.zeros((0, *shape), dtype) for shape, dtype in layer]
                                             for layer in layout.layers]
        self.free_slots: list[int] = []
        self.slot_of: dict[int, int] = {}  # id(sequence) -> slot
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.arrays = [[mx.concatenate([a, mx.zeros((extra, *a.shape[1:]), a.dtype)]) for a in layer]
                       for layer in self.arrays]
        mx.eval(self.all_arrays())
        self.free_slots.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return self.layout.bytes_per_slot * self.capacity

    @property
    def used_slots(self) -> int:
        return len(self.slot_of)

    def all_arrays(self) -> list[mx.array]:
        return [a for layer in self.arrays for a in layer]

    def slot(self, seq) -> int:
        return self.slot_of[id(seq)]

    def has_slot(self, seq) -> bool:
        return id(seq) in self.slot_of

    def allocate(self, seq, snapshot: list[list[mx.array]] | None = None) -> int:
        """A slot for `seq`, holding `snapshot` (a state from StateSnapshots) or zeros."""
        if id(seq) in self.slot_of:
            return self.slot_of[id(seq)]
        if not self.free_slots:
            self._grow(self.capacity * 2)
        slot = self.free_slots.pop()
        self.slot_of[id(seq)] = slot
        for i, layer in enumerate(self.arrays):
            for j, array in enumerate(layer):
                value = snapshot[i][j] if snapshot is not None else mx.zeros(array.shape[1:], array.dtype)
                array[slot] = value
        return slot

    def copy(self, parent, child) -> None:
        """`child` (holding a slot) continues from `parent`'s state (n > 1 forks)."""
        src, dst = self.slot(parent), self.slot(child)
        for layer in self.arrays:
            for array in layer:
                array[dst] = array[src]

    def free(self, seq) -> None:
        slot = self.slot_of.pop(id(seq), None)
        if slot is not None:
            self.free_slots.append(slot)

    def read(self, seq) -> list[list[mx.array]]:
        """A copy of `seq`'s state (evaluated: the pool's buffers are reused in place)."""
        slot = self.slot(seq)
        out = [[array[slot] for array in layer] for layer in self.arrays]
        mx.eval(out)
        return out


class StateSnapshots:
    """States at block boundaries, by the prefix hash of the block ending there; LRU in bytes."""

    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self.entries: OrderedDict[bytes, list[list[mx.array]]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.stored = 0

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.entries

    def get(self, block_hash: bytes) -> list[list[mx.array]] | None:
        state = self.entries.get(block_hash)
        if state is not None:
            self.entries.move_to_end(block_hash)
            self.hits += 1
        return state

    def put(self, block_hash: bytes, state: list[list[mx.array]]) -> None:
        if block_hash in self.entries:
            self.entries.move_to_end(block_hash)
            return
        size = sum(a.nbytes for layer in state for a in layer)
        if size > self.cap_bytes:
            return
        self.entries[block_hash] = state
        self.nbytes += size
        self.stored += 1
        while self.nbytes > self.cap_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= sum(a.nbytes for layer in old for a in layer)

    def stats(self) -> dict:
        return {"snapshots": len(self.entries), "snapshot_bytes": self.nbytes,
                "snapshot_hits": self.hits, "snapshots_stored": self.stored}


# ---------------------------------------------------------------------------- one pass


@dataclass
class StateGroup:
    """Rows of a pass that run through a state layer in one call: `(len(slots), length)`."""

    rows: mx.array  # token rows of the pass, sequence after sequence
    slots: mx.array
    length: int
    # (index in the group, absolute position after the piece) where a snapshot is due; a
    # prefill group is run in pieces ending there (see StatePlan.build).
    pieces: list[int] = field(default_factory=list)  # piece lengths (prefill), sum = length
    snapshot_after: list[int | None] = field(default_factory=list)  # per piece: position or None
    decode_snapshots: list[tuple[int, int]] = field(default_factory=list)  # (member, position)
    seq_keys: list[int] = field(default_factory=list)  # per member: index of the sequence in the pass


@dataclass
class StatePlan:
    """How one pass's rows go through every state layer, and which snapshots it takes."""

    groups: list[StateGroup]
    inverse: mx.array | None  # output rows back in pass order (None: already in order)
    # Snapshots taken during the pass: (pass sequence index, position) -> [layer][array].
    snapshots: dict[tuple[int, int], list[list[mx.array]]] = field(default_factory=dict)
    # Sequences verifying a draft (pass indices), and for each, per state layer, what is
    # needed to take rejected rows back out of its state: (run(x, cache) -> output, the
    # state before the pass, the layer's inputs for the sequence's rows).
    drafted: frozenset[int] = frozenset()
    replays: dict[int, list[tuple]] = field(default_factory=dict)

    @classmethod
    def build(cls, order: list[int], counts: list[int], starts: list[int], slots: list[int],
              interval: int, drafted: frozenset[int] = frozenset()) -> "StatePlan":
        """`order`: pass sequence indices in row order; `counts[i]` / `starts[i]` / `slots[i]`:
        the new tokens, the position of the first and the state slot of sequence i.
        `interval` > 0: snapshot the state at every multiple of it that the pass reaches."""
        row = 0
        first_row = {}
        for i in order:
            first_row[i] = row
            row += counts[i]
        decodes = [i for i in order if counts[i] == 1]
        groups = []
        if decodes:
            group = StateGroup(rows=mx.array([first_row[i] for i in decodes], dtype=mx.int32),
                               slots=mx.array([slots[i] for i in decodes], dtype=mx.int32), length=1,
                               pieces=[1], snapshot_after=[None], seq_keys=decodes)
            if interval:
                group.decode_snapshots = [(m, starts[i] + 1) for m, i in enumerate(decodes)
                                          if (starts[i] + 1) % interval == 0]
            groups.append(group)
        for i in order:
            n = counts[i]
            if n <= 1:
                continue
            start, end = starts[i], starts[i] + n
            cuts = [p for p in range(start - start % interval + interval, end + 1, interval)] if interval else []
            bounds = [start] + [p for p in cuts if p < end] + [end]
            pieces = [b - a for a, b in zip(bounds, bounds[1:])]
            after = [b if b in cuts else None for b in bounds[1:]]
            groups.append(StateGroup(rows=mx.arange(first_row[i], first_row[i] + n, dtype=mx.int32),
                                     slots=mx.array([slots[i]], dtype=mx.int32), length=n,
                                     pieces=pieces, snapshot_after=after, seq_keys=[i]))
        # Outputs come out group after group; put them back in row order.
        produced = np.concatenate([np.array(g.rows, dtype=np.int64) for g in groups])
        inverse = None
        if not np.array_equal(produced, np.arange(len(produced))):
            inverse = mx.array(np.argsort(produced).astype(np.int32))
        return cls(groups=groups, inverse=inverse, drafted=drafted)


class StateLayerCache:
    """What a state layer's module receives as `cache` in the ragged pass (see StateRouter);
    to the rest of the model it looks like an unpadded ArraysCache."""

    def __init__(self, pool: StatePool, layer: int, plan: StatePlan):
        self.pool = pool
        self.layer = layer
        self.plan = plan
        self.lengths = None
        self.left_padding = None

    def make_mask(self, N: int):
        return None  # every group the layer runs is unpadded

    def run(self, call, args: tuple, kwargs: dict) -> mx.array:
        """Run the layer's original `call` over the pass's rows `(T, 1, ...)` (its first
        positional argument, or its first array keyword argument), group by group, reading
        and writing the pool's state."""
        if args:
            x, place = args[0], 0
        else:
            place = next(k for k, v in kwargs.items() if isinstance(v, mx.array))
            x = kwargs[place]
        arrays = self.pool.arrays[self.layer]
        classes = self.pool.layout.classes
        cache_class = classes[self.layer] if classes else ArraysCache
        outputs = []
        for group in self.plan.groups:
            cache = cache_class(len(arrays))
            cache.cache = [array[group.slots] for array in arrays]
            rows = x[group.rows]
            if group.length == 1:
                inputs = rows  # (sequences, 1, ...)
                outputs.append(_call_with(call, inputs, place, cache, self, args, kwargs))
                for member, position in group.decode_snapshots:
                    key = (group.seq_keys[member], position)
                    # A gather copies the row: a slice would keep the whole group's state alive.
                    pick = mx.array([member], dtype=mx.int32)
                    self.plan.snapshots.setdefault(key, []).append([c[pick][0] for c in cache.cache])
            else:
                inputs = rows.swapaxes(0, 1)  # (1, tokens, ...)
                if group.seq_keys[0] in self.plan.drafted:
                    replay = lambda x, c, _args=args, _kwargs=kwargs: _call_with(  # noqa: E731
                        call, x, place, c, self, _args, _kwargs)
                    self.plan.replays.setdefault(group.seq_keys[0], []).append(
                        (replay, list(cache.cache), inputs))
                lo = 0
                for piece, position in zip(group.pieces, group.snapshot_after):
                    out = _call_with(call, inputs[:, lo : lo + piece], place, cache, self, args, kwargs)
                    outputs.append(out.swapaxes(0, 1))
                    lo += piece
                    if position is not None:
                        key = (group.seq_keys[0], position)
                        self.plan.snapshots.setdefault(key, []).append([c[0] for c in cache.cache])
            for array, new in zip(arrays, cache.cache):
                array[group.slots] = new
        out = mx.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        return out if self.plan.inverse is None else out[self.plan.inverse]


def _call_with(call, x, place, cache, routed, args, kwargs):
    """`call` with `x` in the input's place and `cache` in place of the routed cache."""
    args = tuple(cache if a is routed else a for a in args)
    kwargs = {k: (cache if v is routed else v) for k, v in kwargs.items()}
    if place == 0 and args:
        args = (x, *args[1:])
    else:
        kwargs[place] = x
    out = call(*args, **kwargs)
    if not isinstance(out, mx.array):
        raise UnsupportedLayout(f"a state layer returned {type(out).__name__}, not an array")
    return out


# ---------------------------------------------------------------------------- routing


class _Watch:
    """Mixed into a state layer's own cache class: notes the modules whose calls read or
    write the cache (see probe_state_layers)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.modules: dict[int, nn.Module] = {}

    def _note(self):
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and any(v is self for v in frame.f_locals.values()):
                # The outermost frame of this module that still holds the cache as a local is
                # the call that received it; keep walking to find it.
                self.modules[id(owner)] = owner
            frame = frame.f_back

    def __getitem__(self, idx):
        self._note()
        return super().__getitem__(idx)

    def __setitem__(self, idx, value):
        self._note()
        super().__setitem__(idx, value)


def probe_state_layers(model, kinds: list[LayerKind]) -> tuple[StateLayout, list[nn.Module]]:
    """Run one token through the model with mlx-lm's caches to learn each state layer's
    arrays and which module receives each state cache (the innermost module on the call
    path that was handed the cache: e.g. a GatedDeltaNet, a Mamba mixer, a ShortConv)."""
    caches = make_prompt_cache(model)
    watched = []
    for index, (kind, cache) in enumerate(zip(kinds, caches)):
        if kind.kind is Kind.STATE:
            watch = type("Watched" + type(cache).__name__, (_Watch, type(cache)), {})(len(cache.cache))
            caches[index] = watch
            watched.append(watch)
    model(mx.array([[0]]), cache=caches)
    layers, receivers = [], []
    classes = tuple(type(w).__mro__[2] for w in watched)  # (Watched*, _Watch, the cache's class)
    for watch in watched:
        arrays = watch.cache
        if any(a is None for a in arrays):
            raise UnsupportedLayout("a state layer left part of its cache empty")
        mx.eval(arrays)
        layers.append(tuple((tuple(a.shape[1:]), a.dtype) for a in arrays))
        receivers.append(_innermost(list(watch.modules.values())))
    return StateLayout(tuple(layers), classes), receivers


def _innermost(modules: list[nn.Module]) -> nn.Module:
    """Of the modules that held the cache, the one none of the others is a child of... that
    is, the deepest: a module whose descendants include none of the others."""
    if not modules:
        raise UnsupportedLayout("no module reads a state layer's cache")
    for module in modules:
        inside = {id(m) for _, m in module.named_modules()} - {id(module)}
        if not any(id(other) in inside for other in modules):
            return module
    raise UnsupportedLayout("cannot tell which module owns a state layer's cache")


_ROUTED: dict[type, type] = {}


def route_state_layers(receivers: list[nn.Module]) -> None:
    """Give each receiving module a class whose call regroups ragged rows when its cache is
    a StateLayerCache (and is otherwise its own)."""
    for module in receivers:
        base = type(module)
        if getattr(base, "_omlx_state_routed", False):
            continue
        routed = _ROUTED.get(base)
        if routed is None:
            def __call__(self, *args, _base=base, **kwargs):
                cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, StateLayerCache)), None)
                if cache is None:
                    return _base.__call__(self, *args, **kwargs)
                return cache.run(lambda *a, **k: _base.__call__(self, *a, **k), args, kwargs)

            routed = type(base.__name__, (base,), {"__call__": __call__, "_omlx_state_routed": True,
                                                   "__module__": base.__module__})
            _ROUTED[base] = routed
        module.__class__ = routed
