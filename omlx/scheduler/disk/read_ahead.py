"""Reading a request's on-disk prefix ahead of its admission.

When a request arrives, `prefetch` hands the chain of its blocks that are on disk (not in
memory) to a reader thread, which reads and verifies each file into host memory (numpy only:
MLX arrays are made on the engine thread alone), in chain order, up to the first miss.  The
engine thread's `load` then only copies the staged rows into the pool; a block not staged
(yet) is read synchronously.  Staging is capped in bytes, and what a request does not use is
dropped once it is admitted, aborted or finished (or after `STAGING_TTL_S` regardless).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .block_file import CorruptBlock

log = logging.getLogger("omlx.disk_cache")

STAGING_BYTES = 512 << 20  # host memory the read-ahead may hold
STAGING_TTL_S = 120.0  # staged blocks nobody took by then are dropped


@dataclass
class _Staged:
    """A block read and verified ahead of its load (host memory)."""

    tensors: list
    nbytes: int
    owners: set = field(default_factory=set)
    since: float = field(default_factory=time.monotonic)


class ReadAhead:
    """The staging area and its reader thread, for one `DiskKVCache` (whose lock it shares:
    the cache's index and the staged blocks change together)."""

    def __init__(self, cache, staging_bytes: int = STAGING_BYTES):
        self.cache = cache
        self._lock = cache.lock
        self.enabled = True
        self.staging_bytes = staging_bytes
        self._staged: OrderedDict[bytes, _Staged] = OrderedDict()  # oldest first
        self.staged_nbytes = 0
        self._owners: dict[object, set[bytes]] = {}  # prefetching requests -> hashes staged for them
        self._reading_for: set = set()  # owners whose read-ahead is queued or under way
        self._reading: bytes | None = None  # the block the reader is reading now
        self._done = threading.Condition(self._lock)  # a read finished
        self._queue: queue.Queue = queue.Queue()
        self.reads = 0  # blocks the reader staged
        self.dropped = 0  # staged blocks dropped unused
        self._thread = threading.Thread(target=self._reader, name="omlx-kv-prefetch", daemon=True)
        self._thread.start()

    @property
    def num_staged(self) -> int:
        return len(self._staged)

    # ------------------------------------------------------------------ engine thread
    def prefetch(self, hashes: list[bytes], owner) -> None:
        """Have the reader stage the blocks `hashes` (a prefix chain, in order) for the
        request `owner`, until the first that is missing or bad."""
        if not self.enabled or not hashes:
            return
        with self._lock:
            self._expire()
            self._owners.setdefault(owner, set())
            self._reading_for.add(owner)
        self._queue.put((owner, list(hashes)))

    def prefetching(self, owner) -> bool:
        """Whether `owner`'s read-ahead is still queued or under way."""
        if not self._reading_for:
            return False
        with self._lock:
            return owner in self._reading_for

    def release(self, owner) -> None:
        """`owner` needs its staged blocks no more (it was admitted, or it ended): stop its
        read-ahead and drop what only it was waiting for."""
        if owner not in self._owners:
            return
        with self._lock:
            self._reading_for.discard(owner)
            for h in self._owners.pop(owner, None) or ():
                entry = self._staged.get(h)
                if entry is not None:
                    entry.owners.discard(owner)
                    if not entry.owners:
                        self._drop(h)

    def take(self, h: bytes) -> list | None:
        """The staged tensors of block `h` (waiting if the reader is reading it right now),
        or None when it is not staged."""
        if not self._staged and self._reading is None:
            return None
        with self._lock:
            deadline = time.monotonic() + 5.0
            while self._reading == h and time.monotonic() < deadline:
                self._done.wait(0.5)  # being read ahead right now: no second read
            entry = self._staged.pop(h, None)
            if entry is None:
                return None
            self.staged_nbytes -= entry.nbytes
            return entry.tensors

    def wait(self) -> None:
        """Wait until every queued read-ahead has been staged (or given up)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        with self._lock:
            self._owners.clear()
            self._reading_for.clear()
            while self._staged:
                self._drop(next(iter(self._staged)))

    # ------------------------------------------------------------------ lock held
    def _drop(self, h: bytes) -> None:
        entry = self._staged.pop(h)
        self.staged_nbytes -= entry.nbytes
        self.dropped += 1

    def _expire(self) -> None:
        """Drop staged blocks nobody took in time."""
        limit = time.monotonic() - STAGING_TTL_S
        while self._staged:
            h, entry = next(iter(self._staged.items()))
            if entry.since > limit:
                return
            for owner in entry.owners:
                self._owners.get(owner, set()).discard(h)
            self._drop(h)

    # ------------------------------------------------------------------ reader thread
    def _reader(self) -> None:
        while True:
            item = self._queue.get()
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
                        self._done.notify_all()
            finally:
                self._queue.task_done()

    def _read_ahead(self, owner, hashes: list[bytes]) -> None:
        cache = self.cache
        for h in hashes:
            with self._lock:
                self._expire()
                mine = self._owners.get(owner)
                if mine is None:
                    return  # released: admitted or ended meanwhile
                entry = self._staged.get(h)
                if entry is not None:  # staged for another request too
                    entry.owners.add(owner)
                    mine.add(h)
                    continue
                size = cache.size_of(h)
                if size is None or self.staged_nbytes + size > self.staging_bytes:
                    return  # the chain ends here (or staging is full: the rest loads as before)
                self._reading = h
            tensors = None
            try:
                tensors = cache.read(h)
            except FileNotFoundError:
                cache.forget(h)
            except (CorruptBlock, OSError, ValueError, KeyError, TypeError) as exc:
                cache.reject(h, exc)
            with self._lock:
                self._reading = None
                self._done.notify_all()
                mine = self._owners.get(owner)
                if tensors is None or mine is None:
                    return
                nbytes = sum(t.nbytes for t in tensors)
                self._staged[h] = _Staged(tensors, nbytes, {owner})
                self.staged_nbytes += nbytes
                mine.add(h)
                self.reads += 1
