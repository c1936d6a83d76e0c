"""Timing two MLX computations against each other on a shared machine."""

from __future__ import annotations

import time

import mlx.core as mx


def best_of(a, b, repeats: int) -> tuple[float, float]:
    """Best time of each of two calls (each evaluated), alternated so both see the same
    machine state; one warm-up call of each first."""
    mx.eval(a(), b())
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            mx.eval(fn())
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])
