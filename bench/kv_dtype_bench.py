#!/usr/bin/env python
"""The KV pool in float32 vs bf16 on the packed bf16 path (issue #23, item 6), side by side.

    OMLX_MATMUL=auto python bench/kv_dtype_bench.py --model bench/models/smollm2-135m-f32 \\
        [--rows 8,32] [--contexts 256,2048] [--steps 6] [--agreement-tokens 2048]

For each (running sequences, context length), with the model's linear layers packed bf16:
- attention: one decode step's attention alone - the fused kernel over every layer's pool, as
  the step runs it - with the pools in float32 and in bf16, calls alternated;
- step: a whole decode step of two engines over the same model, one per pool dtype, filled
  alike (bench/step_breakdown.py's fill: the KV stays zeros, a step costs the same) and
  stepped alternately, so machine load hits both alike.
Medians in ms, and the bf16 / float32 ratio.  Then agreement: teacher-forced top-1 of the
packed model with each pool dtype against the float32 model over real text
(omlx/testing/kv_agreement.py).  Prints the CPU, its ISA and the kernels that ran.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import engine_for, fill  # noqa: E402

from omlx.kernels.backend import attention_backend  # noqa: E402
from omlx.kernels.cpu_features import cpu_features  # noqa: E402
from omlx.kernels.linear import matmul_path  # noqa: E402
from omlx.kernels.paged_attention import RaggedPlan, ragged_attention  # noqa: E402
from omlx.models import packed_weights  # noqa: E402
from omlx.scheduler.kv_cache import KVLayout  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def attention_ms(layout: KVLayout, q_heads: int, rows: int, context: int, repeats: int) -> dict[str, float]:
    """Median ms of one decode step's attention (every layer) per pool dtype, calls alternated."""
    block_size = 32
    per_seq = -(-(context + 1) // block_size)
    num_blocks = rows * per_seq + 1
    tables = [list(range(1 + r * per_seq, 1 + (r + 1) * per_seq)) for r in range(rows)]
    kernel = attention_backend().module
    _, plan = RaggedPlan.for_sequences(tables, [1] * rows, [context] * rows, layout.num_kv_heads, block_size, kernel)
    pool_rows = num_blocks * layout.num_kv_heads * block_size
    queries = mx.random.normal((rows, q_heads, 1, layout.key_dim))
    scale = layout.key_dim ** -0.5
    pools = {}
    for name, dtype in DTYPES.items():
        layers = [(mx.random.normal((pool_rows, layout.key_dim)).astype(dtype),
                   mx.random.normal((pool_rows, layout.value_dim)).astype(dtype)) for _ in range(layout.num_layers)]
        mx.eval(layers)
        pools[name] = layers
    times = {name: [] for name in DTYPES}
    for _ in range(repeats + 1):
        for name, layers in pools.items():
            start = time.perf_counter()
            mx.eval([ragged_attention(queries, k, v, plan, scale) for k, v in layers])
            times[name].append((time.perf_counter() - start) * 1e3)
    del pools
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def step_ms(model, rows: int, context: int, steps: int) -> dict[str, float]:
    """Median ms of a whole decode step per pool dtype: two engines stepped alternately."""
    rng = np.random.default_rng(0)
    engines = {}
    for name in DTYPES:
        engine = engine_for(model, rows, context, name)
        fill(engine, rows, context, rng)
        engine.step()  # warm
        engines[name] = engine
    times = {name: [] for name in DTYPES}
    for _ in range(steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[name].append((time.perf_counter() - start) * 1e3)
    for engine in engines.values():
        engine.close()
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "models" / "smollm2-135m-f32")
    parser.add_argument("--rows", default="8,32")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--steps", type=int, default=6)  # per engine; fill() leaves 60 tokens per request
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--agreement-tokens", type=int, default=2048, help="0: skip the agreement run")
    args = parser.parse_args()
    if matmul_path().name != "bf16-packed":
        sys.exit(f"no packed bf16 path here: {matmul_path().reason}")
    model, _ = load(str(args.model))
    packed_weights.pack_model(model)
    layout = KVLayout.probe(model)
    q_heads = model.args.num_attention_heads
    print(f"# KV pool dtype on the packed bf16 path: {args.model.name}\n")
    print(f"CPU: {cpu_name()}; ISA: {cpu_features().summary()}; matmul: {matmul_path().library}; "
          f"attention: {attention_backend().name} ({attention_backend().threads} threads)")
    print(f"KV per token: float32 {layout.bytes_per_token} B, bfloat16 {layout.bytes_per_token // 2} B "
          f"({layout.num_layers} layers x {layout.num_kv_heads} heads x {layout.key_dim}+{layout.value_dim})\n")
    print("| rows | context | attention f32 ms | attention bf16 ms | ratio | step f32 ms | step bf16 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for context in [int(c) for c in args.contexts.split(",")]:
        for rows in [int(r) for r in args.rows.split(",")]:
            att = attention_ms(layout, q_heads, rows, context, args.repeats)
            step = step_ms(model, rows, context, args.steps)
            print(f"| {rows} | {context} | {att['float32']:.1f} | {att['bfloat16']:.1f} | "
                  f"{att['bfloat16'] / att['float32']:.2f} | {step['float32']:.1f} | {step['bfloat16']:.1f} | "
                  f"{step['bfloat16'] / step['float32']:.2f} |", flush=True)
    if args.agreement_tokens:
        from omlx.testing.kv_agreement import agreement

        started = time.perf_counter()
        result = agreement(str(args.model), args.agreement_tokens)
        tokens = result["tokens"]
        print(f"\nTeacher-forced top-1 vs the float32 model over {tokens} tokens of real text "
              f"({time.perf_counter() - started:.0f} s):")
        for name in DTYPES:
            print(f"- bf16 weights + {name} KV: {result[name]['agree'] / tokens:.2%} "
                  f"({result[name]['agree']}/{tokens})")


if __name__ == "__main__":
    main()
