"""Which processes are the ranks of an `mlx.launch` group (tests of omlx/distributed)."""

from __future__ import annotations

import os
from pathlib import Path


def rank_pids(session: int) -> dict[int, int]:
    """Rank -> pid of each rank's Python process in the process group `session` (the
    launcher's pid), read from the MLX_RANK in its environment."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != session:
                continue
            command = (entry / "cmdline").read_bytes()
            if b"omlx" not in command or b"python" not in command:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        for item in environ:
            if item.startswith(b"MLX_RANK="):
                ranks[int(item[9:])] = int(entry.name)
    return ranks
