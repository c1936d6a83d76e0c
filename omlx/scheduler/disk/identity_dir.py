"""The directory of one model identity under the disk tier's root.

A model identity is everything that decides whether a stored block fits an engine's pool:
the model's scope (its content, see omlx.models.content_hash) and the pool's layout (KV
dtype and quantization, block size, layers, heads, head dims).  Its directory holds
`identity.json` (the model's readable label, that layout, when it was created and last
opened) next to the block files.  An engine holds a shared `flock` on its directory while
open.  On opening, directories of the same label but another identity (the weights, KV bits
or block size changed: they can never be hit again) are removed, as are identity-named
directories without metadata whose files are all older than `STALE_AFTER_S` (left by older
versions) - never a directory another engine holds, nor one holding anything but our files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from .block_file import BLOCK_FILE, TEMP_FILE, unlink

try:
    import fcntl
except ImportError:  # no flock (Windows): directories are not locked, and none is collected
    fcntl = None

log = logging.getLogger("omlx.disk_cache")

IDENTITY_FILE = "identity.json"
_IDENTITY_FORMAT = "omlx-kv-identity-1"
_IDENTITY_NAME = re.compile(r"[0-9a-f]{24}")
# An identity directory without metadata (written before it existed) whose files are all
# this old is collected: a live engine of any version touches its files when it uses them.
STALE_AFTER_S = 30 * 86400


def layout_fields(storage) -> dict:
    layout = storage.layout
    return {
        "dtype": str(layout.dtype), "kv_bits": storage.kv_bits, "group_size": storage.group_size,
        "block_size": storage.block_size, "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads, "key_dim": layout.key_dim, "value_dim": layout.value_dim,
    }


def model_identity(scope: bytes, storage) -> str:
    """Hex id of everything that decides whether a stored block fits this engine's pool."""
    parts = [scope.hex()] + [str(v) for v in layout_fields(storage).values()]
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


def open_locked(directory: Path) -> int | None:
    """Create the identity directory and hold a shared lock on it (an fd, None without
    flock), so that no other engine collects it while this one uses it."""
    if fcntl is None:
        directory.mkdir(parents=True, exist_ok=True)
        return None
    deadline = time.monotonic() + 10.0
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # being collected right now: wait for it to go
            os.close(fd)
            if time.monotonic() > deadline:
                log.warning("KV disk cache %s stays locked; using it unlocked", directory)
                directory.mkdir(parents=True, exist_ok=True)
                return None
            time.sleep(0.02)
            continue
        except OSError as exc:  # a filesystem without flock
            log.warning("cannot lock KV disk cache %s (%s); old directories stay", directory, exc)
            return fd
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(directory))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # collected while we waited: make it anew


def write_identity(directory: Path, identity: str, label: str, scope: bytes, storage) -> None:
    now = time.time()
    old = read_identity(directory)
    doc = {
        "format": _IDENTITY_FORMAT,
        "identity": identity,
        "label": label,
        "scope": scope.decode("utf-8", "backslashreplace"),
        "layout": layout_fields(storage),
        "created": old["created"] if old and isinstance(old.get("created"), (int, float)) else now,
        "last_used": now,
    }
    path = directory / IDENTITY_FILE
    tmp = directory / f".{IDENTITY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
        unlink(tmp)


def read_identity(directory: Path) -> dict | None:
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


def collect_garbage(root: Path, identity: str, label: str, stale_after_s: float) -> tuple[int, int]:
    """Remove sibling identity directories that can never be hit again (see the module doc):
    only directories named like ours, holding only our files, and not locked.  Returns
    (directories, bytes) removed."""
    removed_dirs = removed_bytes = 0
    for entry in os.scandir(root):
        name = entry.name
        if name == identity or not _IDENTITY_NAME.fullmatch(name):
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        meta = read_identity(Path(entry.path))
        if meta is not None:
            if meta["label"] != label:
                continue  # another model's
            why, max_mtime = f"'{label}' now uses {identity}", None
        else:
            why, max_mtime = "no metadata, unused for long", time.time() - stale_after_s
        removed = _remove_identity_dir(Path(entry.path), max_mtime)
        if removed is None:
            continue
        files, nbytes = removed
        removed_dirs += 1
        removed_bytes += nbytes
        log.info("removed KV disk cache directory %s (%d files, %.1f MiB): %s",
                 entry.path, files, nbytes / 2**20, why)
    return removed_dirs, removed_bytes


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
            if name != IDENTITY_FILE and not BLOCK_FILE.fullmatch(name) and not TEMP_FILE.fullmatch(name):
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
