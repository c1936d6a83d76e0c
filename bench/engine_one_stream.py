#!/usr/bin/env python
"""One stream's decode through `LLMEngine` alone, in-process: the engine's own tok/s for a
model folder in the weight form the server would choose, without the HTTP server around it.

    OMLX_MATMUL=auto python bench/engine_one_stream.py --model bench/models/smollm2-135m-f32
    OMLX_MATMUL=auto python bench/engine_one_stream.py --model ~/.omlx/cache/gguf/<digest>-v3

Compare with the served figure (bench/llama_cpp_bench.py, one client) to split a stream's
per-token time between the engine step and the serving path around it.
"""

from __future__ import annotations

import argparse
import sys
import time

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

from omlx.models import weight_form  # noqa: E402
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefix-cache", action="store_true")
    parser.add_argument("--blocks", type=int, default=0, help="KV pool blocks of 32 tokens (default: just enough)")
    args = parser.parse_args()
    model, _ = load(args.model)
    form = weight_form.apply(model, None, 8 << 30)
    prompt = np.random.default_rng(0).integers(10, 30000, size=args.prompt_tokens).tolist()
    blocks = args.blocks or -(-(args.prompt_tokens + args.tokens + 16) // 32) + 4
    engine = LLMEngine(model, EngineConfig(block_size=32, num_blocks=blocks, max_num_seqs=1,
                                           max_num_batched_tokens=2048, prefix_cache=args.prefix_cache), 16384)
    engine.add_request(GenerationRequest("one", prompt, max_tokens=args.tokens + 6))
    for _ in range(6):  # prefill, then a few warm decode steps
        engine.step()
    start, produced = time.perf_counter(), 0
    while engine.has_work:
        produced += sum(1 for _, event in engine.step() if event.token_id is not None)
    elapsed = time.perf_counter() - start
    print(f"{args.model}: form {form}, {produced / elapsed:.1f} tok/s ({elapsed / produced * 1e3:.1f} ms a token)")


if __name__ == "__main__":
    main()
