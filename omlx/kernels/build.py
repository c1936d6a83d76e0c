"""Build omlx's CPU attention kernel (an MLX C++ extension) against the installed MLX.

MLX's C++ ABI changes with every release, so the extension is built on the machine that
runs it, against the exact `mlx` installed there (`scripts/setup.sh` runs this), and a
stamp next to it records that version: after an MLX upgrade the stale build is ignored
(omlx falls back to the portable path and says so) until this runs again.

    python -m omlx.kernels.build [--force]

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
MODULE = "_paged_attention_cpu"
STAMP = KERNEL_DIR / f"{MODULE}.stamp"


def built_module() -> Path | None:
    found = sorted(KERNEL_DIR.glob(f"{MODULE}*.so"))
    return found[0] if found else None


def stamp_text() -> str:
    """What a build depends on: the MLX version and the sources' content."""
    digest = hashlib.sha256()
    for source in sorted(SOURCE_DIR.iterdir()):
        if source.is_file():
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return f"mlx={mx.__version__} source={digest.hexdigest()[:16]}\n"


def is_current() -> bool:
    return built_module() is not None and STAMP.exists() and STAMP.read_text() == stamp_text()


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


def build(force: bool = False, quiet: bool = False) -> Path:
    if is_current() and not force:
        return built_module()
    with tempfile.TemporaryDirectory(prefix="omlx-kernels-") as work:
        out = Path(work) / "out"
        configure = [
            cmake(), "-S", str(SOURCE_DIR), "-B", work, f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DOMLX_ARCH_FLAGS={arch_flags()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = str(os.cpu_count() or 1)
        for command in (configure, [cmake(), "--build", work, "-j", jobs]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command[:2])} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        built = sorted(out.glob(f"{MODULE}*.so"))
        if not built:
            raise RuntimeError("the build produced no module")
        for old in KERNEL_DIR.glob(f"{MODULE}*.so"):
            old.unlink()
        target = KERNEL_DIR / built[0].name
        shutil.copy2(built[0], target)
    STAMP.write_text(stamp_text())
    if not quiet:
        print(f"built {target} for mlx {mx.__version__}")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the build is current")
    args = parser.parse_args()
    try:
        build(force=args.force)
    except Exception as exc:
        print(f"omlx kernels: build failed, the portable attention path will be used: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
