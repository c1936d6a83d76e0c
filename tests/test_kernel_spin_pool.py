"""The weight kernels' own worker pool (omlx/kernels/cpu/spin_pool.h): with it on
(OMLX_KERNEL_SPIN_US > 0) the quantized-bf16 and packed bf16 kernels give the same bits as with
it off (OpenMP) for every split of panels; calls from several threads at once (two models'
MLX streams) all finish with their own bits; a call that finds the pool held by another runs on
its own thread; the workers do take part; and with more workers (OMP_NUM_THREADS) the same
holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from omlx.kernels import linear
from omlx.kernels import quant_bf16 as qb
from omlx.kernels.linear import PackedLinear
from test_quant_bf16 import assert_same_bits, packed_reference, quantized_linear

pytestmark = pytest.mark.skipif(not qb.availability().ok, reason=f"quant_bf16 does not run here: "
                                                                 f"{qb.availability().reason}")

MODULES = (qb.kernel, linear.kernel)


@pytest.fixture
def spin():
    """Sets both modules' worker spin; puts back what was there."""
    before = [kernel().spin_us() for kernel in MODULES]

    def set_spin(us: int) -> None:
        for kernel in MODULES:
            kernel().set_spin_us(us)

    yield set_spin
    for kernel, us in zip(MODULES, before):
        kernel().set_spin_us(us)


def layers(n: int, k: int, bits: int = 4, seed: int = 0):
    source = quantized_linear(n, k, bits, 32, seed=seed, bias=True)
    return source, qb.QuantBf16Linear.from_quantized(source), PackedLinear.from_linear(source)


def rows(m: int, k: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32))


# 1 .. 8 panels' worth of columns and a partial last panel: every split of panels between the
# caller and the workers; rows: the register path (1, 2, 5, 8: on the pool), the scratch path
# (9, 32: OpenMP, also with the pool on).
@pytest.mark.parametrize("n", [64, 128, 192, 256, 320, 384, 448, 512, 200])
def test_the_pool_and_openmp_give_the_same_bits(spin, n):
    k = 1536  # large enough that every one of these calls passes the pool's bar
    source, quant, packed = layers(n, k, seed=n)
    jobs_before = qb.kernel().pool_stats()["jobs"]
    for m in (1, 2, 5, 8, 9, 32):
        x = rows(m, k, seed=m)
        spin(0)
        off = (np.array(quant(x)), np.array(packed(x)))
        spin(100)
        on = (quant(x), packed(x))
        assert_same_bits(on[0], mx.array(off[0]))
        assert_same_bits(on[1], mx.array(off[1]))
        assert_same_bits(on[0], packed_reference(x, source))
    if n > 64 and qb.kernel().pool_stats()["workers"] > 0:
        assert qb.kernel().pool_stats()["jobs"] > jobs_before  # the calls did go through the pool


def test_calls_from_several_threads_at_once_finish_with_their_own_bits(spin):
    """Three MLX streams (three stream threads, as three models have) call the kernels at once:
    one holds the pool, the others run alone; every result equals the same call made alone."""
    spin(100)
    shapes = [(960, 576), (576, 1536), (3072, 576)]
    made = [layers(n, k, seed=i) for i, (n, k) in enumerate(shapes)]
    inputs = [[rows(m, k, seed=10 * i + m) for m in (1, 2, 32)] for i, (_, k) in enumerate(shapes)]
    alone = [[(np.array(quant(x)), np.array(packed(x))) for x in xs] for (_, quant, packed), xs in zip(made, inputs)]
    failures: list[str] = []

    def caller(i: int) -> None:
        _, quant, packed = made[i]
        with mx.stream(mx.new_stream(mx.cpu)):
            for round_ in range(20):
                for j, x in enumerate(inputs[i]):
                    got = (quant(x), packed(x))
                    mx.eval(got)
                    for a, b in zip(got, alone[i][j]):
                        if not np.array_equal(np.array(a).view(np.uint32), b.view(np.uint32)):
                            failures.append(f"thread {i} round {round_} input {j}")

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call did not return (deadlock)"
    assert not failures, failures[:5]


@pytest.mark.parametrize("kernel", MODULES, ids=["quant_bf16", "packed_bf16"])
def test_a_call_that_finds_the_pool_held_runs_on_its_own_thread(spin, kernel):
    spin(100)
    source, quant, packed = layers(3072, 576, seed=7)
    layer = quant if kernel is qb.kernel else packed
    x = rows(2, 576, seed=7)
    expected = np.array(layer(x))
    module = kernel()
    assert module.hold_pool(True)
    try:
        before = module.pool_stats()
        held = layer(x)
        mx.eval(held)
        after = module.pool_stats()
    finally:
        module.hold_pool(False)
    assert_same_bits(held, mx.array(expected))
    if after['workers'] > 0:
        assert after['fallbacks'] == before['fallbacks'] + 1 and after['jobs'] == before['jobs']  # a fallback, not a shared job
    assert_same_bits(held, packed_reference(x, source))


def test_the_workers_take_part_in_big_calls(spin):
    spin(100)
    module = qb.kernel()
    if module.pool_stats()["workers"] == 0:
        pytest.skip("one OpenMP thread: the pool has no workers")
    _, quant, _ = layers(8192, 576, bits=8, seed=3)
    x = rows(8, 576, seed=3)  # the pool takes calls of up to 8 rows
    before = module.pool_stats()["worker_tasks"]
    # On a machine other processes load, a woken worker may find every task taken for a while:
    # up to 200 calls (~2 ms each) for it to take one.
    for _ in range(200):
        mx.eval(quant(x))
        if module.pool_stats()["worker_tasks"] > before:
            break
    assert module.pool_stats()["worker_tasks"] > before


CHILD = r"""
import numpy as np, mlx.core as mx, threading, sys
sys.path.insert(0, {tests!r})
from test_kernel_spin_pool import layers, rows
from omlx.kernels import quant_bf16 as qb, linear
workers = qb.kernel().pool_stats()["workers"]
assert workers == 5, workers
for n in (64, 320, 960, 3072):
    _, quant, packed = layers(n, 576, seed=n)
    for m in (1, 2, 9, 32):
        x = rows(m, 576, seed=m)
        for module in (qb.kernel(), linear.kernel()):
            module.set_spin_us(0)
        off = [np.array(quant(x)).view(np.uint32), np.array(packed(x)).view(np.uint32)]
        for module in (qb.kernel(), linear.kernel()):
            module.set_spin_us(100)
        on = [np.array(quant(x)).view(np.uint32), np.array(packed(x)).view(np.uint32)]
        assert all(np.array_equal(a, b) for a, b in zip(on, off)), (n, m)
# Layers and expected outputs made on this thread; the threads only evaluate, each on its own
# MLX stream (as two models' stream threads do).
made = [layers(1536, 576, seed=i)[1] for i in range(4)]
xs = [rows(4, 576, seed=i) for i in range(4)]
wants = [np.array(quant(x)) for quant, x in zip(made, xs)]
bad = []
def caller(i):
    with mx.stream(mx.new_stream(mx.cpu)):
        for _ in range(20):
            if not np.array_equal(np.array(made[i](xs[i])), wants[i]):
                bad.append(i)
threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(4)]
[t.start() for t in threads]
[t.join(timeout=120) for t in threads]
assert not any(t.is_alive() for t in threads), "a kernel call did not return"
assert not bad, bad
print("ok", qb.kernel().pool_stats())
"""


def test_more_workers_than_cores_give_the_same_bits_and_finish():
    """OMP_NUM_THREADS=6 and OMLX_POOL_WORKERS=8: five workers (on two cores: preempted
    mid-task, late to every job)."""
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, OMP_NUM_THREADS="6", OMLX_KERNEL_SPIN_US="100", OMLX_POOL_WORKERS="8")
    try:
        done = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests)], env=env, capture_output=True,
                              text=True, timeout=300, cwd=Path(tests).parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child did not finish in 300 s: {(exc.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout
