"""One process at a time over a file-backed step: tests run by several pytest-xdist workers (or
two runs on one machine) share expensive products (a converted model folder, a float32
reference) in one folder, and the first process to need one makes it while the others wait
for it instead of making it again."""

from __future__ import annotations

import contextlib
from pathlib import Path

try:
    import fcntl
except ImportError:  # no flock (Windows): each process makes its own copy; the writes are atomic
    fcntl = None


@contextlib.contextmanager
def exclusive(lock_path: str | Path):
    """Hold an exclusive `flock` on `lock_path` (created if missing) for the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
