"""What a model *is*, by content: hashes of its files' bytes, remembered per file version.

The KV disk tier and the GGUF conversion cache key on a model's content, not on where it
lives: a model moved, renamed or re-mounted keeps its cache, and one overwritten in place
never reads blocks computed for the old weights.  Hashing a multi-GB file takes seconds, so
each file's hash is remembered in an index per file version: it is computed once per
file version, and again only after the file changes or moves (its path, size, mtime, ctime
or inode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("omlx.models")

_index_lock = threading.Lock()

# Files that decide what a folder computes: weights, configs, tokenizer and chat template.
_MODEL_FILES = (".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken")


def default_index_dir() -> Path:
    from omlx.settings import omlx_home

    return omlx_home() / "cache"


def file_hash(path: str | Path, index_dir: str | Path | None = None) -> str:
    """blake2b of the file's bytes (hex), remembered in `index_dir/hashes.json`."""
    path = Path(path)
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
    st = path.stat()
    # ctime too: unlike mtime no tool can set it back, so bytes rewritten in place (and an
    # mtime restored after) always count as a new version.
    key = f"{path.resolve()}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    index_path = index_dir / "hashes.json"
    with _index_lock:
        index = _read_index(index_path)
        if isinstance(index.get(key), str):
            return index[key]
    started = time.monotonic()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    elapsed = time.monotonic() - started
    if elapsed > 1.0:
        log.info("hashed %s (%.1f GiB) in %.1fs; remembered until it changes", path.name,
                 st.st_size / 2**30, elapsed)
    with _index_lock:
        index = _read_index(index_path)  # another process may have added entries meanwhile
        index[key] = value
        index_dir.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    return value


def _read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def folder_fingerprint(*folders, index_dir: str | Path | None = None) -> bytes:
    """The content of the model files in `folders` (names relative to each folder, and
    bytes), as one hex digest.  Missing folders (no adapter) count as empty."""
    digest = hashlib.blake2b(digest_size=16)
    for number, folder in enumerate(folders):
        digest.update(f"[{number}]".encode())
        if not folder:
            continue
        root = Path(folder).expanduser()
        try:
            files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _MODEL_FILES)
        except OSError:
            continue
        for path in files:
            try:
                digest.update(f"{path.name}={file_hash(path, index_dir)};".encode())
            except OSError:
                continue
    return digest.hexdigest().encode()
