#!/usr/bin/env python
"""What the typed step costs: decode steps at 1, 8 and 32 rows on a tiny model (where host
work weighs most), split into schedule / execute / update / stats snapshot, and the size and
encoding time of a step's SchedulerOutput as another rank would receive it.

    python bench/step_contract_bench.py [--rows 1,8,32] [--steps 40] [--context 256]
    python bench/step_contract_bench.py --plain-steps  # whole engine.step() only (any version)
    python bench/step_contract_bench.py --plain-steps --host-only  # the model's pass stubbed

`--plain-steps` times `engine.step()` alone, so the same command run against an older tree
(PYTHONPATH=that tree) compares the engine before and after the contract side by side.
`--host-only` replaces the model's forward pass with constant logits: what is left is the
engine's own host work (scheduling, the step's data, sampling, postprocessing, stats).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.testing.tiny_models import TinyModelSpec, build_model


def engine_with(model, rows: int, context: int, steps: int) -> LLMEngine:
    bs = 16
    blocks = rows * (-(-(context + steps + 16) // bs)) + 8
    engine = LLMEngine(model, EngineConfig(block_size=bs, num_blocks=blocks, max_num_seqs=rows,
                                           max_num_batched_tokens=max(512, rows), speculative=False,
                                           prefix_cache=False), 4096)
    rnd = random.Random(rows)
    for i in range(rows):
        prompt = [rnd.randrange(5, 400) for _ in range(context)]
        engine.add_request(GenerationRequest(f"r{i}", prompt, steps + 8))
    while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def plain_steps(model, rows: int, context: int, steps: int, host_only: bool = False) -> dict:
    engine = engine_with(model, rows, context, steps)
    if host_only:
        import mlx.core as mx

        vocab = model.args.vocab_size
        engine.runner.forward = lambda seqs, counts, want, pools=None: mx.zeros((sum(want), vocab))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    # The minimum too: on a machine other work shares, it is the figure least moved by it.
    return {"rows": rows, "step_ms": round(statistics.median(times) * 1e3, 3), "min_ms": round(min(times) * 1e3, 3)}


def split_steps(model, rows: int, context: int, steps: int) -> dict:
    import orjson

    from omlx.scheduler.engine_stats import EngineStats
    from omlx.scheduler.step import SchedulerOutput

    engine = engine_with(model, rows, context, steps)
    parts = {"schedule": [], "execute": [], "update": [], "snapshot": [], "encode": [], "decode": []}
    size = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = engine.scheduler.schedule()
        t1 = time.perf_counter()
        result = engine.runner.execute(out)
        t2 = time.perf_counter()
        engine.scheduler.update_from_output(out, result)
        t3 = time.perf_counter()
        EngineStats.of(engine)
        t4 = time.perf_counter()
        wire = orjson.dumps(out.to_plain())
        t5 = time.perf_counter()
        SchedulerOutput.from_plain(orjson.loads(wire))
        t6 = time.perf_counter()
        for name, a, b in (("schedule", t0, t1), ("execute", t1, t2), ("update", t2, t3), ("snapshot", t3, t4),
                           ("encode", t4, t5), ("decode", t5, t6)):
            parts[name].append(b - a)
        size.append(len(wire))
    report = {name: round(statistics.median(v) * 1e3, 3) for name, v in parts.items()}
    total = report["schedule"] + report["execute"] + report["update"]
    return {"rows": rows, "ms": report, "snapshot_share_of_step": round(report["snapshot"] / total, 4),
            "wire_bytes": int(statistics.median(size))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--plain-steps", action="store_true")
    parser.add_argument("--host-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "m", TinyModelSpec(model_type="qwen3", seed=1))
        model, _ = load(str(path))
        for rows in [int(r) for r in args.rows.split(",")]:
            if args.plain_steps:
                report = plain_steps(model, rows, args.context, args.steps, args.host_only)
            else:
                report = split_steps(model, rows, args.context, args.steps)
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
