"""Which malloc this process runs on, chosen before it starts, and what actually serves it.

A decode step builds and frees thousands of small objects (MLX's array descriptors, shape
vectors, graph nodes) on the engine thread and MLX's stream thread, and many are freed by the
thread that did not allocate them; glibc's malloc (`_int_malloc`, `malloc_consolidate`,
`unlink_chunk`) took 4-10% of a one-row step's CPU samples here.  tcmalloc, a thread-caching
allocator, measured a ~10% shorter one-row step than glibc and no loss at 32 rows; jemalloc,
mimalloc and glibc's own tunables measured worse (bench/decode_step_env.py, figures in
bench/README.md).  An allocator replaces malloc only when it is preloaded at process start,
so `omlx.blas.ensure_optimized_blas`, which already re-executes the server with OpenBLAS
preloaded, adds it to the same LD_PRELOAD (`start_preloads`).

`OMLX_ALLOCATOR` picks: `auto` (default: `AUTO_ALLOCATOR` where its Debian package is
installed, else glibc, said in the log), `glibc` (today's malloc, untouched), a name in
`ALLOCATORS`, or a path to an allocator library.  `allocator_info()` reports what serves
`malloc` in this process, read from the symbol itself (dladdr), not from what was asked for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("omlx.process_tuning")

ALLOCATOR_ENV = "OMLX_ALLOCATOR"
GLIBC = "glibc"


@dataclass(frozen=True)
class AllocatorLibrary:
    name: str
    soname: str
    debian_package: str


ALLOCATORS: dict[str, AllocatorLibrary] = {
    lib.name: lib for lib in (
        AllocatorLibrary("jemalloc", "libjemalloc.so.2", "libjemalloc2"),
        AllocatorLibrary("tcmalloc", "libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
        AllocatorLibrary("mimalloc", "libmimalloc.so.2", "libmimalloc2.0"),
    )
}
# The measured winner (bench/README.md, "The process's allocator and thread wake-ups").
AUTO_ALLOCATOR = "tcmalloc"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def requested_allocator() -> str:
    return (os.environ.get(ALLOCATOR_ENV) or "auto").strip() or "auto"


def find_allocator_library(name: str) -> str | None:
    """Path of a known allocator's library on this machine, or None."""
    library = ALLOCATORS.get(name)
    if library is None:
        return None
    for folder in LIBRARY_DIRS:
        path = os.path.join(folder, library.soname)
        if os.path.isfile(path):
            return path
    return None


def allocator_to_preload() -> tuple[str | None, str]:
    """(the library to preload at start, or None for glibc's malloc; why)."""
    if not sys.platform.startswith("linux"):
        return None, "the allocator is only swapped on Linux"
    requested = requested_allocator()
    if requested == GLIBC:
        return None, f"{ALLOCATOR_ENV}=glibc"
    if os.sep in requested:  # a library path
        if os.path.isfile(requested):
            return requested, f"{ALLOCATOR_ENV}={requested}"
        return None, f"{ALLOCATOR_ENV}={requested} does not exist; glibc's malloc runs"
    name = AUTO_ALLOCATOR if requested == "auto" else requested
    if name not in ALLOCATORS:
        return None, (f"{ALLOCATOR_ENV}={requested} is not one of auto, glibc, "
                      f"{', '.join(ALLOCATORS)} or a library path; glibc's malloc runs")
    path = find_allocator_library(name)
    if path is None:
        return None, (f"{name} is not installed (apt-get install {ALLOCATORS[name].debian_package}); "
                      "glibc's malloc runs")
    return path, f"{ALLOCATOR_ENV}={requested}"


def start_preloads() -> list[str]:
    """Libraries this process should have preloaded (for omlx.blas's re-exec); logs why
    when the allocator asked for is not available."""
    path, why = allocator_to_preload()
    if path is None and requested_allocator() != GLIBC and sys.platform.startswith("linux"):
        log.warning("allocator: %s", why)
    running = malloc_library()
    if path and running and allocator_name(running) not in (GLIBC, "unknown") and requested_allocator() == "auto":
        return []  # the user preloaded an allocator of their own: theirs stays in charge
    return [path] if path else []


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def malloc_library() -> str | None:
    """The file whose `malloc` this process calls (what the dynamic linker bound it to)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError):
        return None


def allocator_name(library: str | None) -> str:
    """glibc, a name in ALLOCATORS, or the library's file name for another allocator."""
    if library is None:
        return "system" if not sys.platform.startswith("linux") else "unknown"
    base = os.path.basename(library)
    if base.startswith("libc.so") or base.startswith("libc-"):
        return GLIBC
    for lib in ALLOCATORS.values():
        if base.startswith(lib.soname.split(".so")[0] + ".so"):
            return lib.name
    return base


def allocator_info() -> dict:
    """For /health and the start-up log: the malloc that runs, from where, what was asked."""
    library = malloc_library()
    name = allocator_name(library)
    info = {"name": name, "library": library, "requested": requested_allocator()}
    wanted, why = allocator_to_preload()
    if wanted is None:
        info["reason"] = why
    elif not (library and os.path.realpath(wanted) == library):
        # Asked for but not serving malloc: the user preloaded another allocator, or the process
        # started without omlx's re-exec (e.g. OMLX_NO_BLAS_REEXEC).
        info["reason"] = (f"{name} was preloaded by the user" if name not in (GLIBC, "unknown")
                          else f"{wanted} is not preloaded in this process")
    return info


def tuning_info() -> dict:
    """For /health (`compute.process_tuning`): the allocator that runs, and the OpenMP wait
    policy our kernels' threads run with (omlx.kernels sets PASSIVE before libgomp loads, where
    the user has not set one: spinning threads measured no faster and far worse under load)."""
    return {"allocator": allocator_info(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "libgomp default"}


def log_allocator() -> dict:
    info = tuning_info()
    allocator = info["allocator"]
    log.info("allocator: %s%s%s; OpenMP wait policy: %s", allocator["name"],
             f" ({allocator['library']})" if allocator["library"] else "",
             f" ({allocator['reason']})" if allocator.get("reason") else "", info["omp_wait_policy"])
    return info


__all__ = ["ALLOCATORS", "ALLOCATOR_ENV", "AUTO_ALLOCATOR", "allocator_info", "allocator_name",
           "allocator_to_preload", "find_allocator_library", "log_allocator", "malloc_library",
           "requested_allocator", "start_preloads", "tuning_info"]
