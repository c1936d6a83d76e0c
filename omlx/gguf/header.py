"""Read and check a GGUF file's header: its metadata and where each tensor lies.

MLX's own GGUF reader (`mx.load`) trusts the file: a truncated or garbled one can crash the
process.  So every GGUF file is read here first, with every length checked against the file
size, and only a file whose header parses and whose tensors all lie inside it is handed on.
Large string arrays (the vocabulary) are skipped unless asked for, which keeps a model
listing fast; results are cached per file version (path, size, mtime).
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 8

# GGUF metadata value types -> (struct format, numpy dtype); 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file omlx can read; the message says why, for the model list."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as MLX and PyTorch order it: outermost first
    type_id: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def count(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array that was not read (to keep listings fast): its element type and length."""

    type_id: int
    count: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: list[TensorInfo] = field(repr=False)
    data_offset: int
    file_size: int

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, key: str, default=None):
        """`{architecture}.{key}`, e.g. arch_value("context_length")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def parameters(self) -> int:
        return sum(t.count for t in self.tensors)

    def type_counts(self) -> dict[str, int]:
        """Elements stored in each tensor type, e.g. {"Q4_1": 1.1e8, "F32": 3e4}."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.count
        return counts


def type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _type_size(type_id: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a tensor type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise GGUFError(f"unknown tensor type {type_id}") from None


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"the file ends early (truncated?): needed {n} bytes at offset "
                            f"{self.pos} of {self.size}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.buf, self.take(n))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"a string at offset {start} is not UTF-8 (corrupt file?)") from None

    def skip_string(self) -> None:
        self.take(self.scalar("<Q"))


def _read_value(cur: _Cursor, vtype: int, arrays: bool):
    if vtype in _SCALARS:
        value = cur.scalar(_SCALARS[vtype][0])
        return bool(value) if vtype == 7 else value
    if vtype == _STRING:
        return cur.string()
    if vtype != _ARRAY:
        raise GGUFError(f"unknown metadata value type {vtype} at offset {cur.pos} (corrupt file?)")
    etype, count = cur.scalar("<I"), cur.scalar("<Q")
    if etype in _SCALARS:
        fmt, dtype = _SCALARS[etype]
        start = cur.take(count * struct.calcsize(fmt))
        if not arrays and count > 64:
            return SkippedArray(etype, count)
        return np.frombuffer(cur.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=start).copy()
    if etype == _STRING:
        if not arrays and count > 64:
            for _ in range(count):
                cur.skip_string()
            return SkippedArray(etype, count)
        return [cur.string() for _ in range(count)]
    if etype == _ARRAY:
        return [_read_value(cur, _ARRAY, arrays) for _ in range(count)]  # nested: rare, tiny
    raise GGUFError(f"unknown metadata array element type {etype} (corrupt file?)")


def read_header(path: str | Path, arrays: bool = False) -> GGUFHeader:
    """Parse and check the header; raises GGUFError with a reason a user can act on.

    With `arrays=False`, metadata arrays longer than 64 elements (vocabularies) come back as
    SkippedArray; the tensor table is always read and checked against the file size.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise GGUFError(f"cannot read the file: {exc}") from None
    result = _read_header_cached(str(path), st.st_size, st.st_mtime_ns, arrays)
    if isinstance(result, GGUFError):
        raise result
    return result


# Failures are cached too: the server rescans on every model listing.
@functools.lru_cache(maxsize=64)
def _read_header_cached(path: str, size: int, mtime_ns: int, arrays: bool) -> GGUFHeader | GGUFError:
    if size < 24:
        return GGUFError(f"not a GGUF file: only {size} bytes")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(Path(path), buf, size, arrays)
    except OSError as exc:
        return GGUFError(f"cannot read the file: {exc}")
    except GGUFError as exc:
        return exc
    except (struct.error, ValueError, OverflowError, MemoryError) as exc:
        return GGUFError(f"corrupt GGUF header: {exc}")


def _parse(path: Path, buf, size: int, arrays: bool) -> GGUFHeader:
    cur = _Cursor(buf, size)
    magic = bytes(buf[0:4])
    cur.take(4)
    if magic != MAGIC:
        raise GGUFError(f"not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    # Each entry takes at least a few bytes, so counts beyond the file size are corruption.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise GGUFError(f"corrupt header: {n_tensors} tensors and {n_kv} metadata entries "
                        f"cannot fit in {size} bytes")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = _read_value(cur, cur.scalar("<I"), arrays)

    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 0 < n_dims <= _MAX_DIMS:
            raise GGUFError(f"corrupt tensor table: {name!r} has {n_dims} dimensions")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        raw.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"corrupt header: general.alignment is {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment

    tensors = []
    for name, dims, type_id, offset in raw:
        block, block_bytes = _type_size(type_id)
        count = 1
        for dim in dims:
            count *= dim
        if dims[0] % block:
            raise GGUFError(f"corrupt tensor table: {name!r} rows of {dims[0]} are not whole "
                            f"{type_name(type_id)} blocks of {block}")
        nbytes = count // block * block_bytes
        start = data_offset + offset
        if start + nbytes > size:
            raise GGUFError(f"the file is truncated: tensor {name!r} needs bytes up to "
                            f"{start + nbytes}, the file has {size}")
        # GGUF lists dimensions innermost first; MLX, PyTorch and mlx-lm outermost first.
        tensors.append(TensorInfo(name, tuple(reversed(dims)), type_id, start, nbytes))
    return GGUFHeader(path, version, metadata, tensors, data_offset, size)
