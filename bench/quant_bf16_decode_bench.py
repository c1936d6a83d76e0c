"""quantized-bf16 against packed bf16, one kernel call at a time, at decode row counts.

The two forms compute the same bits (omlx/kernels/quant_bf16.py), so a model may hold both
and pick per step by row count (omlx/models/dual_form.py); this measures where the quantized
one wins.  For each of SmolLM2-135M's projection shapes (4-bit, groups of 32; the tied head
8-bit, as the Q4_1 GGUF stores it) it builds a ring of distinct weight copies larger than the
L3 cache (so every call streams its weights from memory, as a decode step does), then times
`--calls` calls evaluated together (one mx.eval: the per-call figure is the kernel plus
MLX's dispatch, not Python's graph building), forms alternated round by round.  Prints the
median per-call time of each form and quantized-bf16's time as a fraction of packed bf16's
(below 1: quantized-bf16 is faster), and the bytes each call reads.

With `--spin 0,100` each form is also timed at each setting of the kernels' worker spin
(OMLX_KERNEL_SPIN_US, omlx/kernels/cpu/spin_pool.h: 0 is OpenMP's sleeping threads), settings
alternated round by round in one process, and each setting's time is printed as a ratio to the
first's (below 1: faster than the first setting), with the share of quantized-bf16's pool tasks
the worker ran at each setting (the rest ran on MLX's stream thread).

    python bench/quant_bf16_decode_bench.py [--rows 1,4,8] [--rounds 15] [--shapes qkv,head] [--spin 0,100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (N, K, bits)
SHAPES = {
    "q/o": (576, 576, 4),
    "k/v": (192, 576, 4),
    "qkv": (960, 576, 4),
    "gate/up": (1536, 576, 4),
    "gate_up": (3072, 576, 4),
    "down": (576, 1536, 4),
    "head": (49152, 576, 8),
}
RING_BYTES = 96 << 20  # packed bf16 bytes per ring: three times a 32 MiB L3


def random_quantized(n: int, k: int, bits: int, rng):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    layer = nn.QuantizedLinear(k, n, bias=False, group_size=32, bits=bits)
    layer.weight = mx.array(rng.integers(0, 2**32, layer.weight.shape, dtype=np.uint64).astype(np.uint32))
    # GGUF-like groups (Q4_1 / Q8_0 as converted: positive scale, the minimum a few scales below
    # zero), so the kernel takes its offsets form as it does on SmolLM2.
    scales = np.abs(rng.standard_normal((n, k // 32)).astype(np.float32)) * 0.02 + 1e-3
    layer.scales = mx.array(scales).astype(mx.float16)
    below = rng.uniform(0, 16, scales.shape).astype(np.float32) if bits == 4 else np.float32(128)  # Q8_0: -128 * scale
    layer.biases = mx.array(-scales * below).astype(mx.float16)
    mx.eval(layer.parameters())
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40, help="calls per timed evaluation")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--spin", default="", help="worker spin settings (us) to alternate, e.g. 0,100")
    args = parser.parse_args()

    import mlx.core as mx
    import numpy as np

    from omlx.kernels import quant_bf16
    from omlx.kernels.cpu_features import cpu_features
    from omlx.kernels.linear import PackedLinear

    rng = np.random.default_rng(0)
    rows = [int(r) for r in args.rows.split(",")]
    module = quant_bf16.kernel()
    spins = [int(v) for v in args.spin.split(",")] if args.spin else [module.spin_us()]
    print(f"CPU: {cpu_features().model} ({cpu_features().summary()}); MLX {mx.__version__}; "
          f"OpenMP threads {module.num_threads()}; worker spin {spins} us; load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} alternated rounds of {args.calls} calls")
    spin_head = "".join(f" | {'spin ' + str(v) + ' us: packed':>20} {'quant':>7}" for v in spins)
    ratio_head = "".join(f" | {'vs spin ' + str(spins[0]) + ': p / q':>20}" for v in spins[1:])
    print(f"{'shape':>8} {'N x K':>12} {'rows':>4}{spin_head} | {'q / p':>6} | {'bytes q / p':>11}{ratio_head}")
    for name in args.shapes.split(","):
        n, k, bits = SHAPES[name]
        copies = max(2, -(-RING_BYTES // (2 * n * k)))
        packed, quant = [], []
        for _ in range(copies):
            layer = random_quantized(n, k, bits, rng)
            packed.append(PackedLinear.from_linear(layer))
            quant.append(quant_bf16.QuantBf16Linear.from_quantized(layer))
            mx.eval(packed[-1].parameters(), quant[-1].parameters())
        q_bytes = sum(quant[0][key].nbytes for key in ("codes", "panel_scales", "panel_biases"))
        p_bytes = packed[0]["weight"].nbytes
        for m in rows:
            x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
            mx.eval(x)
            times = {(form, spin): [] for spin in spins for form in ("packed", "quant")}
            shared = {spin: [0, 0] for spin in spins}  # quant calls' pool tasks: (the worker's, all)
            at = 0
            for _ in range(args.rounds + 1):
                picks = [(at + i) % copies for i in range(args.calls)]
                at += args.calls
                for spin in spins:
                    set_spin(spin)
                    for form, layers in (("packed", packed), ("quant", quant)):
                        before = module.pool_stats()
                        start = time.perf_counter()
                        mx.eval([layers[i](x) for i in picks])
                        times[form, spin].append((time.perf_counter() - start) / args.calls * 1e6)
                        if form == "quant":
                            after = module.pool_stats()
                            shared[spin][0] += after["worker_tasks"] - before["worker_tasks"]
                            shared[spin][1] += after["tasks"] - before["tasks"]
            med = {key: statistics.median(values[1:]) for key, values in times.items()}
            cells = "".join(f" | {med['packed', v]:>20.1f} {med['quant', v]:>7.1f}" for v in spins)
            first = spins[0]
            ratios = "".join(f" | {med['packed', v] / med['packed', first]:>11.2f}x {med['quant', v] / med['quant', first]:>6.2f}x"
                             for v in spins[1:])
            share = "".join(f" {spin}: {w / t:.2f}" for spin, (w, t) in shared.items() if t)
            print(f"{name:>8} {n:>5} x {k:<5} {m:>4}{cells} | {med['quant', first] / med['packed', first]:>5.2f}x | "
                  f"{q_bytes / p_bytes:>10.2f}x{ratios}{' | worker share' + share if share else ''}", flush=True)
        del packed, quant
    set_spin(spins[0])


def set_spin(us: int) -> None:
    """Both kernel modules' worker spin (each extension module has its own pool)."""
    from omlx.kernels import linear, quant_bf16

    quant_bf16.kernel().set_spin_us(us)
    linear.kernel().set_spin_us(us)


if __name__ == "__main__":
    main()
