#!/usr/bin/env python
"""The paged attention kernel on SmolLM2's shapes (9 query / 3 KV heads, head dim 64, blocks of
32): a one-row decode call against 64..1024 keys, and the chunks of a cold prompt's prefill
(512-token chunks at offsets 0, 512, 1024: what a 1,500-token prompt costs).  Each shape runs
with a bf16 pool (the packed path's) and a float32 pool (OMLX_MATMUL=float32's).

    python bench/attention_kernel_calls.py [--against OLD.so] [--rounds 5]

Decode: 30 calls (one per layer, each its own query) are built and evaluated together, as a
step does; the figure is wall time / 30, so it includes the call's graph node and dispatch.
Prefill: one call per chunk; GFLOP/s count the causal work (4 * dim * query heads per visible
(query, key) pair).  `--against` loads another build of `_paged_attention_cpu` (e.g. a copy of
the .so from before a change) and alternates the two in every round, so their ratio is
measured under the same machine load; the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as omlx sets it (kernels/backend.py)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from omlx.kernels.backend import attention_backend  # noqa: E402
from omlx.kernels.cpu_features import cpu_features  # noqa: E402

HQ, HKV, D, BS, LAYERS = 9, 3, 64, 32, 30


def load_build(path: str):
    """Another build of the kernel module, loaded beside the installed one."""
    name = "_paged_attention_cpu"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def pools(rng, keys: int, dtype):
    blocks = -(-keys // BS) + 1  # block 0 is the scratch block
    make = lambda: mx.array(rng.standard_normal((blocks * HKV * BS, D)).astype(np.float32)).astype(dtype)  # noqa: E731
    k, v = make(), make()
    mx.eval(k, v)
    return k, v, mx.array([list(range(1, blocks))], dtype=mx.int32)


def call(module, q, k, v, tables, seqs):
    groups = mx.zeros((0, 4), dtype=mx.int32)
    return module.paged_attention(q, [k], [v], tables, seqs, groups, kv_heads=HKV, block_size=BS, scale=D**-0.5)


def decode_seconds(module, rng, keys: int, dtype, repeats: int = 10) -> float:
    k, v, tables = pools(rng, keys, dtype)
    seqs = mx.array([[0, 1, keys - 1, -1]], dtype=mx.int32)
    queries = [mx.array(rng.standard_normal((1, HQ, 1, D)).astype(np.float32)) for _ in range(LAYERS)]
    mx.eval(*queries)
    mx.eval(*[call(module, q, k, v, tables, seqs) for q in queries])  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(*[call(module, q, k, v, tables, seqs) for q in queries])
    return (time.perf_counter() - start) / (repeats * LAYERS)


def prefill_seconds(module, rng, offset: int, chunk: int, dtype) -> float:
    k, v, tables = pools(rng, offset + chunk, dtype)
    seqs = mx.array([[0, chunk, offset, -1]], dtype=mx.int32)
    q = mx.array(rng.standard_normal((chunk, HQ, 1, D)).astype(np.float32))
    mx.eval(q)
    mx.eval(call(module, q, k, v, tables, seqs))  # warm
    start = time.perf_counter()
    mx.eval(call(module, q, k, v, tables, seqs))
    return time.perf_counter() - start


def causal_flops(offset: int, chunk: int) -> float:
    pairs = chunk * offset + chunk * (chunk + 1) / 2
    return 4.0 * D * HQ * pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="another build of _paged_attention_cpu (.so) to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", default="64,128,256,512,1024")
    args = parser.parse_args()
    chosen = attention_backend()
    if chosen.module is None:
        print(f"the fused kernel is not available: {chosen.reason}")
        return 1
    builds = {"this": chosen.module}
    if args.against:
        builds = {"old": load_build(args.against), **builds}
    features = cpu_features()
    print(f"cpu: {features.model}; bf16 ISA: {features.bf16_isa}; threads: {chosen.threads}; "
          f"load average: {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    names = list(builds)

    def report(label: str, samples: dict[str, list[float]], unit: str, scale: float, flops: float = 0.0):
        medians = {n: float(np.median(samples[n])) for n in names}
        parts = [f"{n} {medians[n] * scale:8.1f} {unit}"
                 + (f" ({flops / medians[n] / 1e9:5.1f} GFLOP/s)" if flops else "") for n in names]
        ratio = f"  this/old {medians['this'] / medians['old']:.2f}" if "old" in medians else ""
        print(f"{label:34s} " + "  ".join(parts) + ratio)

    for dtype in (mx.bfloat16, mx.float32):
        pool = "bf16" if dtype == mx.bfloat16 else "f32"
        for keys in (int(x) for x in args.keys.split(",")):
            samples = {n: [] for n in names}
            for _ in range(args.rounds):
                for n in names:
                    samples[n].append(decode_seconds(builds[n], rng, keys, dtype))
            report(f"decode 1 row x {keys} keys, {pool} pool", samples, "us/call", 1e6)
        for offset in (0, 512, 1024):
            samples = {n: [] for n in names}
            for _ in range(args.rounds):
                for n in names:
                    samples[n].append(prefill_seconds(builds[n], rng, offset, 512, dtype))
            report(f"prefill 512 at {offset}, {pool} pool", samples, "ms", 1e3, causal_flops(offset, 512))
    return 0


if __name__ == "__main__":
    sys.exit(main())
