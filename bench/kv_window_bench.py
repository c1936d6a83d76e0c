#!/usr/bin/env python
"""KV bytes one sequence holds at a long context: a sliding-window model against the same
shape with full attention on every layer, in omlx's paged engine, and what mlx-lm's own
caches hold for the windowed model.

omlx: one request of `--context` tokens (prompt + 1 generated) in an `LLMEngine` with a fixed
pool; the peak of the pool's used blocks while it runs, times the pool's bytes per block
(`PagedKVStorage.bytes_per_block`), is the sequence's KV.  The prefix cache is off, so no block
is counted twice.  mlx-lm: the prompt but its last token prefilled through `model.make_cache()`
in chunks of 2048 tokens (mlx_lm.generate's prefill step), then the last token as one decode
step; the `nbytes` of every cache's key and value buffers after each.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
    python bench/kv_window_bench.py [--model-path bench/models/bench-gemma3] [--context 8192]

The full-attention twin (`<name>-full`: sliding_window_pattern=1, same weights' shapes and
seed) is built next to the model on first use.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def ensure(path: Path, name: str, **overrides) -> None:
    if (path / "model.safetensors").exists():
        return
    from omlx.testing.tiny_families import build_bench_family

    print(f"building {path}", flush=True)
    build_bench_family(path, name, **overrides)


def omlx_sequence_kv(path: Path, prompt: list[int], block_size: int, **engine_config) -> dict:
    from mlx_lm import load

    from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
    from omlx.scheduler.layer_kinds import describe

    model, _ = load(str(path))
    blocks = -(-(len(prompt) + 1) // block_size) + 8
    config = EngineConfig(block_size=block_size, num_blocks=blocks, prefix_cache=False, speculative=False,
                          **engine_config)
    engine = LLMEngine(model, config, context_window=32768)
    window = getattr(engine, "window", None)  # the window pool (omlx.scheduler.window_kv), if any
    # Two tokens: the sequence is still running (holding its blocks) after the step that
    # finishes its prefill.
    engine.add_request(GenerationRequest("kv", list(prompt), max_tokens=2))
    # The window pool's blocks are let go after each step (`settle`): the peak during a pass
    # (the chunk being written plus the window behind it) is read just before that.
    window_peak_in_pass = 0
    if window is not None:
        settle = window.settle

        def settle_and_count(*a, **k):
            nonlocal window_peak_in_pass
            window_peak_in_pass = max(window_peak_in_pass, window.stats()["held_blocks"])
            return settle(*a, **k)

        window.settle = settle_and_count
    peak, window_peak, started, done = 0, 0, time.monotonic(), False
    while not done:
        for _, event in engine.step():
            if event.error:
                raise RuntimeError(event.error)
            done = done or event.finish_reason is not None
        stats = engine.kv_stats()
        peak = max(peak, stats["used_blocks"])
        if window is not None:
            window_peak = max(window_peak, stats["window"]["held_blocks"])
    stats = engine.kv_stats()
    per_block = engine.storage.bytes_per_block
    window_per_block = window.storage.bytes_per_block if window is not None else 0
    return {
        "layer_kinds": describe(engine.kinds),
        "engine_config": engine_config,
        "main_layers": engine.storage.layout.num_layers,
        "bytes_per_block": per_block,
        "block_size": block_size,
        "peak_used_blocks": peak,
        "window_layers": window.storage.layout.num_layers if window is not None else 0,
        "window_bytes_per_block": window_per_block,
        "window_peak_held_blocks": window_peak,
        "window_peak_held_blocks_in_pass": window_peak_in_pass,
        "sequence_kv_bytes": peak * per_block + window_peak * window_per_block,
        "sequence_kv_bytes_in_pass": peak * per_block + max(window_peak, window_peak_in_pass) * window_per_block,
        "pool_bytes": stats["bytes"],
        "window_pool": stats.get("window"),
        "seconds": time.monotonic() - started,
    }


def mlx_lm_cache_kv(path: Path, prompt: list[int], step: int = 2048) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(path))
    cache = make_prompt_cache(model)
    started = time.monotonic()
    tokens = mx.array(prompt)

    def held() -> list[dict]:  # the buffers each cache has allocated (KVCache grows in steps of 256)
        return [{"type": type(c).__name__, "bytes": c.keys.nbytes + c.values.nbytes,
                 "tokens_held": int(c.keys.shape[2])} for c in cache]

    for i in range(0, len(prompt) - 1, step):
        model(tokens[None, i:min(i + step, len(prompt) - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    after_prefill = held()
    model(tokens[None, -1:], cache=cache)  # one decode step: windowed caches trim to the window
    mx.eval([c.state for c in cache])
    per_layer = held()
    return {"sequence_kv_bytes": sum(x["bytes"] for x in per_layer), "layers": per_layer,
            "after_prefill_bytes": sum(x["bytes"] for x in after_prefill), "after_prefill": after_prefill,
            "seconds": time.monotonic() - started}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=REPO / "bench/models/bench-gemma3")
    p.add_argument("--context", type=int, default=8192, help="tokens in the sequence (prompt + 1 generated)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/kv_window.json")
    args = p.parse_args(argv)

    name = args.model_path.name
    full = args.model_path.with_name(name + "-full")
    ensure(args.model_path, name)
    ensure(full, name, sliding_window_pattern=1)
    prompt = [random.Random(0).randrange(10, 30000) for _ in range(args.context - 1)]

    runs = [("windowed", args.model_path, {}), ("full attention", full, {})]
    from omlx.scheduler import EngineConfig

    if "window_kv" in EngineConfig.__dataclass_fields__:  # the window pool can be turned off
        runs.insert(1, ("windowed, window pool off", args.model_path, {"window_kv": False}))
    results = {}
    for label, path, engine_config in runs:
        results[label] = omlx_sequence_kv(path, prompt, args.block_size, **engine_config)
        print(label, json.dumps(results[label]), flush=True)
    if not args.skip_mlx_lm:
        results["mlx-lm caches (windowed)"] = mlx_lm_cache_kv(args.model_path, prompt)
        print("mlx-lm", json.dumps(results["mlx-lm caches (windowed)"]), flush=True)

    mib = 2**20
    base = results["full attention"]["sequence_kv_bytes"]
    print(f"\n# KV bytes of one {args.context}-token sequence: {name} against its full-attention twin\n")
    print("| model | layer kinds | main pool: layers, blocks held x bytes | window pool: layers, blocks held"
          " (in a pass) x bytes | KV per sequence (in a pass) | vs full attention |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in runs:
        r = results[label]
        window = (f"{r['window_layers']}, {r['window_peak_held_blocks']} ({r['window_peak_held_blocks_in_pass']})"
                  f" x {r['window_bytes_per_block']:,}" if r["window_layers"] else "-")
        print(f"| omlx, {label} | {r['layer_kinds']} | {r['main_layers']}, {r['peak_used_blocks']} x "
              f"{r['bytes_per_block']:,} | {window} | {r['sequence_kv_bytes'] / mib:.1f} MiB "
              f"({r['sequence_kv_bytes_in_pass'] / mib:.1f} MiB) | {r['sequence_kv_bytes'] / base:.3f}x |")
    if "mlx-lm caches (windowed)" in results:
        r = results["mlx-lm caches (windowed)"]
        held = sorted({(x["type"], x["tokens_held"]) for x in r["layers"]})
        print(f"| mlx-lm caches, windowed, decoding | {held} | - | - | {r['sequence_kv_bytes'] / mib:.1f} MiB | "
              f"{r['sequence_kv_bytes'] / base:.3f}x |")
        held = sorted({(x["type"], x["tokens_held"]) for x in r["after_prefill"]})
        print(f"| mlx-lm caches, windowed, end of prefill | {held} | - | - | "
              f"{r['after_prefill_bytes'] / mib:.1f} MiB | {r['after_prefill_bytes'] / base:.3f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
