"""Quantized KV blocks (--kv-bits): the same tokens as mlx-lm's QuantizedKVCache run alone,
whatever the batch, at a fraction of the float pool's bytes."""

import random

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import QuantizedKVCache

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.kv_cache import PagedKVStorage
from omlx.testing.tiny_models import TinyModelSpec, build_model

# Every engine invariant holds with the fused attention kernel and with the portable path.
pytestmark = pytest.mark.usefixtures("attention_kernel")

# Quantization groups run along the head dim, so the fixture needs head_dim >= 64.
SPEC = TinyModelSpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, seed=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, tokenizer = load(str(build_model(tmp_path_factory.mktemp("q") / "m", SPEC)))
    return model, frozenset(tokenizer.eos_token_ids)


def mlx_lm_quantized_greedy(model, prompt, max_tokens, bits, eos):
    """mlx-lm's QuantizedKVCache fed one token at a time: every query reads the quantized
    cache, itself included - the layout omlx's quantized pool agrees with."""
    caches = [QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
    for token in prompt:
        logits = model(mx.array([[token]]), cache=caches)
    out = []
    for _ in range(max_tokens):
        token = int(mx.argmax(logits[0, -1]).item())
        if token in eos:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=caches)
    return out


def run(engine, requests, eos):
    outputs = {rid: [] for rid, _, _ in requests}
    pending = list(requests)
    while pending or engine.has_work:
        if pending:  # one arrival per step: batches mix prefill chunks and decodes
            rid, prompt, n = pending.pop(0)
            engine.add_request(GenerationRequest(rid, prompt, n, stop_token_ids=eos))
        for rid, event in engine.step():
            if event.token_id is not None:
                outputs[rid].append(event.token_id)
    return outputs


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.slow
def test_batched_quantized_engine_matches_mlx_lm_quantized_cache(model, bits):
    model, eos = model
    rng = random.Random(bits)
    shared = [rng.randrange(5, 500) for _ in range(37)]
    requests = [
        (f"r{i}", shared[: rng.randrange(0, 37)] + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 20))],
         rng.randrange(8, 40))
        for i in range(6)
    ]
    # A pool small enough to preempt, budget small enough to chunk prefills.
    engine = LLMEngine(
        model, EngineConfig(block_size=8, num_blocks=24, max_num_batched_tokens=16, kv_bits=bits), 4096
    )
    outputs = run(engine, requests, eos)
    for rid, prompt, n in requests:
        assert outputs[rid] == mlx_lm_quantized_greedy(model, prompt, n, bits, eos), rid
    assert engine.blocks.leaked_blocks() == []


def test_quantized_pool_bytes(model):
    model, _ = model
    float_engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=8), 4096)
    layout = float_engine.storage.layout
    per_token = layout.bytes_per_token
    for bits, most in ((8, 0.55), (4, 0.3)):
        engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=8, kv_bits=bits), 4096)
        actual = sum(a.nbytes for a in engine.storage.arrays()) / (8 * 16)
        assert actual == PagedKVStorage.bytes_per_token(layout, bits, 64)  # accounting is honest
        assert actual / per_token <= most
        # The same budget holds proportionally more blocks.
        assert PagedKVStorage.blocks_for_budget(layout, 16, 1 << 24, bits) > PagedKVStorage.blocks_for_budget(
            layout, 16, 1 << 24
        ) * (1 / most) * 0.99


def test_head_dim_too_small_to_quantize_keeps_a_float_pool(tmp_path, caplog):
    model, _ = load(str(build_model(tmp_path / "m", TinyModelSpec())))  # head_dim 16
    with caplog.at_level("WARNING", logger="omlx.engine"):
        engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=8, kv_bits=4), 4096)
    assert engine.storage.kv_bits is None
    assert "KV cache stays in" in caplog.text


def test_group_size_shrinks_to_fit_the_head_dim(tmp_path):
    spec = TinyModelSpec(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    model, _ = load(str(build_model(tmp_path / "m", spec)))
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=8, kv_bits=8, kv_group_size=64), 4096)
    assert (engine.storage.kv_bits, engine.storage.group_size) == (8, 32)
