#!/usr/bin/env python
"""A decode step's time under different process environments (allocator, malloc tunables,
OpenMP wait policy): each variant in its own fresh process, all resident, taking turns.

    OMLX_MATMUL=auto python bench/decode_step_env.py --rounds 5 --rows 1 \
        --model bench/models/smollm2-135m-f32 --variant glibc --variant jemalloc

A variant is a preset name (see PRESETS) or `name:KEY=VALUE KEY=VALUE ...` (values without
spaces; `name:` alone is this shell's environment).  Each round starts one process per variant
(through omlx's own start-up re-exec, as `omlx serve` does), each loads the model in the form
the server picks (`weight_form.apply`) and decodes a real chat prompt through `LLMEngine`
(`--rows N`: N requests at once).  Then the variants take turns of `--steps` timed steps,
`--bursts` turns each, in rotating order, so the load other processes put on the machine
(+-20% and worse here, over seconds) falls on every variant alike; fresh processes each round
catch what differs from one process to the next.  Only steps where every row decodes count.
Reported per variant: the median step over all turns, p10 / p90, its ratio to the first
variant, the median of the paired ratios (each turn against the baseline's turn in the same
slot, with their quartiles: the robust figure), CPU time (all threads), context switches (all
threads) and minor page faults per step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBDIR = "/usr/lib/x86_64-linux-gnu"
QUESTIONS = ["Why is the sky blue?", "What is the capital of France?", "How many days are in a week?",
             "Who wrote Hamlet?", "Name three primary colors.", "What does a bee make?",
             "Explain rain in one sentence.", "What is two plus two?"]

# Today's behaviour (before omlx tuned its process) is `glibc`: glibc's malloc, and the OpenMP
# wait policy omlx's kernels set (PASSIVE).  The others change one thing each from there, or two
# where named so; `omlx-default` is what `omlx serve` now starts with (omlx.process_tuning).
TODAY = {"OMLX_ALLOCATOR": "glibc"}
TUNABLES = ("glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"
            ":glibc.malloc.top_pad=67108864:glibc.malloc.arena_max=2")
PRESETS: dict[str, dict[str, str]] = {
    "glibc": TODAY,
    # The same again: an A/A control, so the spread of a ratio between identical processes is known.
    "glibc-again": dict(TODAY),
    "omlx-default": {},
    "jemalloc": {**TODAY, "LD_PRELOAD": f"{LIBDIR}/libjemalloc.so.2"},
    # jemalloc without its time-based purge (madvise of dirty pages, then a fault per page on reuse).
    "jemalloc-keep": {**TODAY, "LD_PRELOAD": f"{LIBDIR}/libjemalloc.so.2",
                      "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
    "tcmalloc": {**TODAY, "LD_PRELOAD": f"{LIBDIR}/libtcmalloc_minimal.so.4"},
    "mimalloc": {**TODAY, "LD_PRELOAD": f"{LIBDIR}/libmimalloc.so.2"},
    # Large buffers from the heap instead of mmap / munmap each step, and the heap's top kept.
    "tunables": {**TODAY, "GLIBC_TUNABLES": TUNABLES},
    # (omlx's kernels already set OMP_WAIT_POLICY=PASSIVE before libgomp loads: omlx/kernels/backend.py)
    "omp-passive": {**TODAY, "OMP_WAIT_POLICY": "passive"},
    "omp-active": {**TODAY, "OMP_WAIT_POLICY": "active"},
    # An explicit spin count overrides the PASSIVE policy's 0: spin briefly, then sleep.
    "gomp-spin-10k": {**TODAY, "GOMP_SPINCOUNT": "10000"},
    "gomp-spin-100k": {**TODAY, "GOMP_SPINCOUNT": "100000"},
    "tcmalloc+spin-10k": {**TODAY, "LD_PRELOAD": f"{LIBDIR}/libtcmalloc_minimal.so.4", "GOMP_SPINCOUNT": "10000"},
    "tunables+passive": {**TODAY, "GLIBC_TUNABLES": TUNABLES, "OMP_WAIT_POLICY": "passive"},
    "tcmalloc+passive": {**TODAY, "LD_PRELOAD": f"{LIBDIR}/libtcmalloc_minimal.so.4", "OMP_WAIT_POLICY": "passive"},
}


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    if ":" not in spec:
        if spec not in PRESETS:
            raise SystemExit(f"unknown preset {spec!r}; presets: {', '.join(PRESETS)}")
        return spec, PRESETS[spec]
    name, _, rest = spec.partition(":")
    env = {}
    for item in shlex.split(rest):
        key, _, value = item.partition("=")
        env[key] = value
    return name, env


def _context_switches() -> int:
    """Voluntary + involuntary switches of every thread of this process so far."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return total


class _Decoder:
    """Keeps `rows` requests decoding and times steps where every row decodes."""

    def __init__(self, args):
        from mlx_lm import load

        from omlx.models import weight_form
        from omlx.scheduler import EngineConfig, LLMEngine

        model, tokenizer = load(args.model)
        self.form = weight_form.apply(model, None, 8 << 30)
        self.engine = LLMEngine(model, EngineConfig(num_blocks=64 * max(args.rows, 4), prefix_cache=False,
                                                    kv_cache_dir=None, speculative=False,
                                                    max_num_seqs=max(args.rows, 1)), 8192)
        self.prompts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                                      add_generation_prompt=True) for i in range(args.rows)]
        self.rows, self.tokens, self.warmup = args.rows, args.tokens, args.warmup
        self.wave = self.seen = 0

    def steps(self, n: int) -> dict:
        """Run until `n` timed steps; returns their times and counters."""
        import resource

        from omlx.scheduler import GenerationRequest

        times, cpu, switches, faults = [], 0.0, 0, 0
        while len(times) < n:
            if not self.engine.has_work:  # a new wave of requests; its first steps are not timed
                self.wave, self.seen = self.wave + 1, 0
                for i, prompt in enumerate(self.prompts):
                    self.engine.add_request(GenerationRequest(f"w{self.wave}-{i}", prompt, max_tokens=self.tokens))
            s0, f0 = _context_switches(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            events = self.engine.step()
            elapsed, step_cpu = time.perf_counter() - t0, time.process_time() - c0
            self.seen += 1
            # Only steps where every row decodes, after a few warm ones (prefill, first pages).
            if sum(1 for _, event in events if event.token_id is not None) == self.rows and self.seen > self.warmup:
                times.append(elapsed)
                cpu += step_cpu
                switches += _context_switches() - s0
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        return {"times": times, "cpu": cpu, "switches": switches, "faults": faults}


def worker(args) -> None:
    """One variant's process: load, then run bursts of steps when the parent says (stdin)."""
    from omlx.blas import ensure_optimized_blas

    ensure_optimized_blas(sys.orig_argv[1:])
    decoder = _Decoder(args)
    decoder.steps(args.warmup)  # the first steps of a process are slower (pages, thread start)
    print(json.dumps({"ready": True, "form": decoder.form, "preload": os.environ.get("LD_PRELOAD", "")}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(decoder.steps(int(line))), flush=True)


def start_worker(args, env_overrides: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_BLAS_REEXEC")}
    env.setdefault("OMLX_MATMUL", "auto")
    env.update(env_overrides)
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--rows", str(args.rows),
               "--tokens", str(args.tokens), "--warmup", str(args.warmup)]
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"variant {env_overrides} did not start (exit {proc.wait()})")
    return proc, json.loads(line)


def burst(proc: subprocess.Popen, steps: int) -> dict:
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "bench/models/smollm2-135m-f32"))
    parser.add_argument("--variant", action="append", help="preset name or name:KEY=VALUE ... (first is the baseline)")
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per variant, one set a round")
    parser.add_argument("--bursts", type=int, default=6, help="turns each variant takes per round")
    parser.add_argument("--steps", type=int, default=0, help="timed steps a turn (default 30 at 1 row, 6 above)")
    parser.add_argument("--rows", type=int, default=1, help="requests decoding together")
    parser.add_argument("--tokens", type=int, default=0, help="tokens per request (default 200 at 1 row, 64 above)")
    parser.add_argument("--warmup", type=int, default=6, help="steps of a wave not timed")
    parser.add_argument("--json", help="write every turn's result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = args.tokens or (200 if args.rows == 1 else 64)
    args.steps = args.steps or (30 if args.rows == 1 else 6)
    if args.worker:
        worker(args)
        return
    variants = [_variant(v) for v in (args.variant or ["glibc", "omlx-default"])]
    names = [name for name, _ in variants]
    print(f"model {args.model}, {args.rows} row(s), {args.rounds} rounds x {args.bursts} turns x {args.steps} steps, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    turns: dict[str, list[dict]] = {name: [] for name in names}
    paired: dict[str, list[float]] = {name: [] for name in names}  # turn median / the baseline's, same slot
    for r in range(args.rounds):
        procs = {}
        for name, env in variants:  # loaded one after another, so no load competes with a timed turn
            procs[name], ready = start_worker(args, env)
            if r == 0:
                print(f"  {name}: form {ready['form']}, LD_PRELOAD={ready['preload']!r}", flush=True)
        try:
            for b in range(args.bursts):
                # The variants take turns; the order rotates so none always follows the same one.
                k = (r * args.bursts + b) % len(names)
                slot = {}
                for name in names[k:] + names[:k]:
                    out = burst(procs[name], args.steps)
                    out["median_ms"] = statistics.median(out["times"]) * 1e3
                    turns[name].append(out)
                    slot[name] = out["median_ms"]
                for name in names:
                    paired[name].append(slot[name] / slot[names[0]])
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(timeout=60)
        print(f"  round {r + 1}: " + ", ".join(
            f"{name} {statistics.median(t['median_ms'] for t in turns[name][-args.bursts:]):.2f} ms" for name in names),
            flush=True)
    print(f"\n{'variant':>14} {'median step':>12} {'p10':>7} {'p90':>7} {'ratio':>6} {'paired ratio (q1..q3)':>22}"
          f" {'cpu ms':>7} {'ctxsw':>6} {'faults':>7}")
    base = statistics.median(x for t in turns[names[0]] for x in t["times"])
    for name in names:
        times = [x for t in turns[name] for x in t["times"]]
        steps = len(times)
        q = statistics.quantiles(times, n=10)
        pq = statistics.quantiles(paired[name], n=4)
        print(f"{name:>14} {statistics.median(times) * 1e3:>9.2f} ms {q[0] * 1e3:>7.2f} {q[-1] * 1e3:>7.2f} "
              f"{statistics.median(times) / base:>6.3f} {statistics.median(paired[name]):>9.3f} ({pq[0]:.3f}..{pq[2]:.3f}) "
              f"{sum(t['cpu'] for t in turns[name]) / steps * 1e3:>7.2f} "
              f"{sum(t['switches'] for t in turns[name]) / steps:>6.0f} {sum(t['faults'] for t in turns[name]) / steps:>7.1f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": args.rows, "variants": dict(variants),
                                               "turns": turns, "paired": paired}))


if __name__ == "__main__":
    main()
