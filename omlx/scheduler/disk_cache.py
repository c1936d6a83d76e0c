"""The prefix cache's disk tier: full KV blocks outlive eviction from memory and restarts.

Every block the prefix cache publishes is snapshotted on the engine thread (its pool rows
copied to host memory) and written by a background thread to one safetensors file named by
the block's prefix hash, under a directory named by the model identity (weights scope, KV
dtype and quantization, block size, layer/head layout).  Files are written to a temp name
and `os.replace`d, so a crash never leaves a half-written file under a trusted name.

A later request whose prompt continues past the in-memory hits loads the next blocks from
disk into freshly allocated pool blocks (engine thread, at admission).  A file that is
unreadable, truncated, of another model identity, of the wrong shape, or whose checksum does
not match is deleted and treated as a miss: the block is simply computed.

The directory is capped in bytes; the least recently used files (written or loaded) go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np

log = logging.getLogger("omlx.disk_cache")

_SUFFIX = ".safetensors"
# safetensors dtype names; bfloat16 travels as its raw 16-bit pattern.
_DTYPES = {
    mx.float32: ("F32", np.float32),
    mx.float16: ("F16", np.float16),
    mx.bfloat16: ("BF16", np.uint16),
    mx.uint32: ("U32", np.uint32),
}


def model_identity(scope: bytes, storage) -> str:
    """Hex id of everything that decides whether a stored block fits this engine's pool."""
    layout = storage.layout
    parts = [
        scope.hex(), str(layout.dtype), str(storage.kv_bits), str(storage.group_size),
        str(storage.block_size), str(layout.num_layers), str(layout.num_kv_heads),
        str(layout.key_dim), str(layout.value_dim),
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


class CorruptBlock(Exception):
    pass


class DiskKVCache:
    """One engine's disk tier.  `publish` and `load` run on the engine thread; files are
    written by a daemon writer thread."""

    def __init__(self, root: Path | str, scope: bytes, storage, max_bytes: int):
        self.storage = storage
        self.identity = model_identity(scope, storage)
        self.dir = Path(root).expanduser() / self.identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.rows_per_block = storage.layout.num_kv_heads * storage.block_size
        # Expected (dtype name, numpy dtype, shape) of each tensor, in storage.arrays() order.
        self._expected = []
        for arr in storage.arrays():
            name, np_dtype = _DTYPES[arr.dtype]
            self._expected.append((name, np_dtype, (self.rows_per_block, arr.shape[1])))
        self._lock = threading.Lock()
        self._files: OrderedDict[bytes, int] = OrderedDict()  # hash -> bytes, LRU first
        self._bytes = 0
        self._pending: set[bytes] = set()
        self._queue: queue.Queue = queue.Queue()
        self.hits = 0  # blocks loaded from disk
        self.writes = 0
        self.rejected = 0  # corrupt / foreign files removed
        self.evictions = 0
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="omlx-kv-disk", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ index
    def _path(self, h: bytes) -> Path:
        return self.dir / (h.hex() + _SUFFIX)

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.endswith(".tmp"):  # a write interrupted by a crash
                _unlink(entry.path)
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                h = bytes.fromhex(name[: -len(_SUFFIX)])
                st = entry.stat()
            except (ValueError, OSError):
                continue
            if len(h) != 16:
                continue
            found.append((st.st_mtime, h, st.st_size))
        for _, h, size in sorted(found):
            self._files[h] = size
            self._bytes += size
        self._evict_over_cap()

    def __contains__(self, h: bytes) -> bool:
        with self._lock:
            return h in self._files

    @property
    def num_blocks(self) -> int:
        return len(self._files)

    def stats(self) -> dict:
        return {
            "dir": str(self.dir),
            "blocks": len(self._files),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hit_blocks": self.hits,
            "written_blocks": self.writes,
            "rejected_files": self.rejected,
            "evicted_blocks": self.evictions,
            "pending_writes": len(self._pending),
        }

    # ------------------------------------------------------------------ write
    def publish(self, h: bytes, block: int) -> None:
        """Snapshot a just-published block's pool rows and queue it for writing."""
        with self._lock:
            if h in self._files or h in self._pending:
                return
            self._pending.add(h)
        try:
            tensors = self._snapshot(block)
        except Exception:  # the disk tier is an optimisation: never fail the engine step
            log.exception("snapshotting KV block %d for the disk tier failed", block)
            with self._lock:
                self._pending.discard(h)
            return
        self._queue.put((h, tensors))

    def _snapshot(self, block: int) -> list[np.ndarray]:
        """Host copies of the block's rows in every pool array (contiguous, see omlx.kernels)."""
        start = block * self.rows_per_block
        stop = start + self.rows_per_block
        slices = []
        for arr in self.storage.arrays():
            part = arr[start:stop]
            if arr.dtype == mx.bfloat16:
                part = part.view(mx.uint16)
            slices.append(part)
        mx.eval(slices)
        # Copies, so that no view keeps the pool's buffer referenced (its in-place updates
        # would then copy the whole pool).
        return [np.array(s, copy=True) for s in slices]

    def _writer(self) -> None:
        # Lower this thread's priority (Linux schedules threads as tasks): writing competes
        # with the engine for cores only when they would otherwise idle.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                h, tensors = item
                try:
                    size = self._write(h, tensors)
                except Exception:
                    log.exception("writing KV block %s to disk failed", h.hex())
                    with self._lock:
                        self._pending.discard(h)
                    continue
                with self._lock:
                    self._pending.discard(h)
                    if h not in self._files:
                        self._bytes += size
                    self._files[h] = size
                    self._files.move_to_end(h)
                    self.writes += 1
                    self._evict_over_cap()
            finally:
                self._queue.task_done()

    def _write(self, h: bytes, tensors: list[np.ndarray]) -> int:
        header: dict = {}
        offset = 0
        digest = hashlib.blake2b(digest_size=16)
        for i, (t, (dtype_name, _, _)) in enumerate(zip(tensors, self._expected)):
            n = t.nbytes
            header[f"t{i}"] = {"dtype": dtype_name, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
            digest.update(memoryview(t).cast("B"))
        header["__metadata__"] = {
            "format": "omlx-kv-block-1", "hash": h.hex(), "identity": self.identity,
            "checksum": digest.hexdigest(),
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        path = self._path(h)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in tensors:
                f.write(memoryview(t).cast("B"))
        os.replace(tmp, path)
        return 8 + len(blob) + offset

    def _evict_over_cap(self) -> None:
        """Drop least recently used files while over the cap (lock held)."""
        while self._bytes > self.max_bytes and self._files:
            h, size = self._files.popitem(last=False)
            self._bytes -= size
            self.evictions += 1
            _unlink(self._path(h))

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ load
    def load(self, h: bytes, block: int) -> bool:
        """Write the stored block `h` into pool block `block`; False (and the file removed
        when it is bad) if it cannot be trusted."""
        path = self._path(h)
        try:
            tensors = self._read(path, h)
        except FileNotFoundError:
            self._forget(h, remove=False)
            return False
        except (CorruptBlock, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("discarding KV block file %s: %s", path.name, exc)
            self.rejected += 1
            self._forget(h, remove=True)
            return False
        start = block * self.rows_per_block
        stop = start + self.rows_per_block
        for arr, data in zip(self.storage.arrays(), tensors):
            value = mx.array(data)
            if arr.dtype == mx.bfloat16:
                value = value.view(mx.bfloat16)
            arr[start:stop] = value
        with self._lock:
            if h in self._files:
                self._files.move_to_end(h)
        try:
            os.utime(path)
        except OSError:
            pass
        self.hits += 1
        return True

    def _read(self, path: Path, h: bytes) -> list[np.ndarray]:
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
        if meta.get("identity") != self.identity:
            raise CorruptBlock("written for another model identity")
        if meta.get("hash") != h.hex():
            raise CorruptBlock("hash does not match the file name")
        body = memoryview(data)[8 + header_len :]
        digest = hashlib.blake2b(digest_size=16)
        out = []
        for i, (dtype_name, np_dtype, shape) in enumerate(self._expected):
            info = header.get(f"t{i}")
            if not isinstance(info, dict) or info.get("dtype") != dtype_name or tuple(info.get("shape", ())) != shape:
                raise CorruptBlock(f"tensor t{i} has the wrong dtype or shape")
            begin, end = info["data_offsets"]
            if not (0 <= begin <= end <= len(body)) or end - begin != np.dtype(np_dtype).itemsize * shape[0] * shape[1]:
                raise CorruptBlock(f"tensor t{i} is truncated")
            chunk = body[begin:end]
            digest.update(chunk)
            out.append(np.frombuffer(chunk, dtype=np_dtype).reshape(shape))
        if f"t{len(self._expected)}" in header:
            raise CorruptBlock("more tensors than this model's layout")
        if digest.hexdigest() != meta.get("checksum"):
            raise CorruptBlock("checksum mismatch")
        return out

    def _forget(self, h: bytes, remove: bool) -> None:
        with self._lock:
            size = self._files.pop(h, None)
            if size is not None:
                self._bytes -= size
        if remove:
            _unlink(self._path(h))


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
