"""Run requests through a tensor-parallel engine on every rank of an `mlx.launch` group.

    mlx.launch --backend ring -n 2 --python .venv/bin/python -- \
        -m omlx.distributed.generate --model DIR --requests requests.json --out tokens.json

`requests.json`: [{"id", "prompt": [token ids], "max_tokens", "arrival": step}, ...] (greedy).
Rank 0 schedules and samples and writes {"tokens": {id: [...]}, "steps", "step_bytes"} to
`--out`; the other ranks follow its steps.  (The prototype of `omlx serve --distributed`.)
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine

from .ranks import follow, lead, shard_model
from .step_channel import StepChannel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omlx.distributed.generate")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    group = mx.distributed.init()
    model, tokenizer = load(args.model)
    shard_model(model, group)
    config = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    engine = LLMEngine(model, config, context_window=4096)
    channel = StepChannel(group)
    if not channel.leader:
        follow(engine, channel)
        return 0
    lead(engine, channel)
    with open(args.requests) as f:
        requests = json.load(f)
    eos = frozenset(tokenizer.eos_token_ids)
    tokens: dict[str, list[int]] = {r["id"]: [] for r in requests}
    pending = sorted(requests, key=lambda r: r.get("arrival", 0))
    step = 0
    try:
        while pending or engine.has_work:
            while pending and pending[0].get("arrival", 0) <= step:
                r = pending.pop(0)
                engine.add_request(GenerationRequest(r["id"], r["prompt"], r["max_tokens"], stop_token_ids=eos))
            for request_id, event in engine.step():
                if event.token_id is not None:
                    tokens[request_id].append(event.token_id)
            step += 1
    finally:
        channel.stop()  # the other ranks leave their loops whatever happened here
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens, "steps": engine.stats.steps, "step_bytes": channel.sent_bytes,
                   "ranks": group.size(), "preemptions": engine.scheduler.num_preemptions,
                   "prefix_hit_tokens": engine.blocks.prefix_hits}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
