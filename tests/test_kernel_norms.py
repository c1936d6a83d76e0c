"""The one-node RMSNorm of the packed path (omlx/models/kernel_norms.py, kernels/cpu/
fused_ops.cpp): MLX's result to float32 rounding, each row independent of the batch, strided
inputs read as they are, bad operands refused; and the RoPE rotation kernel on strided views."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from omlx.kernels import fused_ops
from omlx.models.kernel_norms import KernelRMSNorm, swap_rms_norms
from omlx.models.shared_rope import SharedRoPE
from omlx.testing.tiny_models import TinyModelSpec, build_model
from model_helpers import pack_model_without

pytestmark = pytest.mark.skipif(fused_ops.kernel() is None, reason="the fused-ops kernel is not built here")
RNG = np.random.default_rng(0)


def rows(shape) -> mx.array:
    return mx.array((RNG.standard_normal(shape) * RNG.uniform(0.01, 50.0, size=shape[:-1] + (1,))).astype(np.float32))


@pytest.mark.parametrize("shape", [(1, 576), (32, 1, 576), (3, 7, 18), (5, 1), (2, 4, 1, 64), (1, 1, 4099)])
def test_equals_mlx_to_float32_rounding(shape):
    x, w = rows(shape), mx.array(RNG.standard_normal(shape[-1]).astype(np.float32))
    got = np.array(fused_ops.kernel().rms_norm(x, w, 1e-5))
    expected = np.array(mx.fast.rms_norm(x, w, 1e-5))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7 * float(np.abs(expected).max()))


def test_each_row_is_bit_identical_alone_and_in_any_batch():
    x, w = rows((37, 1, 576)), mx.array(RNG.standard_normal(576).astype(np.float32))
    batch = np.array(fused_ops.kernel().rms_norm(x, w, 1e-6))
    for r in (0, 5, 36):
        alone = np.array(fused_ops.kernel().rms_norm(x[r : r + 1], w, 1e-6))
        assert np.array_equal(alone, batch[r : r + 1])
    big = mx.concatenate([x] * 8)  # past the threading threshold: rows split across threads
    assert np.array_equal(np.array(fused_ops.kernel().rms_norm(big, w, 1e-6))[:37], batch)


def test_strided_views_are_read_as_they_are():
    x, w = rows((4, 6, 32)), mx.array(RNG.standard_normal(6).astype(np.float32))
    view = x.transpose(0, 2, 1)  # (4, 32, 6), last axis strided
    got = fused_ops.kernel().rms_norm(view, w, 1e-5)
    assert np.array_equal(np.array(got), np.array(fused_ops.kernel().rms_norm(mx.contiguous(view), w, 1e-5)))
    q = rows((3, 1, 4, 16)).transpose(0, 2, 1, 3)  # how q / k reach RoPE
    reference, shared = nn.RoPE(16), SharedRoPE(16)
    offsets = mx.array([4, 90, 7], dtype=mx.int32)
    assert np.array_equal(np.array(shared(q, offset=offsets)), np.array(reference(q, offset=offsets)))


def test_bad_operands_are_refused():
    k = fused_ops.kernel()
    with pytest.raises(ValueError):
        k.rms_norm(mx.ones((2, 8), mx.bfloat16), mx.ones((8,)), 1e-5)
    with pytest.raises(ValueError):
        k.rms_norm(mx.ones((2, 8)), mx.ones((7,)), 1e-5)
    with pytest.raises(ValueError):
        k.rope_rotate(mx.ones((1, 2, 1, 8)), mx.ones((1, 1, 6)), 8, False)
    with pytest.raises(ValueError):
        k.rope_rotate(mx.ones((1, 2, 1, 8)), mx.ones((1, 1, 8)), 10, False)


def test_other_dtypes_keep_mlx_ops():
    norm = KernelRMSNorm(mx.ones((8,)), 1e-5)
    x = mx.ones((2, 8), mx.bfloat16)
    assert mx.array_equal(norm(x), mx.fast.rms_norm(x, mx.ones((8,)), 1e-5)).item()


def test_a_packed_model_runs_one_node_norms(tmp_path):
    """qwen3: the layer norms and q_norm / k_norm (applied to (B, L, H, D) views) are all
    swapped; the logits stay those of MLX's norms to float32 rounding."""
    path = build_model(tmp_path / "m", TinyModelSpec(model_type="qwen3", seed=6))
    model, _ = load(str(path))
    pack_model_without(model, "swap_rms_norms")
    tokens = mx.array([[5, 9, 200, 31, 7, 8, 400]])
    before = np.array(model(tokens))
    norms = sum(type(m) is nn.RMSNorm for _, m in model.named_modules())
    assert swap_rms_norms(model) == norms == 4 * len(model.model.layers) + 1
    assert not any(type(m) is nn.RMSNorm for _, m in model.named_modules())
    after = np.array(model(tokens))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))
