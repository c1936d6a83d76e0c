#!/usr/bin/env python
"""Where a decode step's time goes, in-process, on the bench model (float32 qwen3, ~200M).

    python bench/step_breakdown.py [--rows 1,8,32] [--contexts 1024,4096] [--steps 12]

For each (running sequences, context length) it fills the engine with that many sequences
of that many prompt tokens, then times decode steps with the engine's own `StepProfile`
(schedule / prepare / compute / sample / postprocess) and splits `compute` into:
- attention: the drop in compute time when attention is replaced by a stub that still
  depends on the pool writes (so the writes stay in the graph);
- matmuls: the model's linear layers and the vocabulary head alone, on inputs of the step's
  shape;
- other ops: the rest (norms, RoPE, SwiGLU, residuals, KV writes, gathers).
It also compares one stream's decode with `mlx_lm.stream_generate` on the same prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402

from omlx.kernels.backend import attention_backend  # noqa: E402
from omlx.kernels.linear import PackedLinear, matmul_path  # noqa: E402
from omlx.models import packed_weights  # noqa: E402
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402
from omlx.scheduler import kv_cache  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "models" / "bench-200m"


def engine_for(model, rows: int, context: int, kv_dtype: str = "auto") -> LLMEngine:
    block_size = 32
    blocks = rows * (-(-(context + 64) // block_size)) + 8
    return LLMEngine(model, EngineConfig(block_size=block_size, num_blocks=blocks, max_num_seqs=rows,
                                         max_num_batched_tokens=2048, prefix_cache=False, kv_dtype=kv_dtype), 16384)


def fill(engine: LLMEngine, rows: int, context: int, rng) -> None:
    """Admit `rows` sequences of `context` prompt tokens.  Their prompts are marked computed
    without running the model (the KV stays zeros): a decode step costs the same whatever
    the cached values are, and prefilling 32 x 4k tokens here would take half an hour."""
    for i in range(rows):
        prompt = rng.integers(10, 30000, size=context).tolist()
        engine.add_request(GenerationRequest(f"r{i}", prompt, max_tokens=60))
    vocab = engine.model.args.vocab_size
    real_forward = engine.runner.forward
    engine.runner.forward = lambda seqs, counts, want, *a, **k: (
        mx.zeros((sum(want), vocab)) if any(want) else None)
    try:
        while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
    finally:
        engine.runner.forward = real_forward


def timed_steps(engine: LLMEngine, steps: int) -> dict:
    engine.step()  # warm
    engine.profile.reset()
    for _ in range(steps):
        engine.step()
    return engine.profile.report()["mean_ms"]


def matmul_ms(model, rows: int, repeats: int = 5) -> float:
    """The step's matmuls alone: every Linear (and the head) on a (rows, in) input."""
    linears = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear, PackedLinear))]
    inputs = [mx.random.normal((rows, in_features(m))) for m in linears]
    mx.eval(inputs)

    def run():
        mx.eval([m(x) for m, x in zip(linears, inputs)])

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def stub_attention(queries, pool_k, pool_v, plan, scale, window=0, chunk=0, sinks=None):
    anchor = pool_k.packed if isinstance(pool_k, kv_cache.QuantizedRows) else pool_k
    return queries + (anchor[:1, :1] * 0).astype(queries.dtype)


def in_features(layer: nn.Module) -> int:
    if isinstance(layer, PackedLinear):
        return layer.in_features
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]


def single_stream(model, tokenizer, rng, tokens: int = 48) -> tuple[float, float]:
    """tok/s of one stream: omlx's engine vs mlx_lm.stream_generate, same prompt, greedy."""
    prompt = rng.integers(10, 30000, size=200).tolist()
    last = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        last = response
    mlx_rate = last.generation_tps
    engine = engine_for(model, 1, 400)
    engine.add_request(GenerationRequest("one", prompt, max_tokens=tokens + 1))
    engine.step()  # prefill + first token
    start = time.perf_counter()
    produced = 0
    while engine.has_work:
        produced += sum(1 for _, e in engine.step() if e.token_id is not None)
    return produced / (time.perf_counter() - start), mlx_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--steps", type=int, default=10)  # two timed runs of this many: stay under max_tokens
    parser.add_argument("--weights", choices=("float32", "bf16"), default="float32",
                        help="bf16: the packed bf16 linear layers omlx serves with on a CPU with a bf16 unit")
    parser.add_argument("--kv-dtype", default="auto",
                        help="comma-separated KV pool dtypes to time side by side (auto, float32, bfloat16)")
    args = parser.parse_args()
    if not args.model.exists():
        from omlx.testing.tiny_models import BENCH_200M, build_model

        build_model(args.model, BENCH_200M)
    model, tokenizer = load(str(args.model))
    if args.weights == "bf16":
        if matmul_path().name != "bf16-packed":
            sys.exit(f"no packed bf16 path here: {matmul_path().reason}")
        packed_weights.pack_model(model)
    rng = np.random.default_rng(0)
    print(f"# Decode step breakdown: {args.model.name}, weights: {args.weights}, "
          f"attention: {attention_backend().name}\n")
    print("| rows | context | KV | step ms | schedule | prepare | compute | (attention | matmuls | other ops) | sample | postprocess | host share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    real_attention = kv_cache.ragged_attention
    for context in [int(c) for c in args.contexts.split(",")]:
        for rows, kv_dtype in [(int(r), d) for r in args.rows.split(",") for d in args.kv_dtype.split(",")]:
            engine = engine_for(model, rows, context, kv_dtype)
            fill(engine, rows, context, rng)
            mean = timed_steps(engine, args.steps)
            kv_cache.ragged_attention = stub_attention
            try:
                stubbed = timed_steps(engine, args.steps)
            finally:
                kv_cache.ragged_attention = real_attention
            attention = max(mean["compute"] - stubbed["compute"], 0.0)
            matmuls = min(matmul_ms(model, rows), mean["compute"] - attention)
            other = mean["compute"] - attention - matmuls
            total = sum(mean.values())
            host = total - mean["compute"]
            kv = engine.serving_info()["kv_dtype"]
            print(f"| {rows} | {context} | {kv} | {total:.1f} | {mean['schedule']:.2f} | {mean['prepare']:.2f} | "
                  f"{mean['compute']:.1f} | {attention:.1f} | {matmuls:.1f} | {other:.1f} | {mean['sample']:.2f} | "
                  f"{mean['postprocess']:.2f} | {host / total:.0%} |", flush=True)
            del engine
    omlx_rate, mlx_rate = single_stream(model, tokenizer, rng)
    print(f"\nOne stream, greedy decode: omlx engine {omlx_rate:.1f} tok/s, mlx_lm.stream_generate "
          f"{mlx_rate:.1f} tok/s (ratio {omlx_rate / mlx_rate:.2f})")


if __name__ == "__main__":
    main()
