#!/usr/bin/env python
"""The per-token graph: what each load-time graph reduction saves on a decode step, and the
floor (the same layers with tiny dims, where the matmuls are nearly free).

    OMLX_MATMUL=auto python bench/step_floor.py [--model bench/models/smollm2-135m-f32] [--rows 1,32]

For the model and for its floor twin (same layer count and architecture; hidden 64, 2 heads,
vocabulary 512) it loads one copy per variant, packed bf16, and times decode steps side by
side, variants taking turns step by step (the fastest of `--rounds` steps each), with the
engine's StepProfile:
- packed: the packed bf16 layers alone (the form before this work);
- +fused: q/k/v and gate/up in one kernel call each (omlx/models/fused_projections.py);
- +rope: RoPE's table once a pass, its rotation one node (omlx/models/shared_rope.py);
- +norm: RMSNorm one node (omlx/models/kernel_norms.py);
- +routed: attention's ragged pass in five nodes and the MLP's SwiGLU in two
  (omlx/models/ragged_attention.py, omlx/models/fused_mlp.py): what omlx serves now.
First, per call: RMSNorm and RoPE as MLX's CPU fallback graph, under mx.compile, and as the
one-node kernels.  Last, mlx-lm's own decode (stream_generate, float32) on both shapes, the
reference the issue measured.  Needs a CPU with a bf16 unit and the kernels built.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

import numpy as np  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_breakdown  # noqa: E402

from omlx.kernels.linear import matmul_path  # noqa: E402
from omlx.models import packed_weights  # noqa: E402
from omlx.models.fused_mlp import fuse_mlps  # noqa: E402
from omlx.models.fused_projections import fuse_projections  # noqa: E402
from omlx.models.kernel_norms import swap_rms_norms  # noqa: E402
from omlx.models.ragged_attention import route_ragged_attention  # noqa: E402
from omlx.models.shared_rope import share_rope_tables  # noqa: E402
from omlx.testing.tiny_models import TinyModelSpec, build_model  # noqa: E402

HERE = Path(__file__).resolve().parent
SWAPS = {"fuse_projections": fuse_projections, "share_rope_tables": share_rope_tables,
         "swap_rms_norms": swap_rms_norms, "route_ragged_attention": route_ragged_attention, "fuse_mlps": fuse_mlps}
VARIANTS = {
    "packed": (),
    "+fused": ("fuse_projections",),
    "+rope": ("fuse_projections", "share_rope_tables"),
    "+norm": ("fuse_projections", "share_rope_tables", "swap_rms_norms"),
    # The attention's ragged pass and the SwiGLU MLP in a few nodes (omlx/models/ragged_attention.py,
    # omlx/models/fused_mlp.py): what omlx serves now.
    "+routed": ("fuse_projections", "share_rope_tables", "swap_rms_norms", "route_ragged_attention", "fuse_mlps"),
}


def engine_for(model, rows: int, context: int):
    """step_breakdown's engine without speculation: every step decodes one token per row."""
    from omlx.scheduler import EngineConfig, LLMEngine

    blocks = rows * (-(-(context + 64) // 32)) + 8
    return LLMEngine(model, EngineConfig(block_size=32, num_blocks=blocks, max_num_seqs=rows, max_num_batched_tokens=2048,
                                         prefix_cache=False, speculative=False), 16384)


def load_variant(path: Path, swaps: tuple[str, ...]):
    """The model packed bf16 with only `swaps` of the load-time graph reductions applied."""
    model, tokenizer = load(str(path))
    for name in SWAPS:
        setattr(packed_weights, name, lambda m: 0)
    try:
        packed_weights.pack_model(model)
    finally:
        for name, swap in SWAPS.items():
            setattr(packed_weights, name, swap)
    for name in swaps:
        SWAPS[name](model)
    return model, tokenizer


def floor_twin(path: Path, work: Path) -> Path:
    """The model's layers (count, architecture, rope) with tiny dims: the per-op floor."""
    import json

    config = json.loads((path / "config.json").read_text())
    spec = TinyModelSpec(model_type="llama", hidden_size=64, num_hidden_layers=config["num_hidden_layers"],
                         intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         vocab_size=512, tie_word_embeddings=config.get("tie_word_embeddings", False),
                         extra_config={"rope_theta": config.get("rope_theta", 10000.0)})
    return build_model(work / "floor", spec)


def one_stream(path: Path, rounds: int = 3, tokens: int = 48) -> dict[str, float]:
    """tok/s of one greedy stream through the engine (200-token prompt, no speculation), per
    variant: 1 / the median time per generated token, the variants' streams stepping in
    turn (`rounds` streams each), so a burst of other work hits them alike."""
    from omlx.scheduler import GenerationRequest

    prompt = np.random.default_rng(1).integers(10, 500, size=200).tolist()
    models = {name: load_variant(path, swaps)[0] for name, swaps in VARIANTS.items()}
    times = {name: [] for name in models}
    for _ in range(rounds):
        engines = {}
        for name, model in models.items():
            engines[name] = engine_for(model, 1, 400)
            engines[name].add_request(GenerationRequest("one", prompt, max_tokens=tokens + 1))
            engines[name].step()  # prefill + first token
        for _ in range(tokens):
            for name, engine in engines.items():
                started = time.perf_counter()
                produced = sum(1 for _, e in engine.step() if e.token_id is not None)
                assert produced == 1, produced
                times[name].append(time.perf_counter() - started)
    return {name: 1.0 / float(np.median(t)) for name, t in times.items()}


def mlx_lm_rate(path: Path, tokens: int = 40) -> float:
    model, tokenizer = load(str(path))
    prompt = np.random.default_rng(0).integers(10, 500, size=200).tolist()
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        pass
    return last.generation_tps


def measure(path: Path, rows_list: list[int], context: int, rounds: int) -> dict:
    """Per variant, the fastest of `rounds` single decode steps, variants taking turns step by
    step (on a machine shared with other work a step that was preempted is simply not the
    fastest; medians of whole runs swing 2x there)."""
    models = {name: load_variant(path, swaps)[0] for name, swaps in VARIANTS.items()}
    rng = np.random.default_rng(0)
    results = {}
    for rows in rows_list:
        engines = {}
        for name, model in models.items():
            engines[name] = engine_for(model, rows, context)
            step_breakdown.fill(engines[name], rows, context, rng)
            engines[name].step()  # warm
        best = {name: None for name in models}
        for _ in range(rounds):  # fill's requests allow 60 tokens: rounds stay below
            for name, engine in engines.items():
                engine.profile.reset()
                engine.step()
                mean = engine.profile.report()["mean_ms"]
                assert engine.profile.steps == 1 and engine.has_work
                if best[name] is None or sum(mean.values()) < sum(best[name].values()):
                    best[name] = mean
        results[rows] = best
        del engines
    return results


def graph_nodes(path: Path) -> dict[str, int]:
    """Operations in one decode step's graph (one row), per variant: the count the per-node
    cost multiplies, and unlike a time, the same on a loaded machine."""
    import re

    import mlx.core as mx

    counts = {}
    for name, swaps in VARIANTS.items():
        model = load_variant(path, swaps)[0]
        engine = engine_for(model, 1, 256)
        step_breakdown.fill(engine, 1, 256, np.random.default_rng(0))
        runner, real = engine.runner, engine.runner._forward_ragged
        with tempfile.NamedTemporaryFile(suffix=".dot") as dot:
            def export(*args, **kwargs):
                logits, written = real(*args, **kwargs)
                mx.export_to_dot(dot.name, logits)
                return logits, written

            runner._forward_ragged = export
            engine.step()
            counts[name] = len(re.findall(r"shape=rectangle", Path(dot.name).read_text()))
    return counts


def op_costs(rows_list: list[int], calls: int = 60, repeats: int = 7) -> None:
    """Per call (build + eval, `calls` a step as a 30-layer model makes them) of RMSNorm and
    RoPE three ways: MLX's CPU fallback graph, that graph under mx.compile (the other way to
    cut nodes), and the one-node kernels omlx swaps in."""
    import mlx.core as mx
    import mlx.nn as nn

    from omlx.kernels import fused_ops
    from omlx.models.kernel_norms import KernelRMSNorm
    from omlx.models.shared_rope import SharedRoPE

    def per_call(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            mx.eval([fn() for _ in range(calls)])
            best = min(best, time.perf_counter() - started)
        return best / calls * 1e6

    norm = lambda x, w: mx.fast.rms_norm(x, w, 1e-5)  # noqa: E731
    rope = nn.RoPE(64, base=100000.0)
    rope_fn = lambda q, o: mx.fast.rope(q, 64, traditional=False, base=100000.0, scale=1.0, offset=o)  # noqa: E731
    compiled_norm, compiled_rope = mx.compile(norm), mx.compile(rope_fn)
    kernel_norm, shared = KernelRMSNorm(mx.ones((576,)), 1e-5), SharedRoPE.from_rope(rope)
    print("| rows | op | MLX fallback us | mx.compile us | omlx kernel us |")
    print("|---|---|---|---|---|")
    for rows in rows_list:
        x, w = mx.random.normal((rows, 1, 576)), mx.ones((576,))
        q, offsets = mx.random.normal((rows, 9, 1, 64)), mx.arange(rows, dtype=mx.int32) + 200
        mx.eval(x, w, q, offsets)
        print(f"| {rows} | rms_norm | {per_call(lambda: norm(x, w)):.1f} | {per_call(lambda: compiled_norm(x, w)):.1f} | "
              f"{per_call(lambda: kernel_norm(x)):.1f} |")
        print(f"| {rows} | rope | {per_call(lambda: rope(q, offset=offsets)):.1f} | "
              f"{per_call(lambda: compiled_rope(q, offsets)):.1f} | {per_call(lambda: shared(q, offset=offsets)):.1f} |")
    print(f"\n(kernel built: {fused_ops.kernel() is not None}; the rope kernel's table is computed once per "
          f"offsets array, so {calls} calls share one)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / "models" / "smollm2-135m-f32")
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=40, help="decode steps timed per variant (at most 55)")
    parser.add_argument("--repeats", type=int, default=3, help="one-stream runs per variant")
    args = parser.parse_args()
    if not matmul_path().bf16:
        sys.exit(f"no packed bf16 path here: {matmul_path().reason}")
    rows_list = [int(r) for r in args.rows.split(",")]
    import os

    from omlx.kernels.cpu_features import cpu_features

    print(f"CPU: {cpu_features().summary()}; load average at start {os.getloadavg()[0]:.1f}\n")
    op_costs(rows_list)
    with tempfile.TemporaryDirectory(prefix="omlx-floor-") as work:
        shapes = {args.model.name: args.model, "floor (tiny dims)": floor_twin(args.model, Path(work))}
        print(f"# Per-token graph: {args.model.name} and its floor twin, packed bf16, context {args.context}\n")
        for label, path in shapes.items():
            nodes = graph_nodes(path)
            print(f"graph nodes of one decode step, {label}: " + ", ".join(f"{n} {c}" for n, c in nodes.items()))
        print()
        print("| model | rows | variant | step ms | prepare | compute | vs packed |")
        print("|---|---|---|---|---|---|---|")
        for label, path in shapes.items():
            for rows, best in measure(path, rows_list, args.context, min(args.rounds, 55)).items():
                base = sum(best["packed"].values())
                for name, mean in best.items():
                    total = sum(mean.values())
                    print(f"| {label} | {rows} | {name} | {total:.1f} | {mean['prepare']:.2f} | {mean['compute']:.1f} | "
                          f"{base / total:.2f}x |", flush=True)
        print()
        for label, path in shapes.items():
            rates = one_stream(path, args.repeats)
            print(f"one stream (median token), {label}: " + ", ".join(f"{name} {rate:.1f} tok/s" for name, rate in rates.items())
                  + f" ({rates['+norm'] / rates['packed']:.2f}x)", flush=True)
        for label, path in shapes.items():
            started = time.perf_counter()
            print(f"mlx-lm stream_generate (float32), {label}: {mlx_lm_rate(path):.1f} tok/s "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
