"""What the CPU's vector and matrix units can do, read once at start.

The machines omlx runs on differ (Intel Xeons with AMX, AMD EPYCs with AVX-512 and
AVX512-BF16, laptops with AVX2 only, ARM), so the matmul path is chosen at run time from
the CPU's own feature flags: Linux's /proc/cpuinfo (the kernel's view of cpuid, which also
reflects what a hypervisor passes through).  Elsewhere nothing is assumed.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags and "avx512f" in self.flags

    @property
    def avx512_vnni(self) -> bool:
        return "avx512_vnni" in self.flags and "avx512f" in self.flags

    @property
    def bf16_isa(self) -> str | None:
        """The best bf16 dot-product unit, or None when there is none."""
        if self.amx_bf16:
            return "amx_bf16"
        if self.avx512_bf16:
            return "avx512_bf16"
        return None

    def summary(self) -> str:
        known = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")
        return ", ".join(f for f in known if f in self.flags) or "no x86 vector extensions"


def parse_cpuinfo(text: str) -> CpuFeatures:
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 and ARM spell it differently
            flags = frozenset(value.split())
    return CpuFeatures(model or platform.processor() or platform.machine(), flags)


@functools.lru_cache(maxsize=None)
def cpu_features() -> CpuFeatures:
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return CpuFeatures(platform.processor() or platform.machine(), frozenset())
