"""One KV block on disk: a safetensors file named by the block's prefix hash.

Each file holds the block's rows of every pool array (keys and values of every layer, or
their packed / scales / biases parts for a quantized pool), plus metadata: the format, the
block's hash, the model identity it was computed for, and a checksum of the data.  Files are
written to a temp name and `os.replace`d, so a crash never leaves a half-written file under a
trusted name; a file that fails any check on reading raises `CorruptBlock`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

SUFFIX = ".safetensors"
# KV blocks, and recurrent-state snapshots beside them (omlx.scheduler.disk.state_files).
BLOCK_FILE = re.compile(r"[0-9a-f]{32}(\.state)?\.safetensors")
TEMP_FILE = re.compile(r"\..+\.tmp")
_FORMAT = "omlx-kv-block-1"
# safetensors dtype names; bfloat16 travels as its raw 16-bit pattern.
_DTYPES = {
    mx.float32: ("F32", np.float32),
    mx.float16: ("F16", np.float16),
    mx.bfloat16: ("BF16", np.uint16),
    mx.uint32: ("U32", np.uint32),
}


class CorruptBlock(Exception):
    pass


def file_name(h: bytes) -> str:
    return h.hex() + SUFFIX


def expected_tensors(storage) -> list[tuple[str, type, tuple[int, int]]]:
    """(dtype name, numpy dtype, shape) of each tensor of a block, in storage.arrays() order."""
    rows = storage.layout.num_kv_heads * storage.block_size
    out = []
    for arr in storage.arrays():
        name, np_dtype = _DTYPES[arr.dtype]
        out.append((name, np_dtype, (rows, arr.shape[1])))
    return out


def snapshot(storage, block: int) -> list[np.ndarray]:
    """Host copies of the block's rows in every pool array (contiguous, see omlx.kernels)."""
    rows = storage.layout.num_kv_heads * storage.block_size
    start, stop = block * rows, (block + 1) * rows
    slices = []
    for arr in storage.arrays():
        part = arr[start:stop]
        if arr.dtype == mx.bfloat16:
            part = part.view(mx.uint16)
        slices.append(part)
    mx.eval(slices)
    # Copies, so that no view keeps the pool's buffer referenced (its in-place updates
    # would then copy the whole pool).
    return [np.array(s, copy=True) for s in slices]


def store(storage, block: int, tensors: list[np.ndarray]) -> None:
    """Write a block's rows (as read from a file) into pool block `block`."""
    rows = storage.layout.num_kv_heads * storage.block_size
    start, stop = block * rows, (block + 1) * rows
    for arr, data in zip(storage.arrays(), tensors):
        value = mx.array(data)
        if arr.dtype == mx.bfloat16:
            value = value.view(mx.bfloat16)
        arr[start:stop] = value


def write(path: Path, h: bytes, identity: str, tensors: list[np.ndarray], expected) -> int:
    """Write the file (temp name, then replace); returns its size in bytes."""
    header: dict = {}
    offset = 0
    digest = hashlib.blake2b(digest_size=16)
    for i, (t, (dtype_name, _, _)) in enumerate(zip(tensors, expected)):
        n = t.nbytes
        header[f"t{i}"] = {"dtype": dtype_name, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        digest.update(memoryview(t).cast("B"))
    header["__metadata__"] = {"format": _FORMAT, "hash": h.hex(), "identity": identity, "checksum": digest.hexdigest()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in tensors:
                f.write(memoryview(t).cast("B"))
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no half-written file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return 8 + len(blob) + offset


def read(path: Path, h: bytes, identity: str, expected) -> list[np.ndarray]:
    """The block's tensors, after checking the header, shapes, identity, hash and checksum."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CorruptBlock("truncated")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptBlock("truncated header")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise CorruptBlock(f"bad header: {exc}") from None
    meta = header.get("__metadata__") or {}
    if meta.get("identity") != identity:
        raise CorruptBlock("written for another model identity")
    if meta.get("hash") != h.hex():
        raise CorruptBlock("hash does not match the file name")
    body = memoryview(data)[8 + header_len :]
    digest = hashlib.blake2b(digest_size=16)
    out = []
    for i, (dtype_name, np_dtype, shape) in enumerate(expected):
        info = header.get(f"t{i}")
        if not isinstance(info, dict) or info.get("dtype") != dtype_name or tuple(info.get("shape", ())) != shape:
            raise CorruptBlock(f"tensor t{i} has the wrong dtype or shape")
        begin, end = info["data_offsets"]
        if not (0 <= begin <= end <= len(body)) or end - begin != np.dtype(np_dtype).itemsize * shape[0] * shape[1]:
            raise CorruptBlock(f"tensor t{i} is truncated")
        chunk = body[begin:end]
        digest.update(chunk)
        out.append(np.frombuffer(chunk, dtype=np_dtype).reshape(shape))
    if f"t{len(expected)}" in header:
        raise CorruptBlock("more tensors than this model's layout")
    if digest.hexdigest() != meta.get("checksum"):
        raise CorruptBlock("checksum mismatch")
    return out


def unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
