"""Build omlx's CPU kernels (MLX C++ extensions) against the installed MLX.

MLX's C++ ABI changes with every release, so the extensions are built on the machine that
runs them, against the exact `mlx` installed there (`scripts/setup.sh` runs this), and a
stamp next to each records that version and its sources: after an MLX upgrade (or a source
change) the stale build is ignored (omlx falls back to the portable path and says so) until
this runs again.  Each module target builds on its own: one that fails to compile leaves the
others usable.

    python -m omlx.kernels.build [--force] [MODULE ...]

Needs cmake, a C++20 compiler and nanobind (the same major version MLX was built with).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

KERNEL_DIR = Path(__file__).resolve().parent
SOURCE_DIR = KERNEL_DIR / "cpu"
ATTENTION = "_paged_attention_cpu"
# Each module target of cpu/CMakeLists.txt and the prefix of its source files (its stamp covers
# those and SHARED_SOURCES).  Append a line here with each new omlx_kernel(...) target.
MODULES: dict[str, str] = {
    ATTENTION: "paged_attention",
    "_linear_cpu": "linear_",
    "_quant_linear_cpu": "quant_linear",
    "_quant_bf16_cpu": "quant_bf16",
    "_fused_ops_cpu": "fused_ops",
}
# Sources every module builds with (cpu/common.h is included by each module's .cpp;
# cpu/bf16_panel.h and cpu/spin_pool*.h by the two bf16 panel kernels), so each module's stamp covers them too.
SHARED_SOURCES = ("CMakeLists.txt", "common.h", "bf16_panel.h", "spin_pool.h", "spin_pool_bindings.h")
MODULE = ATTENTION  # the attention kernel, for callers that predate several modules
STAMP = KERNEL_DIR / f"{ATTENTION}.stamp"


def stamp_path(module: str = ATTENTION) -> Path:
    return KERNEL_DIR / f"{module}.stamp"


def built_module(module: str = ATTENTION) -> Path | None:
    found = sorted(KERNEL_DIR.glob(f"{module}*.so"))
    return found[0] if found else None


def stamp_text(module: str = ATTENTION) -> str:
    """What a module's build depends on: the MLX version and its sources' content."""
    prefix = MODULES[module]
    digest = hashlib.sha256()
    for source in sorted(SOURCE_DIR.iterdir()):
        if source.is_file() and (source.name.startswith(prefix) or source.name in SHARED_SOURCES):
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return f"mlx={mx.__version__} source={digest.hexdigest()[:16]}\n"


def is_current(module: str = ATTENTION) -> bool:
    stamp = stamp_path(module)
    return built_module(module) is not None and stamp.exists() and stamp.read_text() == stamp_text(module)


def arch_flags() -> str:
    # Built where it runs: use that CPU's vector units.  OMLX_KERNEL_ARCH overrides
    # (e.g. "-mavx2 -mfma" for a build shared between machines).
    return os.environ.get("OMLX_KERNEL_ARCH", "-march=native")


def cmake() -> str:
    venv_cmake = Path(sys.executable).with_name("cmake")
    if venv_cmake.exists():
        return str(venv_cmake)
    found = shutil.which("cmake")
    if not found:
        raise RuntimeError("cmake not found (pip install cmake, or apt-get install cmake)")
    return found


def build(force: bool = False, quiet: bool = False, modules: list[str] | None = None) -> dict[str, Path]:
    """Build each stale module (all of MODULES by default); raise if any failed, after
    installing the ones that built."""
    wanted = [m for m in (modules or list(MODULES)) if force or not is_current(m)]
    done = {m: built_module(m) for m in (modules or list(MODULES)) if m not in wanted}
    failures: dict[str, str] = {}
    if wanted:
        with tempfile.TemporaryDirectory(prefix="omlx-kernels-") as work:
            out = Path(work) / "out"
            configure = [
                cmake(), "-S", str(SOURCE_DIR), "-B", work, f"-DPython_EXECUTABLE={sys.executable}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DOMLX_ARCH_FLAGS={arch_flags()}",
                "-DCMAKE_BUILD_TYPE=Release",
            ]
            _run(configure)
            jobs = str(os.cpu_count() or 1)
            for module in wanted:
                try:
                    _run([cmake(), "--build", work, "-j", jobs, "--target", module])
                    built = sorted(out.glob(f"{module}*.so"))
                    if not built:
                        raise RuntimeError("the build produced no module")
                except RuntimeError as exc:
                    failures[module] = str(exc)
                    built = []
                # A module that failed to build is removed, not left stale beside a new stamp.
                for old in KERNEL_DIR.glob(f"{module}*.so"):
                    old.unlink()
                stamp_path(module).unlink(missing_ok=True)
                if not built:
                    continue
                target = KERNEL_DIR / built[0].name
                shutil.copy2(built[0], target)
                stamp_path(module).write_text(stamp_text(module))
                done[module] = target
                if not quiet:
                    print(f"built {target} for mlx {mx.__version__}")
    if failures:
        raise RuntimeError("; ".join(f"{m}: {why}" for m, why in failures.items()))
    return done


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the build is current")
    parser.add_argument("modules", nargs="*", help=f"only these modules (of {', '.join(MODULES)})")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    try:
        build(force=args.force, modules=args.modules or None)
    except Exception as exc:
        print(f"omlx kernels: build failed, the portable path runs where a kernel is missing: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
