#!/usr/bin/env python
"""Agent workloads, omlx against mlx_lm.server in one run (same model, same prompts).

- long-context sessions: N agents (default 4) with distinct ~3,000-token prompts; turn 1,
  then turn 2 re-sending each conversation (prompt, the agent's reply, a new user message),
  all sessions at once.  TTFT per turn and aggregate output tok/s over both turns.
- shared system prompt: one agent alone on a cold server (the cold TTFT), then N agents
  (default 8) at once with the same ~1,500-token system prompt and their own short messages
  (warm TTFT p50): how much the shared prefix saves each server.

Servers run one at a time, alternating which goes first per workload, each fresh.

    python bench/agents_bench.py [--model-path bench/models/bench-200m] [--sessions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import (  # noqa: E402  (the bench directory is not a package)
    DEFAULT_BLAS,
    MLX_LM,
    OMLX,
    WORDS,
    PromptFactory,
    Server,
    ensure_model,
    log,
    percentile,
    stream_chat,
    wait_for_quiet,
)

REPO = Path(__file__).resolve().parents[1]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def gather_chats(server: Server, conversations: list[list[dict]], max_tokens: int, timeout: float):
    url = server.base_url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        results = await asyncio.gather(*(stream_chat(http, url, server.model_id, c, max_tokens, i)
                                         for i, c in enumerate(conversations)))
    for r in results:
        if r.error:
            raise RuntimeError(f"{server.kind}: {r.error}\n{server.log_tail()}")
    return results


def long_sessions(server: Server, args, factory: PromptFactory) -> dict:
    rng = random.Random(7)
    prompts = [f"Agent {i}. " + factory.text(args.session_tokens) for i in range(args.sessions)]
    first = [[{"role": "user", "content": p}] for p in prompts]
    started = time.monotonic()
    turn1 = asyncio.run(gather_chats(server, first, args.max_tokens, args.timeout))
    second = [c + [{"role": "assistant", "content": r.text}, {"role": "user", "content": words(rng, 24)}]
              for c, r in zip(first, turn1)]
    turn2 = asyncio.run(gather_chats(server, second, args.max_tokens, args.timeout))
    wall = time.monotonic() - started
    tokens = sum(r.tokens for r in turn1 + turn2)
    return {
        "turn1_ttft_p50": percentile([r.ttft for r in turn1], 50),
        "turn2_ttft_p50": percentile([r.ttft for r in turn2], 50),
        "agg_tps": tokens / wall,
        "wall_s": wall,
        "turn2_cached": [r.cached_tokens for r in turn2],
    }


def shared_prompt(server: Server, args, factory: PromptFactory) -> dict:
    rng = random.Random(11)
    system = factory.text(args.shared_tokens)
    cold = [[{"role": "system", "content": system}, {"role": "user", "content": "first " + words(rng, 16)}]]
    cold_ttft = asyncio.run(gather_chats(server, cold, args.max_tokens, args.timeout))[0].ttft
    agents = [[{"role": "system", "content": system}, {"role": "user", "content": f"agent {i} " + words(rng, 16)}]
              for i in range(args.agents)]
    warm = asyncio.run(gather_chats(server, agents, args.max_tokens, args.timeout))
    warm_p50 = percentile([r.ttft for r in warm], 50)
    return {"cold_ttft": cold_ttft, "warm_ttft_p50": warm_p50, "warm_speedup": cold_ttft / warm_p50}


def run(kind: str, workload, args, factory: PromptFactory, tag: str) -> dict:
    wait_for_quiet(args.quiet_wait)
    server = Server(kind, args, args.out_dir, tag)
    server.start()
    try:
        server.wait_ready()
        server.warm_up(factory)
        log(f"{kind}: running {workload.__name__}")
        return workload(server, args, factory)
    finally:
        server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=REPO / "bench/models/bench-200m")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--session-tokens", type=int, default=3000)
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--shared-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quiet-wait", type=float, default=20)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    p.add_argument("--blas-library", default=DEFAULT_BLAS)
    p.add_argument("--omlx-arg", action="append", default=[])
    p.add_argument("--mlx-lm-arg", action="append", default=[])
    p.add_argument("--omlx-only", action="store_true", help="skip mlx_lm.server (omlx settings sweeps)")
    p.add_argument("--workloads", default="long_sessions,shared_prompt")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model_path)
    factory = PromptFactory(args.model_path, seed=3)
    rows = {}
    chosen = [w for w in (long_sessions, shared_prompt) if w.__name__ in args.workloads.split(",")]
    for index, workload in enumerate(chosen):
        order = (OMLX, MLX_LM) if index % 2 == 0 else (MLX_LM, OMLX)
        for kind in order:
            if args.omlx_only and kind == MLX_LM:
                continue
            rows[(workload.__name__, kind)] = run(kind, workload, args, factory, f"agents-{workload.__name__}-{kind}")
            log(f"{kind} {workload.__name__}: {rows[(workload.__name__, kind)]}")

    if args.omlx_only or len(chosen) < 2:
        return 0  # the per-workload rows are in the log above
    o, m = rows[("long_sessions", OMLX)], rows[("long_sessions", MLX_LM)]
    print(f"\n# Agent workloads: {args.model_path.name}, omlx vs mlx_lm.server\n")
    print(f"## {args.sessions} long-context sessions (~{args.session_tokens} tokens), two turns\n")
    print("| server | turn 1 TTFT p50 | turn 2 TTFT p50 | aggregate tok/s | turn 2 cached tokens |")
    print("|---|---|---|---|---|")
    for kind, row in ((OMLX, o), (MLX_LM, m)):
        print(f"| {kind} | {row['turn1_ttft_p50']:.1f} s | {row['turn2_ttft_p50']:.2f} s | {row['agg_tps']:.2f} | "
              f"{row['turn2_cached']} |")
    print(f"\nomlx vs mlx_lm.server: turn 1 TTFT {m['turn1_ttft_p50'] / o['turn1_ttft_p50']:.2f}x, turn 2 TTFT "
          f"{m['turn2_ttft_p50'] / o['turn2_ttft_p50']:.2f}x, TTFT p50 over both turns "
          f"{(m['turn1_ttft_p50'] + m['turn2_ttft_p50']) / (o['turn1_ttft_p50'] + o['turn2_ttft_p50']):.2f}x, "
          f"aggregate {o['agg_tps'] / m['agg_tps']:.2f}x (above 1: omlx better)")
    o, m = rows[("shared_prompt", OMLX)], rows[("shared_prompt", MLX_LM)]
    print(f"\n## {args.agents} agents sharing a ~{args.shared_tokens}-token system prompt\n")
    print("| server | cold TTFT (alone) | warm TTFT p50 | warm vs cold |")
    print("|---|---|---|---|")
    for kind, row in ((OMLX, o), (MLX_LM, m)):
        print(f"| {kind} | {row['cold_ttft']:.2f} s | {row['warm_ttft_p50']:.2f} s | {row['warm_speedup']:.1f}x |")
    print(f"\nwarm TTFT p50, omlx vs mlx_lm.server: {m['warm_ttft_p50'] / o['warm_ttft_p50']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
