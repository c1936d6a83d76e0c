"""omlx/kernels/affine_quant.py: what both quantized-weight kernels accept and how they unpack it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from omlx.kernels.affine_quant import affine_layout_supported, padded_codes, stored_quantization, unpack_codes


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_are_unpacked_and_padded_with_zero_rows(bits):
    w = mx.random.normal((70, 64), key=mx.random.key(1))
    wq, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    codes, n, k = padded_codes(wq, biases, bits, 32, 16, "test")
    assert (n, k) == (70, 64) and codes.shape == (80, 64) and codes.dtype == np.uint8
    assert not codes[70:].any()
    # The codes are what mx.dequantize reads: scale * q + bias per group.
    q = codes[:70].reshape(70, 2, 32).astype(np.float32)
    want = np.array(mx.dequantize(wq, scales, biases, group_size=32, bits=bits)).reshape(70, 2, 32)
    got = q * np.array(scales)[..., None] + np.array(biases)[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(unpack_codes(wq, bits), codes[:70])


def test_weights_the_kernels_do_not_take_are_refused_with_the_reason():
    wq, _, biases = mx.quantize(mx.ones((16, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="mine supports bits"):
        padded_codes(wq, biases, 3, 32, 16, "mine")
    with pytest.raises(ValueError, match="mine supports bits"):
        padded_codes(wq, biases, 4, 16, 16, "mine")
    with pytest.raises(ValueError, match="mine needs affine biases"):
        padded_codes(wq, None, 4, 32, 16, "mine")
    with pytest.raises(ValueError, match="K=64 is not a multiple of group_size=128"):
        padded_codes(wq, biases, 4, 128, 16, "mine")


def test_a_quantized_layer_gives_its_repack_arguments_and_its_layout_is_judged():
    layer = nn.QuantizedLinear(64, 16, group_size=32, bits=8)
    weight, scales, biases, bits, group = stored_quantization(layer)
    assert weight is layer.weight and scales is layer.scales and biases is layer.biases and (bits, group) == (8, 32)
    assert affine_layout_supported(layer)
    assert not affine_layout_supported(nn.QuantizedLinear(64, 16, group_size=64, bits=3))
