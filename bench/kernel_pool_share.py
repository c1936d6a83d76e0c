#!/usr/bin/env python
"""One stream's decode steps with the weight kernels' worker pool at several spin settings, in
one process (omlx/kernels/cpu/spin_pool.h; `set_spin_us` switches it between turns, 0 is
OpenMP's sleeping threads), and the share of the pool's panels the worker ran.

    OMLX_MATMUL=auto python bench/kernel_pool_share.py --model ~/.omlx/cache/gguf/<digest>-v3 [--spins 0,30,100,300]

Settings take turns question by question (`--rounds` times each, `--tokens` a turn), so the
load other processes put on the machine falls on all alike; prints each turn's median step and
worker share, then each setting's median and p10 over all its turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_one_stream import decode  # noqa: E402
from mlx_lm import load  # noqa: E402

from omlx.kernels import linear, quant_bf16  # noqa: E402
from omlx.models import weight_form  # noqa: E402
from omlx.scheduler import EngineConfig, LLMEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--spins", default="0,30,100,300")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--overlap", choices=["on", "off"], default="on", help="overlapped decode steps (as served)")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    form = weight_form.apply(model, None, 8 << 30)
    engine = LLMEngine(model, EngineConfig(block_size=32, num_blocks=64, max_num_seqs=1, max_num_batched_tokens=2048,
                                           prefix_cache=False, speculative=False,
                                           overlap_steps=args.overlap == "on"), 16384)
    modules = [quant_bf16.kernel(), linear.kernel()]
    spins = [int(v) for v in args.spins.split(",")]
    steps: dict[int, list[float]] = {spin: [] for spin in spins}
    print(f"{args.model}: form {form}, overlap {args.overlap}")
    for round_ in range(args.rounds):
        for spin in spins:
            for module in modules:
                module.set_spin_us(spin)
            before = [module.pool_stats() for module in modules]
            taken, _ = decode(engine, tokenizer, "Why is the sky blue?", f"r{round_}-{spin}", args.tokens)
            after = [module.pool_stats() for module in modules]
            worker = sum(a["worker_tasks"] - b["worker_tasks"] for a, b in zip(after, before))
            tasks = sum(a["tasks"] - b["tasks"] for a, b in zip(after, before))
            steps[spin] += taken
            print(f"round {round_} spin {spin:>4} us: median step {statistics.median(taken) * 1e3:6.2f} ms, "
                  f"pool jobs {sum(a['jobs'] - b['jobs'] for a, b in zip(after, before))}, "
                  f"worker share {worker / max(1, tasks):.2f}", flush=True)
    first = statistics.median(steps[spins[0]])
    for spin, taken in steps.items():
        median = statistics.median(taken)
        print(f"spin {spin:>4} us: median step {median * 1e3:6.2f} ms ({median / first:.3f}x spin {spins[0]}), "
              f"p10 {statistics.quantiles(taken, n=10)[0] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
