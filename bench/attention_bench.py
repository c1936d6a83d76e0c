#!/usr/bin/env python
"""Attention microbench: the fused CPU kernel against MLX's own attention and omlx's portable
paged path, on the shapes agents live at (float32, head dim 64, 12 query / 4 KV heads).

    python bench/attention_bench.py [--repeats 7]

For each shape it prints the best-of-N time, GFLOP/s and the fraction of this CPU's float32
matmul peak (measured in the same run), and the kernel's speedup over `mx.fast.scaled_dot_
product_attention` on contiguous K/V (what mlx-lm runs).  FLOPs are counted as the two
matmuls over the full query x key rectangle (4 * q * k * heads * dim), as in issue 10.
"""

from __future__ import annotations

import argparse
import sys
import time

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)  # before MLX loads: OpenBLAS in place of the reference BLAS

import mlx.core as mx  # noqa: E402
import numpy as np

from omlx.blas import blas_info, measure_matmul_gflops  # noqa: E402
from omlx.kernels.backend import attention_backend  # noqa: E402
from omlx.kernels.paged_attention import QuantizedRows, RaggedPlan, ragged_attention  # noqa: E402

HQ, HKV, D, BS = 12, 4, 64, 32


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class Shape:
    """Sequences (cached tokens, new tokens), optionally all behind one shared cached prefix."""

    def __init__(self, name: str, seqs: list[tuple[int, int]], shared_prefix: int = 0):
        self.name, self.seqs, self.shared_prefix = name, seqs, shared_prefix

    @property
    def flops(self) -> int:
        return sum(4 * new * (self.shared_prefix + cached + new) * HQ * D for cached, new in self.seqs)

    def build(self, rng, kv_bits: int | None):
        shared_blocks = self.shared_prefix // BS
        prefix = list(range(1, 1 + shared_blocks))
        next_block = 1 + shared_blocks
        tables, q_lens, pos0 = [], [], []
        for cached, new in self.seqs:
            start = self.shared_prefix + cached
            own = -(-(start + new) // BS) - shared_blocks
            tables.append(prefix + list(range(next_block, next_block + own)))
            next_block += own
            q_lens.append(new)
            pos0.append(start)
        rows = next_block * HKV * BS
        pools = []
        for _ in range(2):
            data = mx.array(rng.standard_normal((rows, D)).astype(np.float32))
            if kv_bits:
                data = QuantizedRows(*mx.quantize(data, group_size=64, bits=kv_bits), group_size=64, bits=kv_bits)
            pools.append(data)
        queries = mx.array(rng.standard_normal((sum(q_lens), HQ, 1, D)).astype(np.float32))
        return tables, q_lens, pos0, pools, queries


def mlx_dense(shape: Shape, rng, repeats: int) -> float:
    """mlx-lm's situation: each sequence's K/V contiguous, `mx.fast` attention per sequence
    batch (sequences of equal shape batched together, as mlx-lm's BatchGenerator pads)."""
    longest_new = max(n for _, n in shape.seqs)
    longest_ctx = max(shape.shared_prefix + c + n for c, n in shape.seqs)
    batch = len(shape.seqs)
    q = mx.array(rng.standard_normal((batch, HQ, longest_new, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((batch, HKV, longest_ctx, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((batch, HKV, longest_ctx, D)).astype(np.float32))
    mask = None
    if longest_new > 1:
        qpos = longest_ctx - longest_new + np.arange(longest_new)
        mask = mx.array(np.arange(longest_ctx)[None, :] <= qpos[:, None])
    return best(lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)), repeats)


def paged(shape: Shape, rng, repeats: int, fused: bool, kv_bits: int | None = None) -> float:
    tables, q_lens, pos0, (pool_k, pool_v), queries = shape.build(rng, kv_bits)
    kernel = attention_backend().module if fused else None
    _, plan = RaggedPlan.for_sequences(tables, q_lens, pos0, HKV, BS, kernel)
    return best(lambda: mx.eval(ragged_attention(queries, pool_k, pool_v, plan, D**-0.5)), repeats)


SHAPES = [
    Shape("prefill: 512 queries over 1,536 keys (chunk at 1,024)", [(1024, 512)]),
    Shape("decode: 32 rows x 1 query over 1,024 keys", [(1023, 1)] * 32),
    Shape("decode: 32 rows over a shared 1,536-token prefix + 64 own", [(63, 1)] * 32, shared_prefix=1536),
    Shape("8 agents: shared 1,792-token prefix, 60-token suffixes", [(0, 60)] * 8, shared_prefix=1792),
    Shape("long context: 1 decode row over 8,192 keys", [(8191, 1)]),
    Shape("prefill: 512 queries at 4,096", [(4096, 512)]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    chosen = attention_backend()
    if not chosen.fused:
        raise SystemExit(f"the fused kernel is not available: {chosen.reason}")
    peak = measure_matmul_gflops()
    info = blas_info()
    print(f"# Attention microbench ({info['backend']}, BLAS {info['blas']}, kernel threads {chosen.threads})\n")
    print(f"float32 matmul peak measured here: {peak:.0f} GFLOP/s\n")
    print("| shape | MLX sdpa (contiguous) | portable paged | fused kernel | fused GFLOP/s (% of peak) | vs MLX | vs portable | fused 8-bit KV | fused 4-bit KV |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        dense = mlx_dense(shape, rng, args.repeats)
        portable = paged(shape, rng, args.repeats, fused=False)
        fused = paged(shape, rng, args.repeats, fused=True)
        q8 = paged(shape, rng, args.repeats, fused=True, kv_bits=8)
        q4 = paged(shape, rng, args.repeats, fused=True, kv_bits=4)
        rate = shape.flops / fused / 1e9
        print(
            f"| {shape.name} | {dense * 1e3:.1f} ms | {portable * 1e3:.1f} ms | {fused * 1e3:.2f} ms | "
            f"{rate:.1f} ({rate / peak:.0%}) | {dense / fused:.1f}x | {portable / fused:.1f}x | "
            f"{q8 * 1e3:.2f} ms | {q4 * 1e3:.2f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main()
