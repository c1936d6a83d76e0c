"""Coverage sweep: every mlx-lm family with a non-trivial cache that omlx.testing.tiny_sweep
builds serves, token-exact.

For each family: load the tiny model with mlx_lm.load, build the paged engine (the fallback
engine over mlx-lm's own caches when the paged one refuses it with UnsupportedLayout, as the
model pool does), run three greedy requests of different lengths (the longest past every
window) arriving at different steps, and check each against mlx-lm generating it alone.
Which engine serves each family is pinned in SERVED_BY: a family that silently moves to the
fallback (or an engine that starts accepting a model it cannot run) fails here.
"""

from __future__ import annotations

import random

import pytest
from mlx_lm import load

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.fallback_engine import FallbackEngine
from omlx.scheduler.layer_kinds import UnsupportedLayout
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_sweep import ALL_FAMILIES, build_sweep_model

MAX_NEW = 8
_rng = random.Random(11)
# Arrival step -> prompt: 5 tokens (inside every window), 19 (past the 8-token windows, over
# two blocks), 41 (past every window; prefilled over three steps at 16 tokens a step).
ARRIVALS = {0: [_rng.randrange(5, 500) for _ in range(19)],
            2: [_rng.randrange(5, 500) for _ in range(5)],
            5: [_rng.randrange(5, 500) for _ in range(41)]}

PAGED, FALLBACK = "paged", "fallback"

# Which engine serves each family, and (for the fallback) why.
SERVED_BY = {
    # hybrid linear attention / Mamba / short convolutions + full attention
    "qwen3_5": PAGED, "qwen3_next": PAGED, "qwen3_5_moe": PAGED, "lfm2": PAGED, "lfm2_moe": PAGED,
    "nemotron_h": PAGED, "granitemoehybrid": PAGED, "jamba": PAGED, "olmo_hybrid": PAGED,
    # recurrent state + sliding window
    "recurrent_gemma": PAGED,
    # sliding windows (with sinks, MoE, per-kind RoPE ...)
    "gemma3_text": PAGED, "gemma3": PAGED, "olmo3": PAGED, "gpt_oss": PAGED, "llama_swa": PAGED,
    "ministral3": PAGED, "cohere2": PAGED, "exaone4": PAGED, "exaone_moe": PAGED, "mimo_v2_flash": PAGED,
    "step3p5": PAGED, "afmoe": PAGED, "laguna": PAGED, "mellum": PAGED, "muse_glimmer": PAGED,
    "spark2_5": PAGED, "plamo3": PAGED,
    # full attention only, unusual layouts
    "llama4_text": PAGED, "nanbeige": PAGED,
    # -- fallback --
    "llama4": FALLBACK,  # chunked attention trimmed by the model itself: the paged pass disagrees
    "falcon_h1": FALLBACK,  # CacheList
    "baichuan_m1": FALLBACK,  # CacheList
    "deepseek_v32": FALLBACK,  # CacheList (MLA + indexer keys)
    "longcat_flash": FALLBACK,  # CacheList
    "mamba": FALLBACK, "mamba2": FALLBACK, "rwkv7": FALLBACK,  # state only, no attention layer
    "gemma4_text": FALLBACK, "gemma4": FALLBACK,  # full and sliding layers of different head sizes
    "gemma3n": FALLBACK, "afm7": FALLBACK,  # layers that read another layer's KV
    "kimi_linear": FALLBACK, "bailing_moe_v3": FALLBACK,  # MLA scores computed outside attention
    "bailing_moe_linear": FALLBACK, "bailing_hybrid": FALLBACK,  # RoPE that takes one offset only
    "iquestloopcoder": FALLBACK,  # two loops mixing a full and a windowed pass: paged pass disagrees
    "plamo2": FALLBACK,  # attention through mx.fast.scaled_dot_product_attention: not routable
    "nemotron-nas": FALLBACK,  # a "replace_with_linear" attention block leaves its KVCache empty
}


def test_every_family_has_an_expected_engine():
    assert sorted(SERVED_BY) == sorted(ALL_FAMILIES)


def build_engine(model):
    """The paged engine, or the fallback when the paged one refuses the model (as
    omlx.models.pool does)."""
    config = EngineConfig(block_size=8, num_blocks=96, max_num_batched_tokens=16)
    try:
        return LLMEngine(model, config, context_window=4096)
    except UnsupportedLayout as exc:
        return FallbackEngine(model, config, context_window=4096, reason=str(exc))


def run(engine, eos) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    for step in range(500):
        if step in ARRIVALS:
            request_id = f"r{step}"
            engine.add_request(GenerationRequest(request_id, ARRIVALS[step], MAX_NEW, stop_token_ids=eos))
            outputs[request_id] = []
        for request_id, event in engine.step():
            assert event.error is None, f"{request_id}: {event.error}"
            if event.token_id is not None:
                outputs[request_id].append(event.token_id)
            if event.finish_reason is not None:
                finished.add(request_id)
        if len(finished) == len(ARRIVALS) and not engine.has_work:
            break
    assert finished == set(outputs), "some requests never finished"
    return outputs


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
@pytest.mark.slow
def test_family_serves_token_exact(tmp_path, family):
    model, tokenizer = load(str(build_sweep_model(tmp_path / "m", family, seed=3)))
    eos = frozenset(tokenizer.eos_token_ids)
    # mlx-lm alone first, before any engine has touched the model.
    # PLaMo 3 in mlx-lm 0.32 masks its sliding layers with window + 1 keys in multi-token passes
    # but keeps only `window` keys in its RotatingKVCache, so mlx-lm's own tokens depend on its
    # prefill step size.  The engine attends `window` keys (the cache's size) in every pass:
    # mlx-lm fed one token at a time, which is what its decode does anyway.
    step_size = 1 if family == "plamo3" else 2048
    expected = {f"r{step}": greedy_reference(model, prompt, MAX_NEW, eos, prefill_step_size=step_size)
                for step, prompt in ARRIVALS.items()}
    assert all(len(tokens) == MAX_NEW for tokens in expected.values())

    engine = build_engine(model)
    info = engine.serving_info()
    assert info["engine"] == SERVED_BY[family], info.get("reason", info)

    outputs = run(engine, eos)
    for request_id, tokens in expected.items():
        prompt_len = len(ARRIVALS[int(request_id[1:])])
        assert outputs[request_id] == tokens, f"{info['engine']}: prompt of {prompt_len} tokens diverged"

    if isinstance(engine, LLMEngine):
        assert engine.blocks.leaked_blocks() == []
        assert engine.blocks.num_free_blocks == engine.blocks.usable_blocks
        if engine.state is not None:
            assert engine.state.pool.used_slots == 0
    else:
        assert not engine.sequences and engine.kv_bytes == 0
