"""Fused sibling projections (omlx/models/fused_projections.py): q/k/v and gate/up of one
input computed by one packed-bf16 call, bit-identical to the separate calls, recomputed for
a different input, holding nothing past a pass, and put back where a model's siblings do not
share their input."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from omlx.kernels import cpu_features
from omlx.kernels.linear import PackedLinear
from omlx.models import fused_projections, packed_weights
from omlx.models.facts import parameter_bytes
from omlx.models.fused_projections import FusedCall, ProjectionSlice, fuse_group, fuse_projections, is_fused
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.testing.tiny_models import TinyModelSpec, build_model
from model_helpers import pack_model_without

pytestmark = pytest.mark.skipif(cpu_features.cpu_features().bf16_isa is None,
                                reason="the packed path runs only where the CPU has a bf16 unit")


def packed(n: int, k: int, seed: int, bias: bool) -> PackedLinear:
    rng = np.random.default_rng(seed)
    weight = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    return PackedLinear(weight, mx.array(rng.standard_normal(n).astype(np.float32)) if bias else None)


@pytest.mark.parametrize("widths, k", [((64, 64, 64), 64), ((72, 18, 18), 72), ((136, 136), 73), ((5, 130, 1), 9)])
@pytest.mark.parametrize("rows", [1, 5, 37])
@pytest.mark.parametrize("bias", [(False, False, False), (True, False, True)])
def test_fused_columns_are_bit_identical_to_separate_calls(widths, k, rows, bias):
    """Widths off the 64-column panel put one part's columns in another's panel: each output
    column is still accumulated by the same instructions, so every bit agrees."""
    parts = [packed(n, k, seed, b) for seed, (n, b) in enumerate(zip(widths, bias))]
    call = FusedCall(fuse_group(parts), [p.out_features for p in parts])
    slices = [ProjectionSlice(call, i, p) for i, p in enumerate(parts)]
    x = mx.array(np.random.default_rng(rows).standard_normal((rows, 1, k)).astype(np.float32))
    got = [s(x) for s in slices]
    assert call.computes == 1
    for part, y in zip(parts, got):
        expected = part(x)
        assert y.shape == expected.shape
        assert np.array_equal(np.array(y), np.array(expected))


def test_a_different_input_recomputes_and_nothing_outlives_the_pass():
    parts = [packed(40, 24, seed, False) for seed in range(3)]
    call = FusedCall(fuse_group(parts), [40, 40, 40])
    q, k, v = (ProjectionSlice(call, i, p) for i, p in enumerate(parts))
    rng = np.random.default_rng(1)
    x, other = (mx.array(rng.standard_normal((3, 24)).astype(np.float32)) for _ in range(2))
    got_q = q(x)
    got_k = k(other)  # another array: recomputed, never x's columns
    assert call.computes == 2
    assert np.array_equal(np.array(got_k), np.array(parts[1](other)))
    assert np.array_equal(np.array(got_q), np.array(parts[0](x)))
    # An equal array that is not the same object is recomputed too: identity, not value.
    copy = mx.array(np.array(x))
    assert np.array_equal(np.array(v(copy)), np.array(parts[2](x)))
    assert call.computes == 3
    # Asking a part twice of the same input recomputes (a new pass), it never reuses.
    q(x), k(x), v(x)
    assert call.computes == 4 and call.local.last is None  # all parts taken: nothing held


@pytest.fixture(scope="module", params=[
    ("llama", {}),
    ("qwen3", {}),  # q_norm / k_norm between the projection and RoPE
    ("llama", {"attention_bias": True, "mlp_bias": True}),
])
def model_pair(request, tmp_path_factory):
    """The same tiny model packed twice: with fusion and with the siblings kept apart."""
    model_type, extra = request.param
    spec = TinyModelSpec(model_type=model_type, hidden_size=72, intermediate_size=136, head_dim=18,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=509, seed=7,
                         extra_config=extra)
    path = build_model(tmp_path_factory.mktemp(f"fused-{model_type}") / "m", spec)
    fused, tokenizer = load(str(path))
    packed_weights.pack_model(fused)
    plain, _ = load(str(path))
    pack_model_without(plain, "fuse_projections")
    return fused, plain, frozenset(tokenizer.eos_token_ids), extra


def test_packing_fuses_every_layer_and_logits_are_bit_identical(model_pair):
    fused, plain, _, extra = model_pair
    assert is_fused(fused) and not is_fused(plain)
    for layer in fused.model.layers:
        assert isinstance(layer.self_attn.q_proj, ProjectionSlice)
        assert isinstance(layer.mlp.up_proj, ProjectionSlice)
        assert layer.self_attn.fused_qkv.out_features == 72 + 2 * 2 * 18
        if extra:
            assert "bias" in layer.self_attn.fused_qkv and "bias" in layer.mlp.fused_gate_up
    tokens = mx.array([[5, 9, 200, 31, 7, 8, 400]])
    assert np.array_equal(np.array(fused(tokens)), np.array(plain(tokens)))
    # The weights are held once: the slices own no parameters.
    assert not any(".q_proj." in name or ".up_proj." in name for name, _ in tree_flatten(fused.parameters()))
    assert abs(parameter_bytes(fused) - parameter_bytes(plain)) < 0.1 * parameter_bytes(plain)


def run_engine(model, eos, prompts, max_tokens):
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=24),
                       context_window=1024)
    for i, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(GenerationRequest(str(i), prompt, limit, stop_token_ids=eos))
    outputs = {i: [] for i in range(len(prompts))}
    while engine.has_work:
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
    return outputs


@pytest.mark.usefixtures("attention_kernel")
def test_engine_tokens_are_the_unfused_ones(model_pair):
    """Through the ragged engine (decodes and prefill chunks in one pass): the same greedy
    tokens as the unfused packed model, batched."""
    fused, plain, eos, _ = model_pair
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 500, size=n).tolist() for n in (3, 17, 40, 9)]
    limits = [12, 6, 10, 14]
    assert run_engine(fused, eos, prompts, limits) == run_engine(plain, eos, prompts, limits)
    # Every group handed out all its parts each pass: no fused result (nor the activations
    # and pool writes its graph reaches) is held past the step.
    calls = {id(m._call): m._call for _, m in fused.named_modules() if isinstance(m, ProjectionSlice)}
    assert calls and all(getattr(call.local, "last", None) is None for call in calls.values())


class CrossInputs(nn.Module):
    """Siblings fed different inputs (k and v from a memory, q from x): must not be fused."""

    def __init__(self):
        super().__init__()
        self.q_proj = packed(16, 16, 0, False)
        self.k_proj = packed(16, 16, 1, False)
        self.v_proj = packed(16, 16, 2, False)

    def __call__(self, ids):
        x = mx.ones((ids.shape[1], 16)) * ids.reshape(-1, 1).astype(mx.float32)
        memory = x * 0.5
        return self.q_proj(x) + self.k_proj(memory) + self.v_proj(memory)


class SharedInputs(CrossInputs):
    def __call__(self, ids):
        x = mx.ones((ids.shape[1], 16)) * ids.reshape(-1, 1).astype(mx.float32)
        return self.q_proj(x) * self.k_proj(x) - self.v_proj(x)


def test_siblings_of_different_inputs_are_put_back():
    model = CrossInputs()
    before = np.array(model(mx.array([[1, 2, 3]])))
    assert fuse_projections(model) == 0
    assert type(model.q_proj) is PackedLinear and "fused_qkv" not in model
    assert np.array_equal(np.array(model(mx.array([[1, 2, 3]]))), before)
    shared = SharedInputs()
    assert fuse_projections(shared) == 1 and isinstance(shared.v_proj, ProjectionSlice)
    assert fused_projections.GROUPS[0][0] in shared
