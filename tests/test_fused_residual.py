"""Fused residual norms (omlx/models/fused_residual.py) on every block family they swap, in the
form the server loads (weight_form.apply on the packed path): the fused model's engine gives
the same tokens and the same logits as the same packed model without the swap, with prefix
hits and overlapped steps, and every KV block comes back."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_lm import load

from omlx.models import fused_residual, weight_form
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler import runner as runner_module
from omlx.testing.tiny_families import build_from_config

pytestmark = pytest.mark.usefixtures("attention_kernel")

BASE = {"hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 4096}
FAMILIES = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2", "rope_theta": 10000.0},
    "qwen3": {"model_type": "qwen3", "head_dim": 16, "rope_theta": 10000.0},
    "qwen3_moe": {"model_type": "qwen3_moe", "head_dim": 16, "rope_theta": 10000.0, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
    "phi3": {"model_type": "phi3", "rope_theta": 10000.0, "max_position_embeddings": 4096,
             "original_max_position_embeddings": 4096},
    # Sliding-window layers: fused too, though its steps are not overlapped (window pool).
    "llama_swa": {"model_type": "llama", "sliding_window": 8,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}


def served_model(path, fuse: bool):
    model, tokenizer = load(str(path))
    with pytest.MonkeyPatch.context() as patch:
        if not fuse:
            patch.setattr(weight_form, "fuse_residual_norms", lambda m: 0)
        weight_form.apply(model, None, 8 << 30)
    return model, frozenset(tokenizer.eos_token_ids)


def run(model, eos):
    """Three requests (the third repeats the first's prompt: a prefix hit); tokens and every
    logits row the passes produced."""
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        tokens, cached = record_and_step(model, eos, seen, patch)
    return tokens, cached, seen


def record_and_step(model, eos, seen, patch):
    for name in ("forward", "decode_pass"):
        real = getattr(runner_module.ModelRunner, name)

        def recording(self, *args, _real=real, **kwargs):
            logits = _real(self, *args, **kwargs)
            if logits is not None:
                seen.append(np.array(logits))
            return logits

        patch.setattr(runner_module.ModelRunner, name, recording)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(5, 300, size=n).tolist() for n in (21, 6)]
    prompts.append(list(prompts[0]))
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=16), context_window=1024)
    tokens, cached = {}, {}
    for step in range(400):
        if step in (0, 1, 12):
            i = (0, 1, 12).index(step)
            engine.add_request(GenerationRequest(str(i), prompts[i], 10, stop_token_ids=eos))
        for request_id, event in engine.step():
            if event.token_id is not None:
                tokens.setdefault(request_id, []).append(event.token_id)
            if event.cached_prompt_tokens:
                cached[request_id] = event.cached_prompt_tokens
        if step > 12 and not engine.has_work:
            break
    assert engine.blocks.leaked_blocks() == []
    return tokens, cached


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_residual_serves_every_family_it_swaps_bit_for_bit(tmp_path, family, matmul_env):
    if matmul_env("auto").name != "bf16-packed":
        pytest.skip("the packed path (where the norms are kernel nodes) needs a CPU with a bf16 unit")
    path = build_from_config(tmp_path / family, {**BASE, **FAMILIES[family]}, seed=2)
    fused, eos = served_model(path, True)
    plain, _ = served_model(path, False)
    assert all(fused_residual._swap.swapped(block) for block in fused.model.layers)
    assert not any(fused_residual._swap.swapped(block) for block in plain.model.layers)
    got_tokens, got_cached, got_logits = run(fused, eos)
    want_tokens, want_cached, want_logits = run(plain, eos)
    assert got_tokens == want_tokens and all(len(t) == 10 for t in got_tokens.values())
    assert got_cached == want_cached and got_cached.get("2", 0) >= 16  # the repeated prompt hit the cache
    assert len(got_logits) == len(want_logits)
    for got, want in zip(got_logits, want_logits):
        assert np.array_equal(got, want)
