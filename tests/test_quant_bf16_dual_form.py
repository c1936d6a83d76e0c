"""The dual weight form (omlx/models/dual_form.py, "bf16-packed+quantized-decode"): each
quantized layer holds its stored codes and its packed bf16 panels, and every call picks by its
row count inside the kernel.  The two copies compute the same bits, so the dual model's logits
equal the packed bf16 model's at every row count on both sides of the threshold, a row's
result is the same alone and in a batch that crosses it, and auto chooses the form exactly
where the rule says."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from omlx.kernels import quant_bf16 as qb
from omlx.kernels.linear import PackedLinear, dense_weight, pack_bf16
from omlx.models import dual_form, quantized_bf16, weight_form
from omlx.models.facts import parameter_bytes
from omlx.models.fused_projections import ProjectionSlice
from omlx.models.packed_weights import pack_model
from omlx.testing.tiny_models import TinyModelSpec, build_model
from model_helpers import engine_outputs
from test_quant_bf16 import assert_same_bits, quantized_linear

pytestmark = pytest.mark.skipif(not qb.availability().ok, reason=f"quant_bf16 does not run here: "
                                                                 f"{qb.availability().reason}")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("dual-form") / "m", TinyModelSpec(seed=13))


def quantized_model(path, bits: int = 4, group: int = 32) -> nn.Module:
    model, _ = load(str(path))
    nn.quantize(model, group_size=group, bits=bits)
    mx.eval(model.parameters())
    return model


def dual_model(path, rows: int = 4, **quant) -> nn.Module:
    model = quantized_model(path, **quant)
    assert dual_form.convert(model, rows) > 0
    return model


# ---------------------------------------------------------------------------- the layer
def test_packed_copy_is_the_packed_forms_weight_bit_for_bit():
    """From every bias form (offsets, from GGUF-like minimums, and the stored biases), both bit
    widths, each scale dtype, a partial last panel."""
    for bits in (4, 8):
        for scale_dtype in (mx.float16, mx.bfloat16, mx.float32):
            layer = quantized_linear(200, 256, bits, 64, seed=bits, scale_dtype=scale_dtype)
            layer.biases = (-mx.abs(layer.scales.astype(mx.float32)) * (7 if bits == 4 else 128)).astype(scale_dtype)
            want = pack_bf16(dense_weight(layer))
            for allow_offsets in (True, False):
                w = qb.repack(*qb.stored_quantization(layer), allow_offsets=allow_offsets)
                assert w.offsets == (allow_offsets and scale_dtype != mx.float32)
                ours = qb.QuantBf16Linear(w)
                ours.hold_packed(5)
                assert ours["packed_weight"].dtype == mx.bfloat16
                assert np.array_equal(np.array(ours["packed_weight"].view(mx.uint16)), np.array(want.view(mx.uint16)))


def test_the_kernel_reads_the_packed_copy_from_the_threshold_on():
    """A deliberately different packed copy shows which one each row count reads: the codes
    below `packed_from_rows`, the packed panels at and above it."""
    layer = quantized_linear(96, 128, 4, 32, seed=1, bias=True)
    w = qb.repack(*qb.stored_quantization(layer))
    other = pack_bf16(mx.ones((96, 128)) * 0.5)
    kernel = qb.kernel()
    for m in (1, 2, 3, 4, 5, 9):
        x = mx.array(np.random.default_rng(m).standard_normal((m, 128)).astype(np.float32))
        codes = kernel.linear(x, w.codes, w.scales, w.biases, layer.bias, out_features=96, bits=4, group_size=32)
        packed = PackedLinear(mx.ones((96, 128)) * 0.5, layer.bias)(x)
        dual = kernel.linear(x, w.codes, w.scales, w.biases, layer.bias, out_features=96, bits=4, group_size=32,
                             packed=other, packed_from_rows=4)
        assert_same_bits(dual, packed if m >= 4 else codes)
    with pytest.raises(ValueError):  # a packed copy of another shape
        kernel.linear(x, w.codes, w.scales, w.biases, out_features=96, bits=4, group_size=32,
                      packed=pack_bf16(mx.ones((96, 64))), packed_from_rows=4)
    with pytest.raises(ValueError):
        kernel.linear(x, w.codes, w.scales, w.biases, out_features=96, bits=4, group_size=32, packed=other,
                      packed_from_rows=0)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9, 33])
def test_dual_layer_equals_packed_bf16_on_both_sides_of_the_threshold(m):
    layer = quantized_linear(1100, 576, 4, 32, seed=m, bias=True)
    dual = qb.QuantBf16Linear.from_quantized(layer)
    dual.hold_packed(5)
    x = mx.array(np.random.default_rng(m).standard_normal((m, 576)).astype(np.float32))
    assert_same_bits(dual(x), PackedLinear.from_linear(layer)(x))


def test_a_rows_result_does_not_depend_on_the_kernel_its_batch_chose():
    layer = qb.QuantBf16Linear.from_quantized(quantized_linear(320, 576, 8, 64, seed=4, bias=True))
    layer.hold_packed(3)
    x = mx.array(np.random.default_rng(2).standard_normal((40, 576)).astype(np.float32))
    alone = [np.array(layer(x[i:i + 1])) for i in range(40)]  # 1 row: the codes
    for batch in (2, 3, 8, 40):  # 2: the codes; 3 and more: the packed panels
        together = np.array(layer(x[:batch]))
        for i in range(batch):
            assert np.array_equal(together[i:i + 1], alone[i]), (batch, i)


def test_fused_parts_join_their_packed_copies():
    parts = []
    for n in (128, 64, 100):
        part = qb.QuantBf16Linear.from_quantized(quantized_linear(n, 256, 4, 64, seed=n))
        part.hold_packed(4)
        parts.append(part)
    fused = qb.QuantBf16Linear.concatenate(parts)
    assert fused.packed_from_rows == 4
    for m in (2, 6):
        x = mx.array(np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32))
        assert_same_bits(fused(x), mx.concatenate([p(x) for p in parts], axis=-1))


# ---------------------------------------------------------------------------- the model
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_dual_models_logits_equal_the_packed_models(tiny_path, rows):
    """Prompts of 1, 3, 8 and 33 tokens in one call each (below, at and past the threshold of
    4 rows), and the same as a batch of two sequences."""
    dual = dual_model(tiny_path, rows=4)
    packed = quantized_model(tiny_path)
    assert pack_model(packed) > 0
    ids = mx.array(np.random.default_rng(rows).integers(3, 400, (2, rows)))
    assert_same_bits(dual(ids[:1]), packed(ids[:1]))
    assert_same_bits(dual(ids), packed(ids))


def test_loaded_forms_agree_to_the_bit(tiny_path, matmul_env, monkeypatch):
    """As the loader puts them (weight_form.apply: routed attention, fused MLP, shared RoPE),
    the dual model and the packed bf16 model give the same logits below and past the threshold."""
    if not matmul_env("auto").bf16:
        pytest.skip("no packed bf16 path here")
    dual = quantized_model(tiny_path)
    assert weight_form.apply(dual, None, 1 << 30) == weight_form.DUAL
    monkeypatch.setenv(dual_form.ENV, "0")
    packed = quantized_model(tiny_path)
    assert weight_form.apply(packed, None, 1 << 30) == weight_form.BF16_PACKED
    for rows in (1, 2, 3, 33):
        ids = mx.array(np.random.default_rng(rows).integers(3, 400, (1, rows)))
        assert_same_bits(dual(ids), packed(ids))


def test_dual_model_holds_both_copies_fused_and_tied(tiny_path):
    model = quantized_model(tiny_path)
    stored = parameter_bytes(quantized_model(tiny_path))
    quant_only = quantized_model(tiny_path)
    assert quantized_bf16.swap_model(quant_only) > 0
    held = dual_form.convert(model, 4)
    assert held > 0 and dual_form.is_dual(model) and not dual_form.is_dual(quant_only)
    layers = [m for _, m in model.named_modules() if isinstance(m, qb.HoldsPacked)]
    assert len(layers) == held and all(m.packed_from_rows == 5 for m in layers)
    # q/k/v and gate/up run fused, the tied embedding / head is one layer holding both copies.
    assert any(isinstance(m, ProjectionSlice) for _, m in model.named_modules())
    assert isinstance(model.model.embed_tokens, qb.QuantBf16Embedding) and "packed_weight" in model.model.embed_tokens
    # The ledger counts both copies: the quantized-bf16 form's bytes plus every packed panel.
    packed_bytes = sum(m["packed_weight"].nbytes for m in layers)
    assert parameter_bytes(model) == parameter_bytes(quant_only) + packed_bytes
    assert parameter_bytes(quant_only) <= 1.1 * stored


def test_engine_gives_each_request_the_same_tokens_alone_and_batched(tiny_path):
    """Decode steps of one request read the codes; batched steps (and chunked prefill) the
    packed panels: the tokens do not change."""
    model = dual_model(tiny_path, rows=2, bits=8, group=64)
    rng = np.random.default_rng(17)
    prompts = [[int(t) for t in rng.integers(5, 400, n)] for n in (3, 17, 9, 30, 1, 6)]
    together = engine_outputs(model, prompts, 10)
    for i, prompt in enumerate(prompts):
        assert engine_outputs(model, [prompt], 10)[0] == together[i], f"request {i} changed in a batch"


# ---------------------------------------------------------------------------- the rule
def test_auto_holds_both_for_a_quantized_model_small_enough_to_dequantize(tiny_path, matmul_env):
    path = matmul_env("auto")
    model = quantized_model(tiny_path)
    form = weight_form.apply(model, None, 1 << 30)
    if path.bf16:
        assert form == weight_form.DUAL and dual_form.is_dual(model)
        assert f"{dual_form.DECODE_ROWS} rows" in weight_form.describe(form)
        assert not weight_form.runs_exactly(model)


def test_the_form_is_not_chosen_outside_the_rule(tiny_path, matmul_env, monkeypatch):
    path = matmul_env("auto")
    if not path.bf16:
        pytest.skip("no packed bf16 path here")
    # Too large to dequantize: the stored bytes alone (quantized-bf16).
    model = quantized_model(tiny_path)
    assert weight_form.apply(model, None, 1 << 20) == weight_form.QUANTIZED_BF16 and not dual_form.is_dual(model)
    # A setting decides: true is packed bf16 alone, false the stored weights.
    model = quantized_model(tiny_path)
    assert weight_form.apply(model, True, 1 << 30) == weight_form.BF16_PACKED and not dual_form.is_dual(model)
    model = quantized_model(tiny_path)
    assert weight_form.apply(model, False, 1 << 30) != weight_form.DUAL and not dual_form.is_dual(model)
    # A float model has no stored codes to read.
    model, _ = load(str(tiny_path))
    assert weight_form.apply(model, None, 1 << 30) == weight_form.BF16_PACKED
    # OMLX_DECODE_ROWS=0 turns it off; another count moves the threshold.
    monkeypatch.setenv(dual_form.ENV, "0")
    model = quantized_model(tiny_path)
    assert weight_form.apply(model, None, 1 << 30) == weight_form.BF16_PACKED and not dual_form.is_dual(model)
    monkeypatch.setenv(dual_form.ENV, "8")
    model = quantized_model(tiny_path)
    assert weight_form.apply(model, None, 1 << 30) == weight_form.DUAL
    assert {m.packed_from_rows for _, m in model.named_modules() if isinstance(m, qb.HoldsPacked)} == {9}
    # OMLX_MATMUL=float32 keeps the float32 path for every model.
    monkeypatch.delenv(dual_form.ENV)
    matmul_env("float32")
    model = quantized_model(tiny_path)
    assert weight_form.apply(model, None, 1 << 30) == weight_form.FLOAT32


async def test_pool_loads_the_dual_form_and_counts_both_copies(tmp_path, matmul_env):
    """Through the real loading path with no setting: the paged engine serves the dual model
    (the load-time self-check accepts it), and the ledger's weight bytes are both copies."""
    import json

    from mlx_lm.utils import save_model

    from omlx.models.pool import ModelPool
    from omlx.scheduler import EngineConfig, LLMEngine
    from omlx.scheduler.fallback_engine import FallbackEngine
    from omlx.settings import SettingsStore

    if not matmul_env("auto").bf16:
        pytest.skip("no packed bf16 path here")
    source = build_model(tmp_path / "float", TinyModelSpec(seed=8))
    folder = tmp_path / "models" / "q4"
    folder.mkdir(parents=True)
    save_model(folder, quantized_model(source))
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    for extra in source.iterdir():
        if extra.name.startswith("tokenizer") or extra.name.endswith(".jinja") or extra.name == "special_tokens_map.json":
            (folder / extra.name).write_bytes(extra.read_bytes())
    home = tmp_path / "home"
    home.mkdir()
    pool = ModelPool([tmp_path / "models"], EngineConfig(block_size=16, num_blocks=32, max_num_batched_tokens=64),
                     memory_budget=1 << 30, settings=SettingsStore(home))
    try:
        async with pool.lease("q4"):
            pass
        resident = pool.resident("q4")
        engine = resident.model.engine.engine
        assert isinstance(engine, LLMEngine) and not isinstance(engine, FallbackEngine), type(engine)
        assert dual_form.is_dual(engine.model)
        packed_bytes = sum(m["packed_weight"].nbytes for _, m in engine.model.named_modules()
                           if isinstance(m, qb.HoldsPacked))
        assert packed_bytes > 0 and resident.model.weights_bytes == parameter_bytes(engine.model)
        assert resident.model.weights_bytes > packed_bytes
    finally:
        await pool.close()
