#!/usr/bin/env python
"""Eight agents on one cached prompt, in-process: warm TTFT p50 against one cold prompt's TTFT.

    python bench/shared_prompt_ttft.py [--model-path bench/models/bench-200m] [--agents 8]
        [--shared-tokens 1800] [--weights auto|float32] [--modes partial,full-blocks] [--cold-bursts]

The engine-level twin of agents_bench.py's shared-prompt workload, without HTTP: one engine
(the server's defaults: 32-token blocks, 512 tokens per step), a cold request (system prompt
+ its own message) run to its end, then `--agents` requests with the same system prompt and
their own short messages added together, each timed from its add to its first token.  With
`--modes partial,full-blocks` the warm waves alternate (`--repeats` times each) between
token-granular reuse of the partial last block (omlx.scheduler.partial_prefix) and whole
blocks only, on the same engine after the same cold prompt, so both ratios come from one
process and one cold TTFT.  It also prints the prompt tokens each warm wave computed.
`--cold-bursts` adds, per mode, the agents arriving together on a system prompt nothing has
cached: with partial reuse on, the first computes it and the others wait for its blocks.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

from mlx_lm import load  # noqa: E402

from omlx.models import weight_form  # noqa: E402
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving_bench import WORDS, PromptFactory, ensure_model  # noqa: E402


def chat_ids(tokenizer, system: str, user: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding


def run_until_first_tokens(engine: LLMEngine, requests: list[GenerationRequest]) -> tuple[dict, int]:
    """Add `requests` together and step until all finish; (seconds to each one's first
    token, prompt tokens the engine computed before the last first token)."""
    before = engine.counters.prefill_tokens
    started = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    first: dict[str, float] = {}
    computed = 0
    while engine.has_work:
        for request_id, event in engine.step():
            if event.token_id is not None and request_id not in first:
                first[request_id] = time.perf_counter() - started
                if len(first) == len(requests):
                    computed = engine.counters.prefill_tokens - before
    return first, computed


def waves(model, tokenizer, args) -> tuple[dict, list[dict]]:
    """One engine: a cold prompt, then warm waves alternating between the modes.  Every wave
    has messages of its own (no wave finds another's whole prompt cached)."""
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=1 << 30), context_window=8192)
    partial = engine.scheduler.partial_prefix
    rng = random.Random(11)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    factory = PromptFactory(args.model_path, seed=3)
    # The cold prompt as before partial reuse: whole blocks only (and nothing cached but the
    # warm-up's unrelated prompt, which absorbs first-call costs).
    engine.scheduler.partial_prefix = None
    run_until_first_tokens(engine, [GenerationRequest("warmup", chat_ids(tokenizer, factory.text(300), "hi"),
                                                      max_tokens=4)])
    system = factory.text(args.shared_tokens)
    cold_ids = chat_ids(tokenizer, system, "first " + words(16))
    ttft, computed = run_until_first_tokens(engine, [GenerationRequest("cold", cold_ids, args.max_tokens)])
    cold = {"prompt_tokens": len(cold_ids), "ttft": ttft["cold"], "computed": computed}
    rows = []
    for repeat in range(args.repeats):
        for mode in args.modes.split(","):
            engine.scheduler.partial_prefix = partial if mode == "partial" else None
            agents = [GenerationRequest(f"{mode}{repeat}-{i}", chat_ids(tokenizer, system, f"agent {i} " + words(16)),
                                        args.max_tokens) for i in range(args.agents)]
            engine.profile.reset()
            warm, warm_computed = run_until_first_tokens(engine, agents)
            alone, alone_computed = run_until_first_tokens(engine, [GenerationRequest(
                f"{mode}{repeat}-alone", chat_ids(tokenizer, system, "alone " + words(16)), args.max_tokens)])
            rows.append({"mode": mode, "warm_ttft_p50": statistics.median(warm.values()),
                         "warm_computed": warm_computed, "alone_ttft": next(iter(alone.values())),
                         "alone_computed": alone_computed})
            row = rows[-1]
            print(f"{mode:12s} {args.agents} warm TTFT p50 {row['warm_ttft_p50']:.3f} s ({warm_computed} prompt "
                  f"tokens computed) -> {cold['ttft'] / row['warm_ttft_p50']:.2f}x cold | one warm alone "
                  f"{row['alone_ttft']:.3f} s ({alone_computed} computed) -> {cold['ttft'] / row['alone_ttft']:.1f}x",
                  flush=True)
    if args.cold_bursts:
        # The agents arrive together on a system prompt nothing has cached yet: with partial
        # reuse on, the first computes it and the others wait for its blocks (computed once).
        for mode in args.modes.split(","):
            engine.scheduler.partial_prefix = partial if mode == "partial" else None
            fresh = factory.text(args.shared_tokens)
            burst = [GenerationRequest(f"burst-{mode}-{i}", chat_ids(tokenizer, fresh, f"agent {i} " + words(16)),
                                       args.max_tokens) for i in range(args.agents)]
            first, computed = run_until_first_tokens(engine, burst)
            print(f"{mode:12s} cold burst of {args.agents}: TTFT p50 {statistics.median(first.values()):.3f} s, "
                  f"max {max(first.values()):.3f} s, {computed} prompt tokens computed", flush=True)
    assert engine.blocks.leaked_blocks() == []
    return cold, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=HERE / "models" / "bench-200m")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--shared-tokens", type=int, default=1800)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--weights", choices=("auto", "float32"), default="auto",
                   help="auto: the form the server picks here (packed bf16 on a CPU with a bf16 unit)")
    p.add_argument("--modes", default="partial,full-blocks")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cold-bursts", action="store_true",
                   help="also the agents arriving together on an uncached system prompt, once per mode")
    args = p.parse_args(argv)
    ensure_model(args.model_path)
    model, tokenizer = load(str(args.model_path))
    form = weight_form.apply(model, None, 16 << 30) if args.weights == "auto" else "float32 (as loaded)"
    print(f"model {args.model_path.name}, weights {form}, {args.agents} agents, ~{args.shared_tokens}-token system prompt")
    cold, rows = waves(model, tokenizer, args)
    print(f"cold: {cold['prompt_tokens']}-token prompt, TTFT {cold['ttft']:.3f} s ({cold['computed']} computed)")
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        p50 = statistics.median(r["warm_ttft_p50"] for r in mine)
        alone = statistics.median(r["alone_ttft"] for r in mine)
        print(f"{mode:12s} median of {len(mine)} waves: warm TTFT p50 {p50:.3f} s -> {cold['ttft'] / p50:.2f}x cold; "
              f"one warm alone {alone:.3f} s -> {cold['ttft'] / alone:.1f}x; prompt tokens computed per wave "
              f"{mine[0]['warm_computed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
