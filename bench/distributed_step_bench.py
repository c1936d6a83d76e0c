#!/usr/bin/env python
"""What a step costs across ranks: decode steps at 1, 8 and 32 rows, one rank against two.

    python bench/distributed_step_bench.py                       # one rank
    mlx.launch --backend ring -n 2 --python .venv/bin/python -- bench/distributed_step_bench.py

Each rank builds the same seeded model (a small qwen3, big enough that a step is more than
Python), shards it (tensor parallel, the model's own `shard()`), fills its engine with the
rows' prompts and times decode steps.  Rank 0 prints, per row count: the step's median time,
the part of it spent sending the SchedulerOutput (two collectives), and that step's bytes.
On one machine the two ranks share its cores, so this measures the overhead, not a speed-up.
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

import mlx.core as mx
from mlx_lm import load

from omlx.distributed.ranks import follow, shard_model
from omlx.distributed.step_channel import StepChannel
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.testing.tiny_models import TinyModelSpec, build_model

SPEC = TinyModelSpec(model_type="qwen3", hidden_size=512, num_hidden_layers=6, intermediate_size=1536,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=4096, seed=7)


def run(model, group, rows: int, prompt: int, steps: int) -> dict | None:
    bs = 16
    engine = LLMEngine(model, EngineConfig(block_size=bs, num_blocks=rows * (-(-(prompt + steps + 8) // bs)) + 8,
                                           max_num_seqs=rows, max_num_batched_tokens=max(256, rows),
                                           speculative=False, prefix_cache=False), 4096)
    channel = StepChannel(group)
    if not channel.leader:
        follow(engine, channel)
        return None
    sending = []
    execute = engine.runner.execute

    def timed_send(out):
        start = time.perf_counter()
        channel.send(out)
        sending.append(time.perf_counter() - start)
        return execute(out)

    if group.size() > 1:
        engine.runner.execute = timed_send
    rnd = random.Random(rows)
    for i in range(rows):
        engine.add_request(GenerationRequest(f"r{i}", [rnd.randrange(5, 4000) for _ in range(prompt)], steps + 4))
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    times, before = [], channel.sent_bytes
    sending.clear()
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    per_step = (channel.sent_bytes - before) / steps
    if group.size() > 1:
        channel.stop()
    return {"ranks": group.size(), "rows": rows, "step_ms": round(statistics.median(times) * 1e3, 3),
            "send_ms": round(statistics.median(sending) * 1e3, 3) if sending else 0.0,
            "step_bytes": int(per_step)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    group = mx.distributed.init()
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load(str(build_model(Path(tmp) / "m", SPEC)))  # seeded: the same weights on every rank
        shard_model(model, group)
        for rows in [int(r) for r in args.rows.split(",")]:
            report = run(model, group, rows, args.prompt, args.steps)
            if report is not None:
                print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
