#!/usr/bin/env python
"""A cold ~1,500-token prompt's TTFT on omlx, default matmul against OMLX_MATMUL=float32, and
eight agents' warm TTFT on the cached prompt against the cold one (issue #23, "Measure").

agents_bench.py's shared-system-prompt workload, omlx only, on the same model in one run:
one agent alone on a fresh server (cold: nothing of its ~1,500-token system prompt is
cached), then eight agents at once with that system prompt and their own short messages
(warm TTFT p50).  Each round starts two fresh servers one after the other, the default
(packed bf16 weights on a CPU with a bf16 unit) and OMLX_MATMUL=float32 (MLX float32 through
OpenBLAS), alternating which goes first, both given the same prompts; /health's
compute.matmul says which path each one ran.

    python bench/cold_ttft_bench.py                                   # bench-200m, 1 round
    python bench/cold_ttft_bench.py --model-path bench/models/smollm2-135m-f32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents_bench import shared_prompt  # noqa: E402  (the bench directory is not a package)
from serving_bench import (  # noqa: E402
    DEFAULT_BLAS,
    OMLX,
    CpuMeter,
    PromptFactory,
    Server,
    ensure_model,
    log,
    omlx_fingerprint,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
DEFAULT = "default"
FLOAT32 = "float32"


def run_server(matmul: str, args, factory: PromptFactory, tag: str) -> dict:
    wait_for_quiet(args.quiet_wait)
    server = Server(OMLX, args, args.log_dir, tag)
    # The default is whatever omlx picks with OMLX_MATMUL unset; float32 forces the old path.
    server.env_overrides["OMLX_MATMUL"] = FLOAT32 if matmul == FLOAT32 else None
    server.start()
    try:
        server.wait_ready()
        server.warm_up(factory)
        log(f"omlx ({matmul} matmul): cold prompt alone, then {args.agents} agents on it")
        meter = CpuMeter(server.proc.pid)
        row = shared_prompt(server, args, factory)
        row["other_cores"] = round(meter.read()["other_cores"], 2)
        health = server.health() or {}
        row["matmul"] = (health.get("compute") or {}).get("matmul")
        loaded = (health.get("models_loaded") or {}).get(server.model_id) or {}
        row["prefill_tokens"] = loaded.get("prefill_tokens")
        row["cached"] = (loaded.get("kv_cache") or {}).get("prefix_cache_hit_rate")
        log(f"  -> cold {row['cold_ttft']:.2f} s, warm p50 {row['warm_ttft_p50']:.2f} s "
            f"({row['warm_speedup']:.1f}x), matmul {row['matmul']}")
        return row
    finally:
        server.stop()


def fallback_warning(default_rows: list[dict]) -> list[str]:
    """A default round that ran float32 anyway (e.g. a kernel being rebuilt by someone else
    at that moment) measured nothing about the bf16 path: say so above the table."""
    for row in default_rows:
        matmul = row.get("matmul") or {}
        if matmul.get("matmul") == FLOAT32:
            return [f"**WARNING: a default round ran float32 ({matmul.get('reason')}); its figures are not the"
                    " default path's**", ""]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=HERE / "models" / "bench-200m",
                   help="model folder (built if missing, as serving_bench does); its name is the model id")
    p.add_argument("--rounds", type=int, default=1, help="pairs of servers (default then float32, alternating)")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--shared-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quiet-wait", type=float, default=15)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--omlx-arg", action="append", default=[], help="extra omlx serve flag (repeatable)")
    args = p.parse_args(argv)
    args.mlx_lm_arg, args.blas_library = [], DEFAULT_BLAS  # serving_bench.Server reads these
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.log_dir = args.out_dir / "logs" / f"cold_ttft-{stamp}"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model_path)
    started = time.monotonic()

    rows: dict[str, list[dict]] = {DEFAULT: [], FLOAT32: []}
    for r in range(args.rounds):
        order = (DEFAULT, FLOAT32) if r % 2 == 0 else (FLOAT32, DEFAULT)
        for matmul in order:
            # A fresh factory per server: both servers of a round get the same prompts.
            factory = PromptFactory(args.model_path, seed=100 + r)
            rows[matmul].append(run_server(matmul, args, factory, f"{r:02d}-{matmul}"))

    def med(matmul: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[matmul])

    d, f = rows[DEFAULT][0]["matmul"] or {}, rows[FLOAT32][0]["matmul"] or {}
    lines = [f"# Cold and warm TTFT, {args.model_path.name}, ~{args.shared_tokens}-token system prompt, "
             f"{args.agents} agents", "",
             f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, omlx {omlx_fingerprint()}, load average "
             f"{os.getloadavg()[0]:.1f}, {args.rounds} round(s) (median shown), {args.max_tokens} output tokens",
             f"- default matmul: {d.get('matmul')} ({d.get('isa')}; {d.get('library')})",
             f"- OMLX_MATMUL=float32: {f.get('matmul')} ({f.get('library')})", "",
             *fallback_warning(rows[DEFAULT]),
             f"| matmul | cold TTFT (alone) | warm TTFT p50 ({args.agents} at once) | warm vs cold |", "|---|---|---|---|"]
    for matmul in (DEFAULT, FLOAT32):
        lines.append(f"| {matmul} | {med(matmul, 'cold_ttft'):.2f} s | {med(matmul, 'warm_ttft_p50'):.2f} s | "
                     f"{med(matmul, 'cold_ttft') / med(matmul, 'warm_ttft_p50'):.1f}x |")
    lines += ["", f"Cold TTFT, float32 / default: **{med(FLOAT32, 'cold_ttft') / med(DEFAULT, 'cold_ttft'):.2f}x** "
                  "(target >= 3x); warm p50 vs cold on the default path: "
                  f"**{med(DEFAULT, 'cold_ttft') / med(DEFAULT, 'warm_ttft_p50'):.1f}x** (target >= 5x).",
              "Per round: " + "; ".join(f"{m} cold {row['cold_ttft']:.2f} s / warm {row['warm_ttft_p50']:.2f} s"
                                          f" (other processes {row['other_cores']} cores)"
                                          for m in (DEFAULT, FLOAT32) for row in rows[m]),
              f"Total {time.monotonic() - started:.0f} s; server logs in {args.log_dir}"]
    md = "\n".join(lines)
    (args.out_dir / f"cold_ttft-{stamp}.md").write_text(md + "\n")
    (args.out_dir / f"cold_ttft-{stamp}.json").write_text(json.dumps(rows, indent=1, default=str))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
