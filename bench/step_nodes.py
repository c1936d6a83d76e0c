#!/usr/bin/env python
"""The nodes of one decode step's graph, by primitive, in the form omlx serves.

    OMLX_MATMUL=auto python bench/step_nodes.py [--model bench/models/smollm2-135m-f32] [--rows 1]
                                                [--time STEPS] [--per-call] [--floor]

Loads the model as the server does (packed weights and the load-time graph reductions),
admits `--rows` sequences of `--context` tokens, and exports the graph of one ragged decode
step (its logits and the KV pool writes) with `mx.export_to_dot`.  Every node costs MLX's
eval, a task dispatch and an allocation each step whatever its size, so on a small model this
count is what the per-token floor multiplies; unlike a time, it is the same on a loaded
machine.

`--time STEPS`: decode steps timed alternately with the attention node as it is built now and
with the graph it was built as before (every input wrapped in a `contiguous` node, queries
reshaped to 3-D and the output back: the same kernel, only those nodes added), one engine,
the two forms taking turns step by step; prints each form's median step and their ratio.
`--per-call`: one layer's decode attention call (build + eval, 30 a step) in the two forms.
`--floor`: the model's floor twin (step_floor.py: its layers with tiny dims) instead.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_breakdown  # noqa: E402

from omlx.kernels import backend  # noqa: E402
from omlx.models import packed_weights, weight_form  # noqa: E402
from omlx.scheduler import EngineConfig, LLMEngine  # noqa: E402

HERE = Path(__file__).resolve().parent


class ContiguousInputs:
    """The attention kernel called as its node was built before: `contiguous` around each
    input, 3-D queries (a reshape in, a reshape out)."""

    def __init__(self, module):
        self.module = module

    def paged_attention(self, q, k_pool, v_pool, tables, seqs, groups, **kw):
        if kw.get("sinks") is not None:
            kw["sinks"] = mx.contiguous(kw["sinks"])
        tokens, heads, dim = q.shape[0], q.shape[1], q.shape[-1]
        out = self.module.paged_attention(
            mx.contiguous(q.reshape(tokens, heads, dim)), [mx.contiguous(p) for p in k_pool],
            [mx.contiguous(p) for p in v_pool], mx.contiguous(tables), mx.contiguous(seqs), mx.contiguous(groups), **kw)
        return out.reshape(tokens, heads, 1, -1)


def decode_engine(model, rows: int, context: int) -> LLMEngine:
    blocks = rows * (-(-(context + 64) // 32)) + 8
    engine = LLMEngine(model, EngineConfig(block_size=32, num_blocks=blocks, max_num_seqs=rows,
                                           max_num_batched_tokens=2048, prefix_cache=False, speculative=False),
                       16384)
    step_breakdown.fill(engine, rows, context, np.random.default_rng(0))
    return engine


def alternate(model, rows: int, context: int, steps: int) -> dict[str, float]:
    """Median decode step (ms) of each attention form, the forms taking turns step by step."""
    from omlx.scheduler import runner as runner_module

    now = backend.attention_backend()
    before = backend.AttentionBackend(now.name, "contiguous inputs", ContiguousInputs(now.module), now.threads)
    forms = {"as built": lambda: now, "contiguous inputs": lambda: before}
    real = runner_module.attention_backend
    times = {name: [] for name in forms}
    engine = decode_engine(model, rows, context)
    engine.step()
    try:
        for i in range(steps):
            if not engine.has_work:
                engine = decode_engine(model, rows, context)
                engine.step()
            name = list(forms)[i % 2]
            runner_module.attention_backend = forms[name]
            started = time.perf_counter()
            engine.step()
            times[name].append((time.perf_counter() - started) * 1e3)
    finally:
        runner_module.attention_backend = real
    return {name: float(np.median(t)) for name, t in times.items()}


def per_call_us(rounds: int = 200, calls: int = 30) -> dict[str, tuple[float, float]]:
    """(median, fastest) microseconds of one decode attention call, SmolLM2's shape (9 query
    heads over 3 KV heads, dim 64, 256 keys), evaluated inputs, `calls` per eval as a step
    makes them; the two forms taking turns round by round."""
    from omlx.kernels.paged_attention import RaggedPlan

    module = backend.attention_backend().module
    forms = {"as built": module, "contiguous inputs": ContiguousInputs(module)}
    rng = np.random.default_rng(0)
    kv_heads, block_size, dim = 3, 32, 64
    pool_k = mx.array(rng.standard_normal((10 * kv_heads * block_size, dim)).astype(np.float32))
    pool_v = mx.array(rng.standard_normal((10 * kv_heads * block_size, dim)).astype(np.float32))
    _, plan = RaggedPlan.for_sequences([list(range(1, 9))], [1], [255], kv_heads, block_size, kernel=module)
    q = mx.array(rng.standard_normal((1, 3 * kv_heads, 1, dim)).astype(np.float32))
    mx.eval(pool_k, pool_v, q)
    times = {name: [] for name in forms}
    for _ in range(rounds):
        for name, form in forms.items():
            started = time.perf_counter()
            mx.eval([form.paged_attention(q, [pool_k], [pool_v], plan.tables, plan.seqs, plan.groups,
                                          kv_heads=kv_heads, block_size=block_size, scale=dim**-0.5)
                     for _ in range(calls)])
            times[name].append((time.perf_counter() - started) / calls * 1e6)
    return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def step_primitives(model, rows: int, context: int) -> collections.Counter:
    """Primitive name -> nodes in one decode step of `rows` sequences."""
    engine = decode_engine(model, rows, context)
    engine.step()  # a first decode step: the one exported below is a steady one
    runner, real = engine.runner, engine.runner._forward_ragged
    with tempfile.NamedTemporaryFile(suffix=".dot") as dot:
        def export(*args, **kwargs):
            logits, written = real(*args, **kwargs)
            mx.export_to_dot(dot.name, logits, *written)
            return logits, written

        runner._forward_ragged = export
        try:
            engine.step()
        finally:
            runner._forward_ragged = real
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', Path(dot.name).read_text())
    return collections.Counter(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(HERE / "models" / "smollm2-135m-f32"))
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--time", type=int, default=0, metavar="STEPS")
    parser.add_argument("--per-call", action="store_true")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--packed-only", action="store_true",
                        help="packed weights alone (the load-time swaps of weight_form.apply left out)")
    args = parser.parse_args()
    if args.floor:
        import step_floor

        work = tempfile.TemporaryDirectory()
        args.model = str(step_floor.floor_twin(Path(args.model), Path(work.name)))
    model, _ = load(args.model)
    if args.packed_only:
        packed_weights.pack_model(model)
        form = "bf16-packed, no load-time graph reductions"
    else:  # as the server loads it: routed attention, fused MLP / residual norms, shared RoPE
        form = weight_form.apply(model, None, 8 << 30)
    counts = step_primitives(model, args.rows, args.context)
    print(f"{args.model} ({form}): {args.rows} row(s), context {args.context}: {sum(counts.values())} nodes per step")
    for name, n in counts.most_common():
        print(f"  {name:32s} {n:5d}")
    if args.time:
        medians = alternate(model, args.rows, args.context, args.time)
        for name, ms in medians.items():
            print(f"median step, attention node {name}: {ms:.2f} ms")
        print(f"ratio (contiguous inputs / as built): {medians['contiguous inputs'] / medians['as built']:.3f}")
    if args.per_call:
        for name, (median, fastest) in per_call_us().items():
            print(f"attention call, {name}: median {median:.1f} us, fastest {fastest:.1f} us")


if __name__ == "__main__":
    main()
