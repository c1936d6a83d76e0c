"""How one model's engine is sized and what it does: the options `omlx serve` and the model
settings turn into, read by the engine, its pools and the fallback engine alike.

Its defaults are the server options' built-in defaults (omlx.settings.SERVER_OPTIONS), and
`EngineConfig.from_settings` is the one place settings become an engine config: the server's
resolved options at startup, one model's settings over them at each load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omlx.settings import option_default
from omlx.settings_values import gib_to_bytes

# A growable pool starts this big (or at its cap, if smaller) and doubles on demand.
INITIAL_KV_BYTES = 256 << 20
# The draft model's KV pool is fixed in size: the main pool's cap scaled to the draft model,
# at most this much of the main model's (drafting for fewer sequences only costs speed).
DRAFT_KV_CAP = 512 << 20


@dataclass
class EngineConfig:
    block_size: int = option_default("block_size")
    # The most memory this model's KV pool may grow to.  None: what is left of the memory
    # budget after the weights, with a margin (`default_kv_cache_bytes`).  The pool starts
    # at `initial_kv_bytes` and grows as requests need blocks, each time only if the memory
    # budget (`LLMEngine(kv_budget=...)`) has room.
    kv_cache_bytes: int | None = None
    initial_kv_bytes: int = INITIAL_KV_BYTES
    num_blocks: int | None = None  # a fixed pool of exactly this many blocks (tests)
    max_num_seqs: int = option_default("max_num_seqs")
    max_num_batched_tokens: int = option_default("max_num_batched_tokens")
    # Image prompts whose vision tower runs in one step (see SchedulerConfig).
    max_vision_prompts_per_step: int = option_default("max_vision_prompts_per_step")
    max_model_len: int | None = None  # default: the model's own context window
    kv_bits: int | None = None  # 4 or 8: store KV blocks quantized (mx.quantize layout)
    kv_group_size: int = option_default("kv_group_size")
    # With kv_bits: keep a sequence's KV in the model's dtype until this many of its tokens
    # are computed, then quantize it (mlx-lm's --quantized-kv-start).  0: quantized from the
    # first token.  Above 0 the engine keeps a second, float pool for those sequences.
    quantized_kv_start: int = option_default("quantized_kv_start")
    num_float_blocks: int | None = None  # a fixed float pool of this many blocks (tests)
    # The dtype KV pools store keys and values in: auto (the model's own, or bf16 where its
    # matmuls run packed bf16: omlx.scheduler.kv_dtype), float32, bfloat16 or float16.
    kv_dtype: str = option_default("kv_dtype")
    # The prefix cache's disk tier: full blocks are also written under this directory
    # (one subdirectory per model identity) and loaded back by later requests, also after a
    # restart.  None turns it off.
    kv_cache_dir: str | None = None
    kv_disk_bytes: int = gib_to_bytes(option_default("kv_disk_gb"))  # size cap of one model's disk tier; LRU files go first
    prefix_cache: bool = option_default("prefix_cache")  # False: every prompt is computed from scratch (measurements)
    # Speculative decoding (omlx.scheduler.speculation): prompt lookup drafts for every
    # request that does not opt out, verified in the step's one ragged pass.
    speculative: bool = option_default("speculative_decoding")
    num_draft_tokens: int = option_default("num_draft_tokens")  # the most draft tokens one sequence verifies per step
    # Plain decode steps overlapped: the next one built while this one computes (lookahead).
    overlap_steps: bool = option_default("overlap_steps")
    # A smaller model (its id in the model dirs) with the same tokenizer that drafts instead
    # of prompt lookup; the model pool loads it and hands it to the engine.
    draft_model: str | None = None
    # Models with recurrent-state layers: tokens between state snapshots kept for the prefix
    # cache (rounded up to a whole number of blocks; a resent conversation resumes from the
    # last snapshot inside its cached prefix), and the memory the snapshots may hold.
    state_snapshot_tokens: int = option_default("state_snapshot_tokens")
    state_snapshot_bytes: int = 512 << 20
    # Sliding-window layers in a pool of their own, so a sequence's KV in them is bounded by
    # the window (False: they share the main pool and keep every block, as full layers do).
    window_kv: bool = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | Any, base: "EngineConfig | None" = None,
                      home: Path | None = None) -> "EngineConfig":
        """The engine config `settings` describe, over `base` (default: the built-in one).

        `settings` is either the server's options after their precedence (flag > env >
        settings.json > default: omlx.settings.resolve_server_options), or one model's
        settings (a ModelSettings or its dict form): its KV cap, KV quantization,
        speculative decoding and context cap win over the server's for that model.  `base`
        comes back as it is when the settings change nothing.
        """
        values = settings.as_dict() if hasattr(settings, "as_dict") else settings
        overrides = {name: convert(values[key]) for key, (name, convert) in _FROM_SETTINGS.items()
                     if values.get(key) is not None}
        if values.get("max_context_window") is not None:  # oMLX's per-model context cap
            cap = values["max_context_window"]
            limit = overrides.get("max_model_len", base.max_model_len if base is not None else None)
            overrides["max_model_len"] = min(limit or cap, cap)
        if "kv_disk" in values:  # the server's options: where the prefix cache's disk tier lives
            on = values["kv_disk"] and values.get("prefix_cache", True)
            if home is None:
                from omlx.settings import omlx_home

                home = omlx_home()
            folder = values.get("kv_cache_dir") or home / "cache"
            overrides["kv_cache_dir"] = str(Path(folder).expanduser()) if on else None
        if base is None:
            return cls(**overrides)
        return dataclasses.replace(base, **overrides) if overrides else base


def _same(value):
    return value


# Settings key (settings.json, model_settings.json and the server options share them) -> the
# EngineConfig field it sets, and how its value becomes that field's.
_FROM_SETTINGS = {
    "block_size": ("block_size", _same),
    "kv_cache_gb": ("kv_cache_bytes", gib_to_bytes),
    "max_num_seqs": ("max_num_seqs", _same),
    "max_num_batched_tokens": ("max_num_batched_tokens", _same),
    "max_vision_prompts_per_step": ("max_vision_prompts_per_step", _same),
    "state_snapshot_tokens": ("state_snapshot_tokens", _same),
    "max_model_len": ("max_model_len", _same),
    "kv_bits": ("kv_bits", lambda bits: bits or None),  # 0: unquantized
    "kv_group_size": ("kv_group_size", _same),
    "kv_dtype": ("kv_dtype", _same),
    "quantized_kv_start": ("quantized_kv_start", _same),
    "kv_disk_gb": ("kv_disk_bytes", gib_to_bytes),
    "prefix_cache": ("prefix_cache", _same),
    "speculative_decoding": ("speculative", _same),
    "num_draft_tokens": ("num_draft_tokens", _same),
    "draft_model": ("draft_model", _same),
    "overlap_steps": ("overlap_steps", _same),
}
