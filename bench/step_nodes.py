#!/usr/bin/env python
"""The nodes of one decode step's graph, by primitive, in the form omlx serves.

    OMLX_MATMUL=auto python bench/step_nodes.py [--model bench/models/smollm2-135m-f32] [--rows 1]

Loads the model as the server does (packed weights and the load-time graph reductions),
admits `--rows` sequences of `--context` tokens, and exports the graph of one ragged decode
step (its logits and the KV pool writes) with `mx.export_to_dot`.  Every node costs MLX's
eval, a task dispatch and an allocation each step whatever its size, so on a small model this
count is what the per-token floor multiplies; unlike a time, it is the same on a loaded
machine.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_breakdown  # noqa: E402

from omlx.models import packed_weights  # noqa: E402
from omlx.scheduler import EngineConfig, LLMEngine  # noqa: E402

HERE = Path(__file__).resolve().parent


def step_primitives(model, rows: int, context: int) -> collections.Counter:
    """Primitive name -> nodes in one decode step of `rows` sequences."""
    blocks = rows * (-(-(context + 64) // 32)) + 8
    engine = LLMEngine(model, EngineConfig(block_size=32, num_blocks=blocks, max_num_seqs=rows,
                                           max_num_batched_tokens=2048, prefix_cache=False, speculative=False),
                       16384)
    step_breakdown.fill(engine, rows, context, np.random.default_rng(0))
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
    args = parser.parse_args()
    model, _ = load(args.model)
    packed_weights.pack_model(model)
    counts = step_primitives(model, args.rows, args.context)
    print(f"{args.model}: {args.rows} row(s), context {args.context}: {sum(counts.values())} nodes per step")
    for name, n in counts.most_common():
        print(f"  {name:32s} {n:5d}")


if __name__ == "__main__":
    main()
