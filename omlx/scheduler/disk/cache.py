"""The prefix cache's disk tier: full KV blocks outlive eviction from memory and restarts.

Every block the prefix cache publishes is snapshotted on the engine thread (its pool rows
copied to host memory) and written by a background thread to one file (`block_file`) under
the model identity's directory (`identity_dir`).  A later request whose prompt continues past
the in-memory hits loads the next blocks from disk into freshly allocated pool blocks (engine
thread, at admission), read ahead while it waits (`read_ahead`).  A file that is unreadable,
truncated, of another model identity, of the wrong shape, or whose checksum does not match is
deleted and treated as a miss: the block is simply computed.  The directory is capped in
bytes; the least recently used files (written or loaded) go first.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import block_file
from .block_file import SUFFIX, CorruptBlock
from .identity_dir import STALE_AFTER_S, collect_garbage, model_identity, open_locked, scope_label, write_identity
from .read_ahead import STAGING_BYTES, ReadAhead

log = logging.getLogger("omlx.disk_cache")

# After a write fails for want of space or permission (a full disk, a directory made
# read-only), the tier stops writing this long before it tries again, so that a full disk
# costs one warning per pause instead of a traceback per block; reads go on meanwhile.
WRITE_PAUSE_S = 60.0


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
        self._dir_fd = open_locked(self.dir)
        self.max_bytes = max_bytes
        self.rows_per_block = storage.layout.num_kv_heads * storage.block_size
        self._expected = block_file.expected_tensors(storage)
        self.lock = threading.Lock()
        self._files: OrderedDict[bytes, int] = OrderedDict()  # hash -> bytes, LRU first
        self._bytes = 0
        self._pending: set[bytes] = set()
        self._queue: queue.Queue = queue.Queue()
        self.hits = 0  # blocks loaded from disk (staged or not)
        self.writes = 0
        self.rejected = 0  # corrupt / foreign files removed
        self.evictions = 0
        self.prefetched = 0  # loads served from staged blocks
        self.removed_dirs = 0  # garbage identity directories removed at open
        self.removed_bytes = 0
        self.write_failures = 0
        self._writes_paused_until = 0.0
        write_identity(self.dir, self.identity, self.label, scope, storage)
        self._scan()
        if self._dir_fd is not None:
            try:
                self.removed_dirs, self.removed_bytes = collect_garbage(
                    self.root, self.identity, self.label, stale_after_s)
            except Exception:  # never fail the engine over housekeeping
                log.exception("cleaning up old KV disk cache directories under %s failed", self.root)
        self._thread = threading.Thread(target=self._writer, name="omlx-kv-disk", daemon=True)
        self._thread.start()
        self.read_ahead = ReadAhead(self, staging_bytes)

    # ------------------------------------------------------------------ index
    def path(self, h: bytes) -> Path:
        return self.dir / block_file.file_name(h)

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.endswith(".tmp"):  # a write interrupted by a crash
                block_file.unlink(entry.path)
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                h = bytes.fromhex(name[: -len(SUFFIX)])
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
        with self.lock:
            return h in self._files

    def size_of(self, h: bytes) -> int | None:
        """The stored file's size, None when `h` is not on disk (lock held)."""
        return self._files.get(h)

    @property
    def num_blocks(self) -> int:
        return len(self._files)

    def stats(self) -> dict:
        ahead = self.read_ahead
        return {
            "dir": str(self.dir),
            "label": self.label,
            "blocks": len(self._files),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hit_blocks": self.hits,
            "prefetched_blocks": self.prefetched,
            "prefetch_read_blocks": ahead.reads,
            "prefetch_dropped_blocks": ahead.dropped,
            "staged_blocks": ahead.num_staged,
            "staged_bytes": ahead.staged_nbytes,
            "written_blocks": self.writes,
            "write_failures": self.write_failures,
            "writes_paused": time.monotonic() < self._writes_paused_until,
            "rejected_files": self.rejected,
            "evicted_blocks": self.evictions,
            "pending_writes": len(self._pending),
            "removed_dirs": self.removed_dirs,
            "removed_bytes": self.removed_bytes,
        }

    # ------------------------------------------------------------------ write
    def publish(self, h: bytes, block: int) -> None:
        """Snapshot a just-published block's pool rows and queue it for writing."""
        if time.monotonic() < self._writes_paused_until:
            return  # the disk refused the last write: memory-only for now
        with self.lock:
            if h in self._files or h in self._pending:
                return
            self._pending.add(h)
        try:
            tensors = block_file.snapshot(self.storage, block)
        except Exception:  # the disk tier is an optimisation: never fail the engine step
            log.exception("snapshotting KV block %d for the disk tier failed", block)
            with self.lock:
                self._pending.discard(h)
            return
        self._queue.put((h, tensors))

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
                    size = block_file.write(self.path(h), h, self.identity, tensors, self._expected)
                except OSError as exc:  # full, read-only, gone: pause writing, keep serving
                    self.write_failures += 1
                    if time.monotonic() >= self._writes_paused_until:
                        log.warning("the KV disk tier cannot write to %s (%s); writes pause for %gs, the "
                                    "cache goes on in memory", self.dir, exc.strerror or exc, WRITE_PAUSE_S)
                    self._writes_paused_until = time.monotonic() + WRITE_PAUSE_S
                    with self.lock:
                        self._pending.discard(h)
                    continue
                except Exception:
                    log.exception("writing KV block %s to disk failed", h.hex())
                    with self.lock:
                        self._pending.discard(h)
                    continue
                with self.lock:
                    self._pending.discard(h)
                    if h not in self._files:
                        self._bytes += size
                    self._files[h] = size
                    self._files.move_to_end(h)
                    self.writes += 1
                    self._evict_over_cap()
            finally:
                self._queue.task_done()

    def _evict_over_cap(self) -> None:
        """Drop least recently used files while over the cap (lock held)."""
        while self._bytes > self.max_bytes and self._files:
            h, size = self._files.popitem(last=False)
            self._bytes -= size
            self.evictions += 1
            block_file.unlink(self.path(h))

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.read_ahead.close()
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # releases the lock
            self._dir_fd = None

    # ------------------------------------------------------------------ read-ahead
    @property
    def prefetch_enabled(self) -> bool:
        return self.read_ahead.enabled

    @prefetch_enabled.setter
    def prefetch_enabled(self, value: bool) -> None:
        self.read_ahead.enabled = value

    def prefetch(self, hashes: list[bytes], owner) -> None:
        self.read_ahead.prefetch(hashes, owner)

    def prefetching(self, owner) -> bool:
        return self.read_ahead.prefetching(owner)

    def release(self, owner) -> None:
        self.read_ahead.release(owner)

    def wait_prefetch(self) -> None:
        self.read_ahead.wait()

    # ------------------------------------------------------------------ load
    def load(self, h: bytes, block: int) -> bool:
        """Write the stored block `h` into pool block `block`; False (and the file removed
        when it is bad) if it cannot be trusted."""
        tensors = self.read_ahead.take(h)
        staged = tensors is not None
        if tensors is None:
            try:
                tensors = self.read(h)
            except FileNotFoundError:
                self.forget(h)
                return False
            except (CorruptBlock, OSError, ValueError, KeyError, TypeError) as exc:
                self.reject(h, exc)
                return False
        block_file.store(self.storage, block, tensors)
        with self.lock:
            if h in self._files:
                self._files.move_to_end(h)
            self.hits += 1
            if staged:
                self.prefetched += 1
        try:
            os.utime(self.path(h))
        except OSError:
            pass
        return True

    def read(self, h: bytes) -> list[np.ndarray]:
        return block_file.read(self.path(h), h, self.identity, self._expected)

    def reject(self, h: bytes, exc: Exception) -> None:
        """A bad file: delete it; counted once, whichever thread met it first."""
        log.warning("discarding KV block file %s: %s", self.path(h).name, exc)
        # Counted in the same step that takes it out of the index: whoever then finds it
        # missing (the engine thread, while the reader rejected it) also sees it counted.
        with self.lock:
            size = self._files.pop(h, None)
            if size is not None:
                self._bytes -= size
                self.rejected += 1
        block_file.unlink(self.path(h))

    def forget(self, h: bytes) -> None:
        """Drop `h` from the index (its file is gone already)."""
        with self.lock:
            size = self._files.pop(h, None)
            if size is not None:
                self._bytes -= size
