"""Give free pages back and read the heap's figures, for whichever malloc serves this process.

omlx.allocator_caches trims the heap after big frees and reports it in /health; what that
means depends on the allocator omlx.process_tuning put in place: glibc's `malloc_trim` and
`mallinfo2`, jemalloc's `mallctl` (purge every arena; its `stats.*` counters), or gperftools'
tcmalloc's `MallocExtension_*` (release free pages; its numeric properties).  Under an
allocator with no binding here the release is a no-op and no heap figures are reported, so
nothing false is.  The figures keep glibc's names so /health reads the same either way:
`arena_bytes` what the allocator has mapped for the heap, `in_use_bytes` what the program
holds, `free_bytes` mapped but not in use, `mmapped_bytes` mapped outside the arenas (glibc's
large chunks; jemalloc maps everything, so its mapped total).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from omlx.process_tuning import GLIBC, allocator_name, malloc_library

# jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" acts on every arena.
_JEMALLOC_ALL_ARENAS = 4096


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33: struct mallinfo2, every field a size_t.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class _Glibc:
    name = GLIBC
    releases = True

    def __init__(self, libc):
        self.libc = libc
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        self.has_stats = hasattr(libc, "mallinfo2")
        if self.has_stats:
            libc.mallinfo2.restype = _MallInfo2

    def release(self) -> None:
        self.libc.malloc_trim(0)

    def stats(self) -> dict | None:
        if not self.has_stats:
            return None
        info = self.libc.mallinfo2()
        return {"arena_bytes": int(info.arena), "in_use_bytes": int(info.uordblks),
                "free_bytes": int(info.fordblks), "mmapped_bytes": int(info.hblkhd)}


class _Jemalloc:
    name = "jemalloc"
    releases = True

    def __init__(self, process):
        self.mallctl = process.mallctl
        self.mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                 ctypes.c_void_p, ctypes.c_size_t]
        self.mallctl.restype = ctypes.c_int

    def _read(self, name: str) -> int | None:
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if self.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None  # a build without statistics
        return int(value.value)

    def release(self) -> None:
        self.mallctl(f"arena.{_JEMALLOC_ALL_ARENAS}.purge".encode(), None, None, None, 0)

    def stats(self) -> dict | None:
        epoch = ctypes.c_uint64(1)  # jemalloc's statistics are a snapshot refreshed by writing "epoch"
        self.mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
        mapped, allocated = self._read("stats.mapped"), self._read("stats.allocated")
        if mapped is None or allocated is None:
            return None
        return {"arena_bytes": mapped, "in_use_bytes": allocated, "free_bytes": max(0, mapped - allocated),
                "mmapped_bytes": mapped, "resident_bytes": self._read("stats.resident")}


class _Tcmalloc:
    name = "tcmalloc"
    releases = True

    def __init__(self, process):
        self.release_free = process.MallocExtension_ReleaseFreeMemory
        self.property = process.MallocExtension_GetNumericProperty
        self.property.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
        self.property.restype = ctypes.c_int

    def _read(self, name: str) -> int | None:
        value = ctypes.c_size_t(0)
        return int(value.value) if self.property(name.encode(), ctypes.byref(value)) else None

    def release(self) -> None:
        self.release_free()

    def stats(self) -> dict | None:
        heap, allocated = self._read("generic.heap_size"), self._read("generic.current_allocated_bytes")
        if heap is None or allocated is None:
            return None
        unmapped = self._read("tcmalloc.pageheap_unmapped_bytes") or 0  # counted in the heap, not resident
        return {"arena_bytes": heap, "in_use_bytes": allocated, "free_bytes": max(0, heap - unmapped - allocated),
                "mmapped_bytes": heap, "resident_bytes": heap - unmapped}


class _Unbound:
    """An allocator without a binding here: nothing released, nothing reported."""

    releases = False

    def __init__(self, name: str):
        self.name = name

    def release(self) -> None:
        pass

    def stats(self) -> dict | None:
        return None


def current():
    """The controls of the malloc that serves this process (None off Linux / without a C library)."""
    if not sys.platform.startswith("linux"):
        return None
    name = allocator_name(malloc_library())
    try:
        if name == "jemalloc":
            return _Jemalloc(ctypes.CDLL(None))
        if name == "tcmalloc":
            return _Tcmalloc(ctypes.CDLL(None))
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # "unknown": dladdr could not say; glibc's own malloc is the likely one where it has malloc_trim.
        if name in (GLIBC, "unknown") and hasattr(libc, "malloc_trim"):
            return _Glibc(libc)
    except (OSError, AttributeError):
        return None
    return _Unbound(name)
