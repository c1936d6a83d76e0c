"""The quantized-weight linear kernel (omlx/kernels/cpu/quant_linear.cpp): it equals a
reference computed from the same quantized operands (MLX's 4/8-bit codes, x quantized to int8
per group, emulated in numpy) for every shape class; a row's output does not depend on the
other rows; it works in lazy graphs and under mx.compile; the layers swap into mlx-lm models;
and on the real SmolLM2 it agrees with the float32 model on >= 99% of next tokens."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from omlx.kernels import quant_linear as ql

EPS32 = np.finfo(np.float32).eps


@pytest.fixture(scope="module")
def kernel():
    avail = ql.availability()
    assert avail.module is not None, avail.reason  # setup builds it (python -m omlx.kernels.build)
    return avail.module


def _has_avx2() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def quantized(n: int, k: int, bits: int, group: int, seed: int = 0, half_scales: bool = True):
    rng = np.random.default_rng(seed)
    w, s, b = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.1), group, bits)
    if half_scales:  # as GGUF's Q4_0 / Q4_1 / Q8_0 arrive
        s, b = s.astype(mx.float16), b.astype(mx.float16)
    return w, s, b


def emulated(x: np.ndarray, w, s, b, bits: int, group: int, bias=None, precision: int = ql.PRECISION):
    """dequant(W) @ dequant(quant(x)) in float64, with the kernel's activation quantization
    reproduced bit for bit (float32 scale, round half to even); also a bound on float32
    accumulation error: a few ulps of the sum of the terms' magnitudes."""
    x = np.asarray(x, np.float32)
    levels = ql.PRECISION_LEVELS[precision]
    m, k = x.shape
    g = k // group
    codes = ql.unpack_codes(w, bits).astype(np.float64).reshape(-1, g, group)
    scales = np.array(s.astype(mx.float32), np.float64)
    biases = np.array(b.astype(mx.float32), np.float64)
    xg = x.reshape(m, g, group)
    amax = np.abs(xg).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(levels) / amax, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[..., None]), -levels, levels).astype(np.float64)
    xs = (amax / np.float32(levels)).astype(np.float32)
    xsum = (xq.sum(-1).astype(np.float32) * xs).astype(np.float64)
    dot = np.einsum("mgk,ngk->mng", xq, codes)
    terms_scale = dot * scales[None] * xs[:, None, :].astype(np.float64)
    terms_bias = biases[None] * xsum[:, None, :]
    y = (terms_scale + terms_bias).sum(-1)
    magnitude = (np.abs(terms_scale) + np.abs(terms_bias)).sum(-1)
    if bias is not None:
        y = y + np.array(bias, np.float64)
        magnitude = magnitude + np.abs(np.array(bias, np.float64))
    return y, 4 * (g + 2) * EPS32 * magnitude


# rows: 1 (decode), ragged, > the kernel's 64-row chunk and > 512; N off the 16-row tile.
SHAPES = [(1, 576, 576), (3, 37, 256), (17, 100, 384), (65, 16, 128), (600, 50, 256)]


# Every bits x group x shape that MLX can quantize (K a multiple of the group).
CASES = [(bits, group, shape) for bits in (4, 8) for group in (32, 64, 128) for shape in SHAPES
         if shape[2] % group == 0]


@pytest.mark.parametrize("bits, group, shape", CASES,
                         ids=[f"q{b}-g{g}-{'x'.join(map(str, s))}" for b, g, s in CASES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("precision", [1, 2], ids=["x-int8", "x-split"])
def test_equals_the_reference_from_the_same_quantized_operands(kernel, bits, group, shape, with_bias, precision):
    m, n, k = shape
    w, s, b = quantized(n, k, bits, group, half_scales=group == 32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :group] = 0  # an all-zero group: scale 0, codes 0
    bias = mx.array(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    packed = ql.repack(w, s, b, bits, group)
    assert packed.scales.dtype == (mx.float16 if group == 32 else mx.float32)
    y = np.array(ql.quant_matmul(mx.array(x), packed, bias, precision=precision))
    ref, tol = emulated(x, w, s, b, bits, group, bias, precision)
    assert y.shape == (m, n)
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) - tol))
    # The scalar path (CPUs without AVX512-VNNI) does the same operations: the same bits.
    # The AVX2 and scalar paths (CPUs without AVX512-VNNI) do the same integer dots and float
    # operations: the same bits.
    for isa in ("avx2", "portable"):
        if isa == "avx2" and not _has_avx2():
            continue
        other = np.array(ql.quant_matmul(mx.array(x), packed, bias, precision=precision, isa=isa))
        assert np.array_equal(other, y), isa


def bf16_reference(x: np.ndarray, w, s, b, group: int):
    """dequant(W) @ bf16(x) in float64, and the bound on the kernel's float32 error: it sums
    (128 + q) * x (see quant_linear.cpp), so its rounding scales with that magnitude."""
    bits32 = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
    m, k = rounded.shape
    g = k // group
    codes = ql.unpack_codes(w, 4).astype(np.float64).reshape(-1, g, group)
    scales = np.array(s.astype(mx.float32), np.float64)
    biases = np.array(b.astype(mx.float32), np.float64)
    xg = rounded.astype(np.float64).reshape(m, g, group)
    dot = np.einsum("mgk,ngk->mng", xg, codes)
    xsum = xg.sum(-1)[:, None, :]
    y = (dot * scales[None] + biases[None] * xsum).sum(-1)
    magnitude = (np.einsum("mgk,ngk->mng", np.abs(xg), codes + 128) * np.abs(scales[None])
                 + np.abs(biases[None] * xsum)).sum(-1)
    return y, 8 * (group + g) * EPS32 * magnitude


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("group", [32, 128])
def test_bf16_variant_equals_the_reference_from_bf16_operands(kernel, shape, group):
    if not kernel.has_bf16():
        pytest.skip("this CPU has no AVX512-BF16 (the variant is not built for it)")
    m, n, k = shape
    if k % group:
        k = group * (k // group + 1)
    w, s, b = quantized(n, k, 4, group)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    y = np.array(ql.quant_matmul(mx.array(x), ql.repack(w, s, b, 4, group), precision=ql.BF16))
    ref, tol = bf16_reference(x, w, s, b, group)
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) - tol))


@pytest.mark.parametrize("precision, bound", [(1, 2e-2), (2, 2e-4), (3, 1e-2)], ids=["x-int8", "x-split", "x-bf16"])
def test_close_to_mlx_quantized_matmul(kernel, precision, bound):
    if precision == ql.BF16 and not kernel.has_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    """Against MLX's own float32 quantized matmul the only difference is x's rounding
    (int8: steps of max|x| / 127 per group; split: 128x finer)."""
    w, s, b = quantized(300, 576, 4, 32)
    x = mx.random.normal((9, 576), key=mx.random.key(3))
    ours = ql.quant_matmul(x, ql.repack(w, s, b, 4, 32), precision=precision)
    theirs = mx.quantized_matmul(x, w, s.astype(mx.float32), b.astype(mx.float32), transpose=True, group_size=32,
                                 bits=4)
    rel = mx.abs(ours - theirs).max() / mx.abs(theirs).max()
    assert rel.item() < bound


@pytest.mark.parametrize("precision", [1, 2, 3], ids=["x-int8", "x-split", "x-bf16"])
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_a_rows_output_does_not_depend_on_the_batch(kernel, threaded, precision):
    if precision == ql.BF16 and not kernel.has_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    w, s, b = quantized(200, 512, 4, 64)
    packed = ql.repack(w, s, b, 4, 64)
    bias = mx.random.normal((200,), key=mx.random.key(7))
    rows = mx.random.normal((300, 512), key=mx.random.key(5)) * mx.linspace(0.1, 10, 300)[:, None]
    previous = kernel.min_thread_work()
    kernel.set_min_thread_work(0 if threaded else 1 << 62)
    try:
        whole = np.array(ql.quant_matmul(rows, packed, bias, precision=precision))
        for row in (0, 1, 63, 64, 150, 299):
            alone = np.array(ql.quant_matmul(rows[row:row + 1], packed, bias, precision=precision))
            assert np.array_equal(alone[0], whole[row])
        for size in (2, 3, 5, 17, 64, 65, 129):
            start = 300 - size - 7
            batch = np.array(ql.quant_matmul(rows[start:start + size], packed, bias, precision=precision))
            assert np.array_equal(batch, whole[start:start + size]), size
    finally:
        kernel.set_min_thread_work(previous)


def test_threads_and_one_thread_give_the_same_bits(kernel):
    w, s, b = quantized(1000, 576, 8, 32)
    packed = ql.repack(w, s, b, 8, 32)
    x = mx.random.normal((40, 576), key=mx.random.key(2))
    previous = kernel.min_thread_work()
    try:
        kernel.set_min_thread_work(0)
        threaded = np.array(ql.quant_matmul(x, packed))
        kernel.set_min_thread_work(1 << 62)
        single = np.array(ql.quant_matmul(x, packed))
    finally:
        kernel.set_min_thread_work(previous)
    assert np.array_equal(threaded, single)


def test_lazy_graphs_compile_strided_and_batched_inputs(kernel):
    w, s, b = quantized(72, 256, 4, 32)
    packed = ql.repack(w, s, b, 4, 32)
    a = mx.random.normal((2, 5, 256), key=mx.random.key(0))
    eager_x = a * 0.5 + 1
    mx.eval(eager_x)
    expected = np.array(ql.quant_matmul(eager_x.reshape(10, 256), packed)).reshape(2, 5, 72)

    # Produced and consumed by other ops in one graph, evaluated once (the task must run after x).
    out = ql.quant_matmul(a * 0.5 + 1, packed) * 2 - 1
    assert np.array_equal(np.array(out), expected * np.float32(2) - np.float32(1))

    @mx.compile
    def layer(t):
        return ql.quant_matmul(t * 0.5 + 1, packed)

    assert np.array_equal(np.array(layer(a)), expected)
    assert np.array_equal(np.array(layer(a)), expected)  # the cached trace

    # A strided view (transposed) is read as it is.
    xt = mx.array(np.ascontiguousarray(np.array(eager_x).reshape(10, 256).T)).T
    assert np.array_equal(np.array(ql.quant_matmul(xt, packed)), expected.reshape(10, 72))

    # float16 in, float16 out (computed in float32).
    half = ql.quant_matmul(eager_x.astype(mx.float16), packed)
    assert half.dtype == mx.float16 and half.shape == (2, 5, 72)


def test_bad_operands_are_rejected(kernel):
    w, s, b = quantized(32, 128, 4, 32)
    packed = ql.repack(w, s, b, 4, 32)
    with pytest.raises(ValueError):
        ql.quant_matmul(mx.zeros((2, 96)), packed)
    with pytest.raises(ValueError):
        ql.repack(w, s, b, 3, 32)
    with pytest.raises(ValueError):
        ql.repack(w, s, None, 4, 32)
    with pytest.raises(ValueError):  # the bf16 variant: 4-bit weights only
        w8, s8, b8 = quantized(32, 128, 8, 32)
        ql.quant_matmul(mx.zeros((2, 128)), ql.repack(w8, s8, b8, 8, 32), precision=ql.BF16)
    with pytest.raises(ValueError):
        kernel.quant_linear(mx.zeros((2, 128)), packed.packed, packed.scales, packed.biases, n=32, bits=8,
                            group_size=32)
    with pytest.raises(ValueError):
        kernel.quant_linear(mx.zeros((2, 128)), packed.packed, packed.scales, packed.biases, mx.zeros((7,)), n=32,
                            bits=4, group_size=32)
    # Zero rows give an empty result, not a crash.
    assert ql.quant_matmul(mx.zeros((0, 128)), packed).shape == (0, 32)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 128)
        self.up = nn.Linear(128, 256, bias=True)
        self.down = nn.Linear(256, 128, bias=False)
        self.odd = nn.Linear(128, 40, bias=False)  # not quantized below (only some layers are)

    def __call__(self, ids):
        h = self.embed(ids)
        h = self.down(nn.gelu(self.up(h)))
        return self.embed.as_linear(h)


def test_swap_replaces_quantized_layers_in_place(kernel):
    mx.random.seed(0)
    model = _Block()
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: p != "odd" and hasattr(m, "to_quantized"))
    ids = mx.array([[1, 5, 9, 42]])
    before = model(ids)
    assert ql.swap_quantized_linears(model) == 3
    assert isinstance(model.up, ql.QuantLinear) and isinstance(model.down, ql.QuantLinear)
    assert isinstance(model.embed, ql.QuantEmbedding) and isinstance(model.odd, nn.Linear)
    after = model(ids)
    rel = (mx.abs(after - before).max() / mx.abs(before).max()).item()
    assert rel < 1e-3
    assert ql.swap_quantized_linears(model) == 0  # nothing left to swap


# ---------------------------------------------------------------------------- real model
# The float32 reference is ~0.8 TFLOP over these tokens: it runs in a child process with the
# optimized BLAS preloaded (as `omlx serve` arranges for itself; in-process MLX uses its
# bundled reference BLAS, ~30x slower), once per session for every form compared with it
# (omlx/testing/real_text.py caches it beside the session's converted folder).
AGREEMENT_TOKENS = 3072


def smollm2_agreement(folder: str) -> dict:
    """Teacher-forced top-1 of SmolLM2 with its quantized layers swapped in vs its float32
    dequantization, and its greedy answer to the France question."""
    from mlx_lm import generate, load

    from omlx.testing.real_text import agreement_with_float32

    model, tokenizer = load(folder)
    # Norms and the embedding's scales in float32 as on the float32 path; the quantized
    # codes, scales and biases are read as stored.
    swapped = ql.swap_quantized_linears(model, widen_rest=True)
    half = [name for name, v in tree_flatten(model.parameters()) if v.dtype in (mx.float16, mx.bfloat16)]
    assert all(name.endswith(("packed_scales", "packed_biases")) for name in half), half
    agree = agreement_with_float32(model, tokenizer, folder, AGREEMENT_TOKENS)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    return {"swapped": swapped, "tokens": AGREEMENT_TOKENS, "agree": agree,
            "answer": generate(model, tokenizer, prompt, max_tokens=16)}


@pytest.mark.slow
def test_real_smollm2_agrees_with_float32_and_answers(kernel, smollm2_folder):
    import json
    import subprocess
    import sys

    from omlx.blas import find_optimized_blas

    env = dict(os.environ)
    blas = find_optimized_blas()
    if blas:
        env["LD_PRELOAD"] = " ".join(filter(None, [blas, env.get("LD_PRELOAD")]))
    child = subprocess.run([sys.executable, __file__, str(smollm2_folder)], env=env, capture_output=True, text=True,
                           timeout=1800, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["swapped"] == 30 * 7 + 1  # every projection and the tied 8-bit embedding / LM head
    assert result["tokens"] == AGREEMENT_TOKENS
    assert result["agree"] / result["tokens"] >= 0.99, result
    assert "Paris" in result["answer"], result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(smollm2_agreement(sys.argv[1])))
