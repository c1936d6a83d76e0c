"""--quantized-kv-start: decode throughput of 32 sequences on bench-200m, in-process, with
the threshold above their length (all stay in the float pool), below it (all moved to the
quantized pool), and half and half (both pools in each forward pass), against plain 8-bit KV
(one quantized pool) and float KV; plus the cost of a step where all 32 sequences move.

Every configuration's engine is built and prefilled first, then their decode steps are
interleaved (one step of each in turn), so a machine shared with other work slows them alike.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
    python bench/quantized_kv_start_bench.py [--context 96] [--steps 20] [--only 0,1,2,3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402


def prefilled_engine(model, prompts, bits, start, max_tokens):
    blocks = len(prompts) * -(-(max(map(len, prompts)) + max_tokens) // 32) + 2
    engine = LLMEngine(model, EngineConfig(block_size=32, num_blocks=blocks, num_float_blocks=blocks,
                                           max_num_batched_tokens=4096, kv_bits=bits, quantized_kv_start=start), 8192)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), p, max_tokens))
    first = set()
    while len(first) < len(prompts):
        first.update(rid for rid, e in engine.step() if e.token_id is not None)
    return engine


def migration_cost(model, prompts, steps):
    """Median decode step before, the step in which every sequence moves, and after."""
    start = len(prompts[0]) + steps // 2
    engine = prefilled_engine(model, prompts, 8, start, 2 * steps)
    times, moved_at = [], None
    for k in range(steps):
        before = engine.scheduler.num_migrations
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
        if engine.scheduler.num_migrations > before:
            moved_at = k
    assert moved_at is not None
    return (statistics.median(times[:moved_at]) * 1e3, times[moved_at] * 1e3,
            statistics.median(times[moved_at + 1 :]) * 1e3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(HERE / "models" / "bench-200m"))
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--context", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    parser.add_argument("--only", help="comma-separated configuration numbers (0-6)")
    args = parser.parse_args()
    model, _ = load(args.model)
    rng = np.random.default_rng(0)
    n = args.context
    prompts = [rng.integers(5, model.args.vocab_size, n).tolist() for _ in range(args.seqs)]
    # Every other sequence twice as long, the threshold between: half float, half quantized
    # for the whole timed window.
    mixed = [p + (rng.integers(5, 1000, n).tolist() if i % 2 else []) for i, p in enumerate(prompts)]
    configs = [
        ("float", prompts, None, 0),
        ("8-bit", prompts, 8, 0),
        ("8-bit, start above length", prompts, 8, 4096),
        ("8-bit, start below length", prompts, 8, n // 2),
        ("float, half/half prompts", mixed, None, 0),
        ("8-bit, half/half prompts", mixed, 8, 0),
        ("8-bit, start between: half float, half quantized", mixed, 8, n * 5 // 3),
    ]
    if args.only:
        configs = [configs[int(i)] for i in args.only.split(",")]
    max_tokens = 2 * args.steps + 64  # nobody finishes inside the timed window
    engines = [prefilled_engine(model, ps, bits, start, max_tokens) for _, ps, bits, start in configs]
    times = [[] for _ in configs]
    for _ in range(args.steps):
        for engine, ts in zip(engines, times):
            t = time.perf_counter()
            engine.step()
            ts.append(time.perf_counter() - t)
    print("| KV | decode tok/s | median step ms | seqs in float pool |\n|---|---|---|---|")
    for (name, *_), engine, ts in zip(configs, engines, times):
        assert len(engine.scheduler.running) == args.seqs
        in_float = sum(1 for s in engine.scheduler.running if s.in_float_pool)
        step = statistics.median(ts)
        print(f"| {name} | {args.seqs / step:.1f} | {step * 1e3:.0f} | {in_float} |")
    del engines
    mx.clear_cache()
    before, moving, after = migration_cost(model, prompts, args.steps)
    print(f"\nall {args.seqs} sequences moving at {n + args.steps // 2} tokens: decode step {before:.0f} ms "
          f"before (float), {moving:.0f} ms while moving, {after:.0f} ms after (8-bit)")


if __name__ == "__main__":
    main()
