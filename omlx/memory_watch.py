"""How much memory this process holds and the machine has left, and whether that is tight.

Read from /proc on Linux (and `resource` for the peak elsewhere); cheap enough to read on
every /health and every admission.  The pressure threshold: a machine whose available
memory falls below `RESERVE_FRACTION` of its total (or `RESERVE_FLOOR_BYTES`, whichever is
smaller) is about to swap or meet the OOM killer, so new generation requests are refused
with a clear 503 there instead of being run into a crash (see omlx.api.admission).
"""

from __future__ import annotations

import os
import resource
import sys

from omlx.allocator_caches import allocator_stats, resident_bytes

RESERVE_FRACTION = 0.05
RESERVE_FLOOR_BYTES = 1 << 30


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def process_memory() -> dict:
    """This process: pid, resident bytes now and at peak, and what its allocators hold."""
    rss = resident_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    out = {"pid": os.getpid(), "rss_bytes": rss, "peak_rss_bytes": max(peak, rss or 0)}
    mlx = sys.modules.get("mlx.core")  # only once something has imported it
    if mlx is not None:
        # MLX's own view: arrays alive, and freed buffers its allocator keeps for reuse
        # (counted in the RSS, bounded by its cache limit).
        out["mlx_active_bytes"] = mlx.get_active_memory()
        out["mlx_cache_bytes"] = mlx.get_cache_memory()
    # Freed memory the allocators keep (MLX's cache, malloc's free lists): each with its bound
    # and what has been given back (see omlx.allocator_caches).
    out["allocator_caches"] = allocator_stats()
    return out


def machine_memory(reserve: int | None = None) -> dict:
    """The machine: total and available bytes, and whether available is below the reserve
    (`reserve` bytes, or the default rule)."""
    info = _meminfo()
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None or available is None:
        return {"total_bytes": total, "available_bytes": available, "reserve_bytes": None, "pressure": False}
    reserve = reserve_bytes(total) if reserve is None else reserve
    return {"total_bytes": total, "available_bytes": available, "reserve_bytes": reserve,
            "pressure": available < reserve}


def reserve_bytes(total: int) -> int:
    return min(int(total * RESERVE_FRACTION), RESERVE_FLOOR_BYTES)
