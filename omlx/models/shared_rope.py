"""RoPE whose cosines and sines are computed once per pass, not once per call.

On the CPU `mx.fast.rope` has no kernel: MLX builds its fallback graph at every call, about
twenty nodes (positions, inverse frequencies, theta, cos, sin, the rotation), and that is the
single largest share of a decode step's "other ops" on a 30-layer model (q and k of every
layer: 60 calls a token, all with the same offsets).  `SharedRoPE` stands in for `nn.RoPE`
and mlx-lm's `Llama3RoPE` (swapped at load; mlx-lm's model code is unchanged): the first call of a pass with given
offsets computes the cos / sin table, every later call with the same offsets array (every
layer's q and k: the paged cache hands them all one array) reuses it and only rotates.

Bit-identical to `mx.fast.rope` on the CPU: the table is MLX's own fallback applied to a
probe of ones and zeros (x1 = 1, x2 = 0 gives exactly cos and sin), and the rotation is the
fallback's own sequence of multiplies, subtract, add and concatenate - one node of
omlx/kernels/cpu/fused_ops.cpp for float32 where it is built, MLX's ops otherwise.  Elsewhere (Metal,
CUDA: a real kernel) the swap is not made.

Offsets are matched by identity (`is`, holding a reference) for arrays, by value for ints;
only the tables of the last offsets are kept (per thread; one per rope configuration, e.g.
Gemma 3's local and global bases), so nothing outlives the next pass.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from omlx.kernels import fused_ops

_tables = threading.local()


def _probe(dims: int, traditional: bool) -> mx.array:
    """Ones where the rotation's x1 is read, zeros where x2 is."""
    half = dims // 2
    if traditional:
        return mx.array([1.0, 0.0] * half, dtype=mx.float32)
    return mx.concatenate([mx.ones((half,), mx.float32), mx.zeros((half,), mx.float32)])


class SharedRoPE(nn.Module):
    """`nn.RoPE` (same parameters, same results) with its table shared across calls."""

    def __init__(self, dims: int, traditional: bool = False, base: float | None = 10000, scale: float = 1.0,
                 freqs: mx.array | None = None):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.scale = scale
        # Llama 3's scaled frequencies (mx.fast.rope's `freqs`; base is None then).  A plain
        # attribute: a constant of the layer, not a parameter to load or count.
        object.__setattr__(self, "_freqs", freqs)
        # By value, so every layer's copy of the same frequencies shares one table.
        object.__setattr__(self, "_freqs_key", None if freqs is None else np.array(freqs, dtype=np.float32).tobytes())
        # A plain attribute, not a parameter: a constant, built once.
        object.__setattr__(self, "_pattern", _probe(dims, traditional))

    @classmethod
    def from_rope(cls, rope: nn.RoPE) -> "SharedRoPE":
        if type(rope) is nn.RoPE:
            return cls(rope.dims, rope.traditional, rope.base, rope.scale)
        return cls(rope.dims, rope.traditional, None, 1.0, rope._freqs)  # Llama3RoPE

    def _extra_repr(self) -> str:
        return f"{self.dims}, traditional={self.traditional}, table shared per pass"

    def _fast_rope(self, x: mx.array, offset) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                            offset=offset, freqs=self._freqs)

    def table(self, x: mx.array, offset) -> tuple[mx.array, mx.array, mx.array]:
        """(cos, sin, both), cos and sin shaped as the fallback's: (B, 1, T, dims / 2) for
        per-row offsets, (T, dims / 2) for one offset; both: (B or 1, T, dims) for the kernel."""
        return self.table_for(x.shape[0], x.shape[2], x.dtype, offset)

    def table_for(self, batch: int, length: int, dtype: mx.Dtype, offset) -> tuple[mx.array, mx.array, mx.array]:
        """`table` for an input of `batch` rows of `length` positions in `dtype`."""
        key = (self.dims, self.traditional, self.base, self.scale, self._freqs_key, length, dtype)
        last = getattr(_tables, "last", None)
        if last is None or not _same_offset(last[0], offset):
            last = _tables.last = (offset, {})
        found = last[1].get(key)
        if found is not None:
            return found
        rows = batch if isinstance(offset, mx.array) and offset.size > 1 else 1
        if isinstance(offset, mx.array) and offset.ndim <= 1 and dtype in (mx.float32, mx.float16):
            tables = self._from_positions(key[:5] + (dtype,), offset, length, rows)
            if tables is not None:
                last[1][key] = tables
                return tables
        probe = mx.broadcast_to(self._pattern.astype(dtype), (rows, 1, length, self.dims))
        rotated = self._fast_rope(probe, offset)
        if self.traditional:
            cos, sin = rotated[..., 0::2], rotated[..., 1::2]
        else:
            half = self.dims // 2
            cos, sin = rotated[..., :half], rotated[..., half:]
        if rows == 1:  # one offset: the fallback's table has no batch or head axis
            cos, sin = cos[0, 0], sin[0, 0]
        # The kernel's form: (rows, T, dims), cos / sin halves (or pairs) side by side.
        tables = (cos, sin, rotated[:, 0])
        last[1][key] = tables
        return tables

    def _from_positions(self, config: tuple, offset: mx.array, length: int, rows: int):
        """The tables of per-row offsets read from the host table of every position (no graph
        nodes: a step's cos / sin cost ~35 nodes otherwise, 8% of a one-row decode step's);
        None past the positions it holds."""
        positions = np.asarray(offset, dtype=np.int64).reshape(-1)
        if positions.size == 0 or (rows > 1 and positions.size != rows):
            return None
        wanted = positions[:, None] + np.arange(length)
        top = int(wanted.max()) + 1
        if int(wanted.min()) < 0 or top > MAX_HOST_POSITIONS:
            return None
        host = _position_table(self, config, top)
        both = mx.array(host[wanted])  # (rows, T, dims): the kernel's form
        if self.traditional:
            cos, sin = both[..., 0::2], both[..., 1::2]
        else:
            half = self.dims // 2
            cos, sin = both[..., :half], both[..., half:]
        if rows == 1:
            cos, sin = cos[0], sin[0]
        else:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin, both

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if x.ndim != 4:  # the fallback reshapes other ranks; leave those to it
            return self._fast_rope(x, offset)
        cos, sin, both = self.table(x, offset)
        fused = fused_ops.kernel()
        if fused is not None and x.dtype == mx.float32:
            return fused.rope_rotate(x, both, self.dims, self.traditional)
        dims, half = self.dims, self.dims // 2
        if self.traditional:
            x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
        else:
            x1, x2 = x[..., :half], x[..., half:dims]
        first = x1 * cos - x2 * sin
        second = x1 * sin + x2 * cos
        if self.traditional:
            b, n, t, _ = x.shape
            out = mx.concatenate([first[..., None], second[..., None]], axis=-1).reshape(b, n, t, dims)
            parts = [out]
        else:
            parts = [first, second]
        if dims < x.shape[-1]:
            parts.append(x[..., dims:])
        return mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


# Positions a host table holds at most (a 64-wide rotation: 16 MiB); a pass past it builds its
# table in the graph as before.
MAX_HOST_POSITIONS = 1 << 16
_host_tables: dict[tuple, np.ndarray] = {}
_host_lock = threading.Lock()


def _position_table(rope: SharedRoPE, config: tuple, needed: int) -> np.ndarray:
    """The rotated probe (the kernel's cos / sin row) of every position below `needed`, for
    one rope configuration, computed by MLX's own fallback with the positions as per-row
    offsets: the same elementwise computation a ragged pass makes for them, so the same bits.
    Grown by doubling, shared by every layer and thread."""
    with _host_lock:
        table = _host_tables.get(config)
        if table is not None and len(table) >= needed:
            return table
        size = max(1024, 1 << (needed - 1).bit_length())
        start = 0 if table is None else len(table)
        offsets = mx.arange(start, size, dtype=mx.int32)
        dtype = config[-1]
        probe = mx.broadcast_to(rope._pattern.astype(dtype), (size - start, 1, 1, rope.dims))
        rotated = np.array(rope._fast_rope(probe, offsets)[:, 0, 0])
        table = rotated if table is None else np.concatenate([table, rotated])
        _host_tables[config] = table
        return table


def _same_offset(cached, offset) -> bool:
    if isinstance(offset, mx.array) or isinstance(cached, mx.array):
        return cached is offset
    return cached == offset


def _swappable() -> tuple[type, ...]:
    """nn.RoPE and mlx-lm's Llama3RoPE (mx.fast.rope with fixed `freqs`, nothing else); the
    other scaled ropes scale x first or compute their own frequencies per call."""
    try:
        from mlx_lm.models.rope_utils import Llama3RoPE
    except ImportError:
        return (nn.RoPE,)
    return (nn.RoPE, Llama3RoPE)


def share_rope_tables(model: nn.Module) -> int:
    """Swap the model's `nn.RoPE` / `Llama3RoPE` layers (exact types: subclasses and the other
    scaled ropes keep theirs) for `SharedRoPE`, on the CPU only.  Returns how many."""
    if mx.default_device() != mx.cpu:
        return 0
    kinds = _swappable()
    swapped = 0
    for _, parent in model.named_modules():
        for name, child in list(parent.children().items()):
            if type(child) in kinds:
                parent[name] = SharedRoPE.from_rope(child)
                swapped += 1
    return swapped


def forget() -> None:
    _tables.last = None
