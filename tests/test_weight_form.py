"""The form a model's weights run in, chosen at load (omlx/models/weight_form.py): by the
`dequantize` setting and what this CPU has, one form per model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from omlx.kernels import quant_bf16, quant_linear
from omlx.kernels.linear import PackedLinear
from omlx.kernels.quant_bf16 import QuantBf16Linear
from omlx.kernels.quant_linear import QuantLinear
from omlx.models import weight_form
from omlx.scheduler import EngineConfig, LLMEngine
from omlx.scheduler.fallback_engine import FallbackEngine
from omlx.testing.tiny_models import TinyModelSpec, build_model
from model_helpers import engine_outputs


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("weight-form") / "m", TinyModelSpec(seed=5))


def quantized(path) -> nn.Module:
    model, _ = load(str(path))
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def layer_types(model) -> set[type]:
    return {type(m) for _, m in model.named_modules()}


def test_auto_runs_a_quantized_model_in_the_fastest_serving_form_here(tiny_path, matmul_env):
    path = matmul_env("auto")
    model = quantized(tiny_path)
    form = weight_form.apply(model, None, 1 << 30)
    if path.bf16 and quant_bf16.availability().ok:  # both bit-identical copies, picked per call by rows
        assert form == weight_form.DUAL and QuantBf16Linear in layer_types(model)
        assert all("packed_weight" in m for _, m in model.named_modules() if isinstance(m, QuantBf16Linear))
    elif path.bf16:
        assert form == weight_form.BF16_PACKED and PackedLinear in layer_types(model)
    elif quant_linear.availability().ok:
        assert form == weight_form.QUANTIZED_KERNEL and QuantLinear in layer_types(model)
    else:
        assert form == weight_form.FLOAT32 and nn.QuantizedLinear not in layer_types(model)


def test_auto_keeps_a_quantized_model_too_large_to_dequantize_in_its_stored_bytes(tiny_path, matmul_env):
    """A budget whose quarter cannot hold the float32 weights: not dequantized, so on a bf16 CPU
    the stored codes run through the quantized-bf16 kernel (ahead of the int8 kernel at many
    rows), elsewhere through the int8 kernel."""
    path = matmul_env("auto")
    model = quantized(tiny_path)
    form = weight_form.apply(model, None, 1 << 20)
    types = layer_types(model)
    if path.bf16 and quant_bf16.availability().ok:
        assert form == weight_form.QUANTIZED_BF16
        assert QuantBf16Linear in types and nn.QuantizedLinear not in types and PackedLinear not in types
        assert not weight_form.runs_exactly(model)
    elif quant_linear.availability().ok:
        assert form == weight_form.QUANTIZED_KERNEL and QuantLinear in types
    else:
        assert form == weight_form.STORED and nn.QuantizedLinear in types


def test_false_reads_the_stored_weights_through_the_kernel(tiny_path, matmul_env):
    matmul_env("auto")
    model = quantized(tiny_path)
    form = weight_form.apply(model, False, 1 << 30)
    if quant_linear.availability().ok:
        assert form == weight_form.QUANTIZED_KERNEL
        types = layer_types(model)
        assert QuantLinear in types and nn.QuantizedLinear not in types and PackedLinear not in types
        assert not weight_form.runs_exactly(model)
    else:
        assert form == weight_form.STORED and nn.QuantizedLinear in layer_types(model)


def test_true_dequantizes(tiny_path, matmul_env):
    path = matmul_env("auto")
    model = quantized(tiny_path)
    form = weight_form.apply(model, True, 1 << 30)
    assert form == (weight_form.BF16_PACKED if path.bf16 else weight_form.FLOAT32)
    assert nn.QuantizedLinear not in layer_types(model) and QuantLinear not in layer_types(model)


def test_float32_environment_keeps_the_old_path_for_every_model(tiny_path, matmul_env):
    matmul_env("float32")
    model = quantized(tiny_path)
    assert weight_form.apply(model, None, 1 << 30) == weight_form.FLOAT32
    assert weight_form.runs_exactly(model)
    kept = quantized(tiny_path)
    assert weight_form.apply(kept, False, 1 << 30) == weight_form.STORED
    assert nn.QuantizedLinear in layer_types(kept)


def test_a_float_model_is_never_given_the_quantized_kernel(tiny_path, matmul_env):
    path = matmul_env("auto")
    model, _ = load(str(tiny_path))
    form = weight_form.apply(model, False, 1 << 30)
    assert form == weight_form.STORED and QuantLinear not in layer_types(model)
    model, _ = load(str(tiny_path))
    assert weight_form.apply(model, None, 1 << 30) == (weight_form.BF16_PACKED if path.bf16 else weight_form.STORED)


@pytest.mark.skipif(not quant_linear.availability().ok, reason="the quantized-weight kernel does not run on this CPU")
def test_quantized_kernel_model_is_batch_invariant_in_the_engine(tiny_path, matmul_env):
    """Its rows are computed alone (no batch-size-dependent path), so a request's greedy
    tokens are the same alone and among others."""
    matmul_env("auto")
    model = quantized(tiny_path)
    assert weight_form.apply(model, False, 1 << 30) == weight_form.QUANTIZED_KERNEL
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(5, 400, n)] for n in (3, 17, 9, 30, 1)]
    together = engine_outputs(model, prompts, 12)
    for i, prompt in enumerate(prompts):
        assert engine_outputs(model, [prompt], 12)[0] == together[i], f"request {i} changed in a batch"


@pytest.mark.skipif(not quant_linear.availability().ok, reason="the quantized-weight kernel does not run on this CPU")
async def test_pool_serves_a_quantized_kernel_model_on_the_paged_engine(tmp_path, matmul_env):
    """Through the real loading path with `dequantize: false`: the layers read the stored
    4-bit codes, the load-time self-check accepts the kernel's rounding (the paged engine
    serves it, not the fallback), and the ledger counts the quantized bytes."""
    import json

    from mlx_lm.utils import save_model

    from omlx.models.facts import parameter_bytes
    from omlx.models.pool import ModelPool
    from omlx.settings import SettingsStore

    matmul_env("auto")
    source = build_model(tmp_path / "float", TinyModelSpec(seed=6))
    model = quantized(source)
    folder = tmp_path / "models" / "q4"
    folder.mkdir(parents=True)
    save_model(folder, model)
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    for extra in source.iterdir():
        if extra.name.startswith("tokenizer") or extra.name.endswith(".jinja") or extra.name == "special_tokens_map.json":
            (folder / extra.name).write_bytes(extra.read_bytes())
    home = tmp_path / "home"
    home.mkdir()
    (home / "model_settings.json").write_text(json.dumps({"version": 1, "models": {"q4": {"dequantize": False}}}))
    pool = ModelPool([tmp_path / "models"], EngineConfig(block_size=16, num_blocks=32, max_num_batched_tokens=64),
                     memory_budget=1 << 30, settings=SettingsStore(home))
    try:
        async with pool.lease("q4"):
            pass
        resident = pool.resident("q4")
        engine = resident.model.engine.engine
        assert isinstance(engine, LLMEngine) and not isinstance(engine, FallbackEngine), type(engine)
        assert QuantLinear in layer_types(engine.model)
        assert resident.model.weights_bytes == parameter_bytes(engine.model)
    finally:
        await pool.close()
