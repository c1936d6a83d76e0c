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

Each identity directory holds `identity.json`: the model's readable label, its KV layout and
when it was created and last opened.  An engine holds a shared `flock` on its directory while
open.  On opening, directories of the same label but another identity (the weights, KV bits or
block size changed: they can never be hit again) are removed, as are identity-named directories
without metadata whose files are all older than `STALE_AFTER_S` (left by older versions) -
never a directory another engine holds, nor one holding anything but our files.

Loads are read ahead: when a request arrives, `prefetch` hands the chain of its blocks that
are on disk (not in memory) to a reader thread, which reads and verifies each file into host
memory (numpy only: MLX arrays are made on the engine thread alone), in chain order, up to the
first miss.  `load` then only copies the staged rows into the pool; a block not staged (yet) is
read synchronously as before.  Staging is capped in bytes, and what a request does not use is
dropped once it is admitted, aborted or finished (or after `STAGING_TTL_S` regardless).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

try:
    import fcntl
except ImportError:  # no flock (Windows): directories are not locked, and none is collected
    fcntl = None

log = logging.getLogger("omlx.disk_cache")

_SUFFIX = ".safetensors"
IDENTITY_FILE = "identity.json"
_IDENTITY_FORMAT = "omlx-kv-identity-1"
# What an identity directory and the files in it are named (see `model_identity`, `_write`).
_IDENTITY_NAME = re.compile(r"[0-9a-f]{24}")
_BLOCK_FILE = re.compile(r"[0-9a-f]{32}\.safetensors")
_TEMP_FILE = re.compile(r"\..+\.tmp")
# An identity directory without metadata (written before it existed) whose files are all
# this old is collected: a live engine of any version touches its files when it uses them.
STALE_AFTER_S = 30 * 86400
STAGING_BYTES = 512 << 20  # host memory the read-ahead may hold
STAGING_TTL_S = 120.0  # staged blocks nobody took by then are dropped
# safetensors dtype names; bfloat16 travels as its raw 16-bit pattern.
_DTYPES = {
    mx.float32: ("F32", np.float32),
    mx.float16: ("F16", np.float16),
    mx.bfloat16: ("BF16", np.uint16),
    mx.uint32: ("U32", np.uint32),
}


def _layout_fields(storage) -> dict:
    layout = storage.layout
    return {
        "dtype": str(layout.dtype), "kv_bits": storage.kv_bits, "group_size": storage.group_size,
        "block_size": storage.block_size, "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads, "key_dim": layout.key_dim, "value_dim": layout.value_dim,
    }


def model_identity(scope: bytes, storage) -> str:
    """Hex id of everything that decides whether a stored block fits this engine's pool."""
    parts = [scope.hex()] + [str(v) for v in _layout_fields(storage).values()]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


def scope_label(scope: bytes) -> str:
    """A label for engines given none: the scope itself when it is readable text, else a
    digest of it (then no other scope shares it, so nothing is ever collected for it)."""
    try:
        text = scope.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable():
        return text
    return "scope:" + hashlib.blake2b(scope, digest_size=8).hexdigest()


class CorruptBlock(Exception):
    pass


@dataclass
class _Staged:
    """A block read and verified ahead of its load (host memory)."""

    tensors: list
    nbytes: int
    owners: set = field(default_factory=set)
    since: float = field(default_factory=time.monotonic)


class DiskKVCache:
    """One engine's disk tier.  `publish`, `prefetch`, `release` and `load` run on the engine
    thread; files are written by a daemon writer thread and read ahead by a reader thread."""

    def __init__(
        self, root: Path | str, scope: bytes, storage, max_bytes: int, label: str | None = None,
        staging_bytes: int = STAGING_BYTES, stale_after_s: float = STALE_AFTER_S,
    ):
        self.storage = storage
        self.identity = model_identity(scope, storage)
        self.label = label or scope_label(scope)
        self.root = Path(root).expanduser()
        self.dir = self.root / self.identity
        self._dir_fd = self._open_dir()
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
        self.hits = 0  # blocks loaded from disk (staged or not)
        self.writes = 0
        self.rejected = 0  # corrupt / foreign files removed
        self.evictions = 0
        # Read-ahead state (guarded by _lock; `_staged_cv` signals a finished read).
        self.prefetch_enabled = True
        self.staging_bytes = staging_bytes
        self._staged: OrderedDict[bytes, _Staged] = OrderedDict()  # oldest first
        self._staged_nbytes = 0
        self._owners: dict[object, set[bytes]] = {}  # prefetching requests -> hashes staged for them
        self._reading_for: set = set()  # owners whose read-ahead is queued or under way
        self._reading: bytes | None = None  # the block the reader is reading now
        self._staged_cv = threading.Condition(self._lock)
        self._read_queue: queue.Queue = queue.Queue()
        self.prefetched = 0  # loads served from staged blocks
        self.prefetch_reads = 0  # blocks the reader staged
        self.prefetch_dropped = 0  # staged blocks dropped unused
        self.removed_dirs = 0  # garbage identity directories removed at open
        self.removed_bytes = 0
        self._write_identity(scope)
        self._scan()
        try:
            self._collect_garbage(stale_after_s)
        except Exception:  # never fail the engine over housekeeping
            log.exception("cleaning up old KV disk cache directories under %s failed", self.root)
        self._thread = threading.Thread(target=self._writer, name="omlx-kv-disk", daemon=True)
        self._thread.start()
        self._reader_thread = threading.Thread(target=self._reader, name="omlx-kv-prefetch", daemon=True)
        self._reader_thread.start()

    # ------------------------------------------------------------------ identity directory
    def _open_dir(self) -> int | None:
        """Create the identity directory and hold a shared lock on it (an fd, None without
        flock), so that no other engine collects it while this one uses it."""
        if fcntl is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            return None
        deadline = time.monotonic() + 10.0
        while True:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # being collected right now: wait for it to go
                os.close(fd)
                if time.monotonic() > deadline:
                    log.warning("KV disk cache %s stays locked; using it unlocked", self.dir)
                    self.dir.mkdir(parents=True, exist_ok=True)
                    return None
                time.sleep(0.02)
                continue
            except OSError as exc:  # a filesystem without flock
                log.warning("cannot lock KV disk cache %s (%s); old directories stay", self.dir, exc)
                return fd
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.dir))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # collected while we waited: make it anew

    def _write_identity(self, scope: bytes) -> None:
        now = time.time()
        old = _read_identity(self.dir)
        doc = {
            "format": _IDENTITY_FORMAT,
            "identity": self.identity,
            "label": self.label,
            "scope": scope.decode("utf-8", "backslashreplace"),
            "layout": _layout_fields(self.storage),
            "created": old["created"] if old and isinstance(old.get("created"), (int, float)) else now,
            "last_used": now,
        }
        path = self.dir / IDENTITY_FILE
        tmp = self.dir / f".{IDENTITY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)
            _unlink(tmp)

    def _collect_garbage(self, stale_after_s: float) -> None:
        """Remove sibling identity directories that can never be hit again (see the module
        doc).  Only directories named like ours, holding only our files, and not locked."""
        if self._dir_fd is None:
            return
        for entry in os.scandir(self.root):
            name = entry.name
            if name == self.identity or not _IDENTITY_NAME.fullmatch(name):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            meta = _read_identity(Path(entry.path))
            if meta is not None:
                if meta["label"] != self.label:
                    continue  # another model's
                why, max_mtime = f"'{self.label}' now uses {self.identity}", None
            else:
                why, max_mtime = "no metadata, unused for long", time.time() - stale_after_s
            removed = _remove_identity_dir(Path(entry.path), max_mtime)
            if removed is None:
                continue
            files, nbytes = removed
            self.removed_dirs += 1
            self.removed_bytes += nbytes
            log.info("removed KV disk cache directory %s (%d files, %.1f MiB): %s",
                     entry.path, files, nbytes / 2**20, why)

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
            "label": self.label,
            "blocks": len(self._files),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hit_blocks": self.hits,
            "prefetched_blocks": self.prefetched,
            "prefetch_read_blocks": self.prefetch_reads,
            "prefetch_dropped_blocks": self.prefetch_dropped,
            "staged_blocks": len(self._staged),
            "staged_bytes": self._staged_nbytes,
            "written_blocks": self.writes,
            "rejected_files": self.rejected,
            "evicted_blocks": self.evictions,
            "pending_writes": len(self._pending),
            "removed_dirs": self.removed_dirs,
            "removed_bytes": self.removed_bytes,
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

    def wait_prefetch(self) -> None:
        """Wait until every queued read-ahead has been staged (or given up)."""
        self._read_queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._read_queue.put(None)
        self._reader_thread.join(timeout=10)
        with self._lock:
            self._owners.clear()
            self._reading_for.clear()
            while self._staged:
                self._drop_staged(next(iter(self._staged)))
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # releases the lock
            self._dir_fd = None

    # ------------------------------------------------------------------ read-ahead
    def prefetch(self, hashes: list[bytes], owner) -> None:
        """Have the reader stage the blocks `hashes` (a prefix chain, in order) for the
        request `owner`, until the first that is missing or bad.  Engine thread."""
        if not self.prefetch_enabled or not hashes:
            return
        with self._lock:
            self._expire_staged()
            self._owners.setdefault(owner, set())
            self._reading_for.add(owner)
        self._read_queue.put((owner, list(hashes)))

    def prefetching(self, owner) -> bool:
        """Whether `owner`'s read-ahead is still queued or under way."""
        if not self._reading_for:
            return False
        with self._lock:
            return owner in self._reading_for

    def release(self, owner) -> None:
        """`owner` needs its staged blocks no more (it was admitted, or it ended): stop its
        read-ahead and drop what only it was waiting for.  Engine thread."""
        if owner not in self._owners:
            return
        with self._lock:
            self._reading_for.discard(owner)
            hashes = self._owners.pop(owner, None) or ()
            for h in hashes:
                entry = self._staged.get(h)
                if entry is not None:
                    entry.owners.discard(owner)
                    if not entry.owners:
                        self._drop_staged(h)

    def _drop_staged(self, h: bytes) -> None:
        """Lock held."""
        entry = self._staged.pop(h)
        self._staged_nbytes -= entry.nbytes
        self.prefetch_dropped += 1

    def _expire_staged(self) -> None:
        """Drop staged blocks nobody took in time (lock held)."""
        limit = time.monotonic() - STAGING_TTL_S
        while self._staged:
            h, entry = next(iter(self._staged.items()))
            if entry.since > limit:
                return
            for owner in entry.owners:
                self._owners.get(owner, set()).discard(h)
            self._drop_staged(h)

    def _reader(self) -> None:
        while True:
            item = self._read_queue.get()
            try:
                if item is None:
                    return
                owner, hashes = item
                try:
                    self._read_ahead(owner, hashes)
                except Exception:
                    log.exception("reading KV blocks ahead failed")
                finally:
                    with self._lock:
                        self._reading_for.discard(owner)
                        self._reading = None
                        self._staged_cv.notify_all()
            finally:
                self._read_queue.task_done()

    def _read_ahead(self, owner, hashes: list[bytes]) -> None:
        for h in hashes:
            with self._lock:
                self._expire_staged()
                mine = self._owners.get(owner)
                if mine is None:
                    return  # released: admitted or ended meanwhile
                entry = self._staged.get(h)
                if entry is not None:  # staged for another request too
                    entry.owners.add(owner)
                    mine.add(h)
                    continue
                size = self._files.get(h)
                if size is None or self._staged_nbytes + size > self.staging_bytes:
                    return  # the chain ends here (or staging is full: the rest loads as before)
                self._reading = h
            tensors = None
            path = self._path(h)
            try:
                tensors = self._read(path, h)
            except FileNotFoundError:
                self._forget(h, remove=False)
            except (CorruptBlock, OSError, ValueError, KeyError, TypeError) as exc:
                self._reject(h, exc)
            with self._lock:
                self._reading = None
                self._staged_cv.notify_all()
                mine = self._owners.get(owner)
                if tensors is None or mine is None:
                    return
                nbytes = sum(t.nbytes for t in tensors)
                self._staged[h] = _Staged(tensors, nbytes, {owner})
                self._staged_nbytes += nbytes
                mine.add(h)
                self.prefetch_reads += 1

    # ------------------------------------------------------------------ load
    def load(self, h: bytes, block: int) -> bool:
        """Write the stored block `h` into pool block `block`; False (and the file removed
        when it is bad) if it cannot be trusted."""
        path = self._path(h)
        entry = None
        if self._staged or self._reading is not None:
            with self._lock:
                deadline = time.monotonic() + 5.0
                while self._reading == h and time.monotonic() < deadline:
                    self._staged_cv.wait(0.5)  # being read ahead right now: no second read
                entry = self._staged.pop(h, None)
                if entry is not None:
                    self._staged_nbytes -= entry.nbytes
        if entry is not None:
            tensors = entry.tensors
        else:
            try:
                tensors = self._read(path, h)
            except FileNotFoundError:
                self._forget(h, remove=False)
                return False
            except (CorruptBlock, OSError, ValueError, KeyError, TypeError) as exc:
                self._reject(h, exc)
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
            self.hits += 1
            if entry is not None:
                self.prefetched += 1
        try:
            os.utime(path)
        except OSError:
            pass
        return True

    def _reject(self, h: bytes, exc: Exception) -> None:
        """A bad file: delete it; counted once, whichever thread met it first."""
        log.warning("discarding KV block file %s: %s", self._path(h).name, exc)
        # Counted in the same step that takes it out of the index: whoever then finds it
        # missing (the engine thread, while the reader rejected it) also sees it counted.
        with self._lock:
            size = self._files.pop(h, None)
            if size is not None:
                self._bytes -= size
                self.rejected += 1
        _unlink(self._path(h))

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

    def _forget(self, h: bytes, remove: bool) -> bool:
        """Drop `h` from the index (and its file); whether it was there."""
        with self._lock:
            size = self._files.pop(h, None)
            if size is not None:
                self._bytes -= size
        if remove:
            _unlink(self._path(h))
        return size is not None


def _read_identity(directory: Path) -> dict | None:
    """The directory's identity.json, if it is ours and describes that directory."""
    try:
        meta = json.loads((directory / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict) or meta.get("format") != _IDENTITY_FORMAT
        or meta.get("identity") != directory.name or not isinstance(meta.get("label"), str)
    ):
        return None
    return meta


def _remove_identity_dir(path: Path, max_mtime: float | None) -> tuple[int, int] | None:
    """Delete an identity directory that nobody holds and that holds only our files (all
    last modified before `max_mtime`, if given): (files, bytes) removed, or None if left."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # an engine uses it (or it cannot be locked: leave it)
        files = []
        newest = os.fstat(fd).st_mtime
        for entry in os.scandir(path):
            name = entry.name
            if not entry.is_file(follow_symlinks=False):
                return None
            if name != IDENTITY_FILE and not _BLOCK_FILE.fullmatch(name) and not _TEMP_FILE.fullmatch(name):
                return None  # not only ours
            st = entry.stat(follow_symlinks=False)
            newest = max(newest, st.st_mtime)
            files.append((entry.path, st.st_size))
        if max_mtime is not None and newest > max_mtime:
            return None
        count = nbytes = 0
        # The metadata goes last: a directory left half-removed is still recognised as ours.
        for file, size in sorted(files, key=lambda f: os.path.basename(f[0]) == IDENTITY_FILE):
            try:
                os.unlink(file)
            except OSError:
                continue
            count += 1
            nbytes += size
        try:
            os.rmdir(path)
        except OSError:
            pass
        return count, nbytes
    finally:
        os.close(fd)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
