"""Engine-thread cost of loading a prompt's prefix from the KV disk tier: synchronous reads
at admission versus blocks read ahead (`DiskKVCache.prefetch`) by the reader thread.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        .venv/bin/python bench/disk_prefetch_bench.py [--model bench/models/bench-200m] [--tokens 1000]

1. A first engine computes a `--tokens` prompt, so that its full blocks land on disk.
2. For each mode, alternating, `--repeats` times: a fresh engine (nothing in memory) gets the
   request; in "prefetch" mode the reader is given time to stage the blocks (as while the
   request waits behind running sequences); then the time of `BlockManager.match_prefix` on
   the engine thread is taken, and separately the `mx.eval` of the pool writes it queued.
3. Decode stall: one request decodes while the disk-prefix request arrives; the longest
   engine step (what every running sequence waits between two tokens) is reported per mode.
Files are in the page cache in both modes (the first engine just wrote them).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine

ROOT = Path(__file__).resolve().parent


def engine(model, cache_dir: str, num_blocks: int) -> LLMEngine:
    config = EngineConfig(kv_cache_dir=cache_dir, num_blocks=num_blocks, max_num_batched_tokens=512)
    return LLMEngine(model, config, context_window=8192, scope=b"disk-prefetch-bench")


def finish(e: LLMEngine) -> None:
    while e.has_work:
        e.step()


def timed_admission(model, cache_dir, num_blocks, prompt, prefetch: bool) -> tuple[float, float, int]:
    e = engine(model, cache_dir, num_blocks)
    e.disk.prefetch_enabled = prefetch
    spent = []
    match = e.blocks.match_prefix

    def timed(seq):
        started = time.perf_counter()
        hit = match(seq)
        spent.append(time.perf_counter() - started)
        return hit

    e.blocks.match_prefix = timed
    e.add_request(GenerationRequest("r", prompt, 1))
    e.disk.wait_prefetch()
    e.scheduler.schedule()
    started = time.perf_counter()
    mx.eval(e.storage.arrays())
    evaluated = time.perf_counter() - started
    hit = e.sequences["r"].num_computed_tokens
    stats = e.disk.stats()
    assert stats["prefetched_blocks"] == (stats["hit_blocks"] if prefetch else 0), stats
    e.abort("r")
    e.close()
    return spent[0], evaluated, hit


def decode_stall(model, cache_dir, num_blocks, prompt, prefetch: bool) -> tuple[float, float]:
    """(median decode step, longest step from the disk request's arrival to its first token)."""
    e = engine(model, cache_dir, num_blocks)
    e.disk.prefetch_enabled = prefetch
    other = [random.Random(2).randrange(5, 30000) for _ in range(64)]
    e.add_request(GenerationRequest("x", other, 400, stop_token_ids=frozenset()))
    steps = []
    for _ in range(12):
        started = time.perf_counter()
        e.step()
        steps.append(time.perf_counter() - started)
    e.add_request(GenerationRequest("r", prompt, 2, stop_token_ids=frozenset()))
    after = []
    got_first = False
    while not got_first:
        started = time.perf_counter()
        events = e.step()
        after.append(time.perf_counter() - started)
        got_first = any(rid == "r" and ev.token_id is not None for rid, ev in events)
    e.abort("x")
    finish(e)
    e.close()
    return statistics.median(steps[4:]), max(after)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "models" / "bench-200m"))
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-blocks", type=int, default=128)
    args = parser.parse_args()
    model, _ = load(args.model)
    prompt = [random.Random(1).randrange(5, 30000) for _ in range(args.tokens)]
    with tempfile.TemporaryDirectory() as cache_dir:
        first = engine(model, cache_dir, args.num_blocks)
        started = time.perf_counter()
        first.add_request(GenerationRequest("w", prompt, 1))
        finish(first)
        first.close()
        files = sorted(first.disk.dir.glob("*.safetensors"))
        print(f"computed {args.tokens} tokens in {time.perf_counter() - started:.1f}s; "
              f"{len(files)} blocks on disk, {files[0].stat().st_size / 2**20:.2f} MiB each")
        runs = {"sync": [], "prefetch": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(timed_admission(model, cache_dir, args.num_blocks, prompt, mode == "prefetch"))
        print(f"\nmatch_prefix on the engine thread, {args.repeats} runs each (median / min / max ms):")
        for mode, rows in runs.items():
            match = [r[0] * 1e3 for r in rows]
            evals = [r[1] * 1e3 for r in rows]
            print(f"  {mode:9s} match_prefix {statistics.median(match):7.1f} / {min(match):7.1f} / {max(match):7.1f}"
                  f"   then mx.eval of the pool writes {statistics.median(evals):6.1f}   ({rows[0][2]} tokens hit)")
        stalls = {"sync": [], "prefetch": []}
        for _ in range(max(2, args.repeats // 2)):
            for mode in stalls:
                stalls[mode].append(decode_stall(model, cache_dir, args.num_blocks, prompt, mode == "prefetch"))
        print("\ndecode stall of a running request while the disk-prefix request is admitted (ms):")
        for mode, rows in stalls.items():
            print(f"  {mode:9s} median decode step {statistics.median(r[0] for r in rows) * 1e3:6.1f}"
                  f"   longest step until its first token {statistics.median(r[1] for r in rows) * 1e3:7.1f}"
                  f"  (runs: {', '.join(f'{r[1] * 1e3:.0f}' for r in rows)})")


if __name__ == "__main__":
    main()
