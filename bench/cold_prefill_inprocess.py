#!/usr/bin/env python
"""Cold TTFT of one long prompt in-process (no HTTP): the engine's prefill of a 1,500-token
prompt (prefix cache off, 512-token chunks) on the default path (packed bf16 weights, bf16 KV
pool) against the float32 path (OMLX_MATMUL=float32: float32 weights and pool), both models
loaded in this process and alternated round by round so that their ratio is measured under
the same machine load.

    python bench/cold_prefill_inprocess.py [MODEL] [--tokens 1500] [--budget 512] [--rounds 3]
                                           [--against OLD_ATTENTION.so]

`--against` adds a third variant: the default path with another build of the attention kernel
(`_paged_attention_cpu`, e.g. a copy of the .so from before a change), to show what the kernel
alone changed.  Prints each round's TTFT and the medians' ratios.  Issue 23's target: the
default path >= 3x faster than the float32 path.

`--decode-context N` (N > 0) then decodes one stream at about N tokens of context on each
variant (speculation and overlapped steps off: one row a step), in turns of 12 steps
alternating between the variants, and prints each one's median step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)  # before MLX loads: OpenBLAS in place of the reference BLAS

import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

from omlx.kernels import linear as linear_kernel  # noqa: E402
from omlx.models import weight_form  # noqa: E402
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402
from omlx.scheduler import runner as runner_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_engine(path: str, matmul: str, budget: int):
    """The model in the form OMLX_MATMUL=`matmul` gives it, and an engine over it."""
    os.environ[linear_kernel.ENV] = matmul
    linear_kernel.matmul_path.cache_clear()
    model, tokenizer = load(path)
    form = weight_form.apply(model, None, 8 << 30)
    config = EngineConfig(block_size=32, num_blocks=256, max_num_seqs=8, max_num_batched_tokens=budget,
                          prefix_cache=False, speculative=False, overlap_steps=False)
    return LLMEngine(model, config, 16384), tokenizer, form


def cold_ttft(engine, ids: list[int]) -> float:
    engine.add_request(GenerationRequest(f"r{time.monotonic_ns()}", ids, max_tokens=1))
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "bench/models/smollm2-135m-f32"))
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", help="another build of _paged_attention_cpu for the default path")
    parser.add_argument("--decode-context", type=int, default=0, help="also time one stream's decode steps")
    args = parser.parse_args()

    engines = {}
    engines["float32"] = build_engine(args.model, "float32", args.budget)
    engines["default"] = build_engine(args.model, "auto", args.budget)
    tokenizer = engines["default"][1]
    chosen = runner_module.attention_backend()
    kernels = {"float32": chosen, "default": chosen}
    if args.against:
        sys.path.insert(0, str(ROOT / "bench"))
        from attention_kernel_calls import load_build

        engines["default-old-attention"] = engines["default"]
        kernels["default-old-attention"] = dataclasses.replace(chosen, module=load_build(args.against))
    for name, (_, _, form) in engines.items():
        print(f"{name}: weights {form}")
    text = (ROOT / "README.md").read_text() * 4
    ids = tokenizer.encode(text)
    if len(ids) < args.tokens + 1000 * (args.rounds + 1):
        ids = ids * (1 + (args.tokens + 1000 * (args.rounds + 1)) // len(ids))
    for name, (engine, _, _) in engines.items():  # warm: kernels loaded, pools touched
        runner_module.attention_backend = lambda k=kernels[name]: k
        cold_ttft(engine, ids[:300])
    print(f"load average: {os.getloadavg()[0]:.2f}; cold {args.tokens}-token prompt, {args.budget}-token chunks")
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        prompt = ids[1000 * r + 7: 1000 * r + 7 + args.tokens]
        for name, (engine, _, _) in engines.items():
            runner_module.attention_backend = lambda k=kernels[name]: k
            times[name].append(cold_ttft(engine, prompt))
        print(f"round {r}: " + "  ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    medians = {n: float(np.median(t)) for n, t in times.items()}
    print("median TTFT: " + "  ".join(f"{n} {m:.3f}s" for n, m in medians.items()))
    print(f"float32 / default: {medians['float32'] / medians['default']:.2f}x (target >= 3x)")
    if args.against:
        print(f"default with the old attention / default: {medians['default-old-attention'] / medians['default']:.2f}x")
    if args.decode_context > 0:
        decode_steps(engines, kernels, ids[: args.decode_context])
    return 0


def decode_steps(engines, kernels, prompt: list[int], turns: int = 10, steps: int = 12) -> None:
    """One stream per variant, decoding from `prompt`; the variants take turns of `steps`."""
    variants = len(engines)
    started = set()
    for name, (engine, _, _) in engines.items():  # variants sharing an engine share its stream
        if id(engine) in started:
            continue
        started.add(id(engine))
        runner_module.attention_backend = lambda k=kernels[name]: k
        engine.add_request(GenerationRequest(f"d-{name}", prompt, max_tokens=variants * turns * steps + 8,
                                             speculative=False))
        engine.step()  # the prefill
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(turns):
        for name, (engine, _, _) in engines.items():
            runner_module.attention_backend = lambda k=kernels[name]: k
            for i in range(steps):
                start = time.perf_counter()
                engine.step()
                if i >= 2:  # the first steps after a switch pay for the other variant's cache traffic
                    times[name].append(time.perf_counter() - start)
    medians = {n: float(np.median(t)) for n, t in times.items()}
    print(f"decode at {len(prompt)} tokens of context, median step: "
          + "  ".join(f"{n} {m * 1e3:.2f} ms" for n, m in medians.items()))
    if "default-old-attention" in medians:
        print(f"default with the old attention / default: {medians['default-old-attention'] / medians['default']:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
