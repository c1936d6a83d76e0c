"""Running and packing tiny models the way several test modules do: one copy of each."""

from __future__ import annotations

from pathlib import Path

from omlx.models import packed_weights
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine


def engine_outputs(model, prompts, max_tokens) -> list[list[int]]:
    """Every prompt's generated tokens from one paged engine that serves them all together
    (small blocks and a 32-token step budget, so prefill is chunked and decode steps mix);
    asserts no block leaked."""
    engine = LLMEngine(model, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=32), context_window=2048)
    outputs = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), prompt, max_tokens))
    for _ in range(2000):
        for request_id, event in engine.step():
            if event.token_id is not None:
                outputs[int(request_id)].append(event.token_id)
        if not engine.has_work:
            break
    assert engine.blocks.leaked_blocks() == []
    return outputs


def pack_model_without(model, step: str) -> None:
    """`pack_model` with one of its finishing passes (`fuse_projections`, `swap_rms_norms`)
    turned off, to compare a model packed with and without it."""
    original = getattr(packed_weights, step)
    setattr(packed_weights, step, lambda model: 0)
    try:
        packed_weights.pack_model(model)
    finally:
        setattr(packed_weights, step, original)


def tiny_model_pool(model_path: Path, tmp_path: Path):
    """A ModelPool serving `model_path` as "m" from a models folder under tmp_path, with a small
    KV pool and a 1 GiB budget; the caller closes it."""
    from omlx.models.pool import ModelPool
    from omlx.settings import SettingsStore

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").symlink_to(model_path)
    (tmp_path / "home").mkdir()
    return ModelPool([tmp_path / "models"], EngineConfig(block_size=16, num_blocks=32, max_num_batched_tokens=64),
                     memory_budget=1 << 30, settings=SettingsStore(tmp_path / "home"))
