"""Recurrent-state snapshots in the disk tier, so a resent conversation resumes after a restart.

A model with state layers resumes a cached prefix only where a state snapshot was taken (see
omlx.scheduler.state_manager); its KV blocks alone are not enough.  Each snapshot kept in memory
is also written, by a background thread, beside the KV block files of the same model identity:
`<block hash>.state.safetensors`, one tensor per state array, bfloat16 as its 16-bit pattern,
with the hash and the arrays' dtypes in the metadata.  A file that does not match the model's
state layout (shape, dtype, hash) is deleted and counts as a miss.  The files are capped in
bytes; the least recently used go first.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

log = logging.getLogger("omlx.disk_cache")

SUFFIX = ".state.safetensors"
_FORMAT = "omlx-state-1"


def _to_numpy(array: mx.array) -> tuple[np.ndarray, str]:
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)), "bfloat16"
    return np.array(array), str(array.dtype).split(".")[-1]


def _from_numpy(array: np.ndarray, dtype: str) -> mx.array:
    if dtype == "bfloat16":
        return mx.array(array).view(mx.bfloat16)
    return mx.array(array)


class StateDisk:
    """Snapshot files of one model identity.  `put` and `get` run on the engine thread."""

    def __init__(self, directory: Path, layout, cap_bytes: int):
        self.dir = Path(directory)
        self.layout = layout
        self.cap_bytes = cap_bytes
        self.lock = threading.Lock()
        self.files: OrderedDict[bytes, int] = OrderedDict()  # hash -> bytes, LRU first
        self.nbytes = 0
        self.writes = self.loads = self.rejected = 0
        self._pending: set[bytes] = set()
        self._queue: queue.Queue = queue.Queue()
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="omlx-state-disk", daemon=True)
        self._thread.start()

    def path(self, h: bytes) -> Path:
        return self.dir / (h.hex() + SUFFIX)

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.dir):
            if not entry.name.endswith(SUFFIX):
                continue
            try:
                h = bytes.fromhex(entry.name[: -len(SUFFIX)])
                st = entry.stat()
            except (ValueError, OSError):
                continue
            found.append((st.st_mtime, h, st.st_size))
        for _, h, size in sorted(found):
            self.files[h] = size
            self.nbytes += size

    def __contains__(self, h: bytes) -> bool:
        with self.lock:
            return h in self.files

    def put(self, h: bytes, state: list[list[mx.array]]) -> None:
        with self.lock:
            if h in self.files or h in self._pending:
                return
            self._pending.add(h)
        tensors, dtypes = {}, {}
        for i, layer in enumerate(state):
            for j, array in enumerate(layer):
                tensors[f"{i}.{j}"], dtypes[f"{i}.{j}"] = _to_numpy(array)
        self._queue.put((h, tensors, dtypes))

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                h, tensors, dtypes = item
                path = self.path(h)
                temp = path.with_name(f".{path.name}.tmp")
                try:
                    save_file(tensors, str(temp), metadata={"format": _FORMAT, "hash": h.hex(),
                                                            "dtypes": json.dumps(dtypes)})
                    os.replace(temp, path)
                    size = path.stat().st_size
                except OSError as exc:  # a full or read-only disk: the memory copy still serves
                    log.warning("writing a state snapshot to %s failed: %s", path, exc)
                    temp.unlink(missing_ok=True)
                    continue
                finally:
                    with self.lock:
                        self._pending.discard(h)
                with self.lock:
                    self.files[h] = size
                    self.nbytes += size
                    self.writes += 1
                    while self.nbytes > self.cap_bytes and self.files:
                        old, old_size = self.files.popitem(last=False)
                        self.nbytes -= old_size
                        self.path(old).unlink(missing_ok=True)
            finally:
                self._queue.task_done()

    def get(self, h: bytes) -> list[list[mx.array]] | None:
        """The snapshot stored under `h`, or None (a bad file is removed)."""
        with self.lock:
            if h not in self.files:
                return None
            self.files.move_to_end(h)
        path = self.path(h)
        try:
            state = self._read(path, h)
        except Exception as exc:  # noqa: BLE001 - unreadable or foreign: a miss
            log.warning("discarding state snapshot %s: %s", path.name, exc)
            with self.lock:
                self.nbytes -= self.files.pop(h, 0)
                self.rejected += 1
            path.unlink(missing_ok=True)
            return None
        self.loads += 1
        return state

    def _read(self, path: Path, h: bytes) -> list[list[mx.array]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT or meta.get("hash") != h.hex():
            raise ValueError("not a snapshot of this block")
        dtypes = json.loads(meta["dtypes"])
        tensors = load_file(str(path))
        state = []
        for i, layer in enumerate(self.layout.layers):
            arrays = []
            for j, (shape, dtype) in enumerate(layer):
                key = f"{i}.{j}"
                array = _from_numpy(tensors[key], dtypes[key])
                if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                    raise ValueError(f"array {key} is {array.shape} {array.dtype}, expected {shape} {dtype}")
                arrays.append(array)
            state.append(arrays)
        if len(tensors) != sum(len(layer) for layer in self.layout.layers):
            raise ValueError("unexpected arrays in the file")
        return state

    def stats(self) -> dict:
        with self.lock:
            return {"files": len(self.files), "bytes": self.nbytes, "writes": self.writes,
                    "loads": self.loads, "rejected": self.rejected}

    def close(self) -> None:
        self._queue.join()
        self._queue.put(None)
        self._thread.join(timeout=10)
