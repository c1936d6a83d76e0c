"""The matmuls of one SmolLM2-135M decode step in three forms of the same 4-bit weights:
packed bf16 (omlx/kernels/linear.py), quantized-bf16 (omlx/kernels/quant_bf16.py: the stored
codes unpacked to bf16 in the kernel, bit-identical to packed bf16) and the int8 kernel
(omlx/kernels/quant_linear.py), rounds alternated in one process.

30 layers x 7 projections (4-bit, groups of 32) + the 8-bit 49152-row head, each layer its own
random weights (so a step streams the model's bytes, as decode does), one call per layer as a
model makes them.  Prints the best and median step time per form and row count, and the
ratios against packed bf16; then single-call minimums on one projection shape held in cache
(the kernels' compute, not the bytes).

    python bench/quant_bf16_bench.py [--rows 1,32,128] [--rounds 11]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (N, K)
LAYERS = 30
HEAD = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,32,128")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from omlx.kernels import quant_bf16, quant_linear
    from omlx.kernels.cpu_features import cpu_features
    from omlx.kernels.linear import PackedLinear

    rng = np.random.default_rng(0)
    layers = [nn.QuantizedLinear(k, n, bias=False, group_size=32, bits=4) for _ in range(LAYERS) for n, k in SHAPES]
    layers.append(nn.QuantizedLinear(HEAD[1], HEAD[0], bias=False, group_size=32, bits=8))
    forms = {
        "bf16-packed": [PackedLinear.from_linear(l) for l in layers],
        "quant-bf16": [quant_bf16.QuantBf16Linear.from_quantized(l) for l in layers],
        "int8-kernel": [quant_linear.QuantLinear.from_quantized(l) for l in layers],
    }
    for form in forms.values():
        mx.eval([l.parameters() for l in form])
    widths = [l.weight.shape[1] * 32 // l.bits for l in layers]
    del layers
    print(f"CPU: {cpu_features().model} ({cpu_features().summary()}); MLX {mx.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}; {args.rounds} alternated rounds")

    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: mx.array(rng.standard_normal((m, k)).astype(np.float32)) for k in set(widths)}
        mx.eval(list(xs.values()))
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, form in forms.items():
                start = time.perf_counter()
                for layer, k in zip(form, widths):
                    mx.eval(layer(xs[k]))
                times[name].append((time.perf_counter() - start) * 1e3)
        base_best, base_median = min(times["bf16-packed"]), statistics.median(times["bf16-packed"])
        cells = [f"{name} {min(v):7.2f} ms (median {statistics.median(v):7.2f}; "
                 f"{base_best / min(v):.2f}x / {base_median / statistics.median(v):.2f}x)" for name, v in times.items()]
        print(f"step, {m:4d} rows: " + " | ".join(cells))

    # One 1536 x 576 projection, cache-resident: best single call of many (a ~50 us call is
    # rarely preempted even on a loaded machine).
    layer = nn.QuantizedLinear(576, 1536, bias=False, group_size=32, bits=4)
    one = {"bf16-packed": PackedLinear.from_linear(layer), "quant-bf16": quant_bf16.QuantBf16Linear.from_quantized(layer),
           "int8-kernel": quant_linear.QuantLinear.from_quantized(layer)}
    mx.eval([l.parameters() for l in one.values()])
    for m in (1, 4, 5, 32, 128):
        x = mx.array(rng.standard_normal((m, 576)).astype(np.float32))
        mx.eval(x)
        best = {}
        for _ in range(4):
            for name, f in one.items():
                for _ in range(50):
                    start = time.perf_counter()
                    mx.eval(f(x))
                    best[name] = min(best.get(name, 1e9), (time.perf_counter() - start) * 1e6)
        print(f"1536x576 in cache, {m:4d} rows: " + " | ".join(
            f"{name} {us:8.1f} us ({best['bf16-packed'] / us:.2f}x)" for name, us in best.items()))


if __name__ == "__main__":
    main()
