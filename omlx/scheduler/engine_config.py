"""How one model's engine is sized and what it does: the options `omlx serve` and the model
settings turn into, read by the engine, its pools and the fallback engine alike."""

from __future__ import annotations

from dataclasses import dataclass

# A growable pool starts this big (or at its cap, if smaller) and doubles on demand.
INITIAL_KV_BYTES = 256 << 20
# The draft model's KV pool is fixed in size: the main pool's cap scaled to the draft model,
# at most this much of the main model's (drafting for fewer sequences only costs speed).
DRAFT_KV_CAP = 512 << 20


@dataclass
class EngineConfig:
    block_size: int = 32
    # The most memory this model's KV pool may grow to.  None: what is left of the memory
    # budget after the weights, with a margin (`default_kv_cache_bytes`).  The pool starts
    # at `initial_kv_bytes` and grows as requests need blocks, each time only if the memory
    # budget (`LLMEngine(kv_budget=...)`) has room.
    kv_cache_bytes: int | None = None
    initial_kv_bytes: int = INITIAL_KV_BYTES
    num_blocks: int | None = None  # a fixed pool of exactly this many blocks (tests)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Image prompts whose vision tower runs in one step (see SchedulerConfig).
    max_vision_prompts_per_step: int = 1
    max_model_len: int | None = None  # default: the model's own context window
    kv_bits: int | None = None  # 4 or 8: store KV blocks quantized (mx.quantize layout)
    kv_group_size: int = 64
    # With kv_bits: keep a sequence's KV in the model's dtype until this many of its tokens
    # are computed, then quantize it (mlx-lm's --quantized-kv-start).  0: quantized from the
    # first token.  Above 0 the engine keeps a second, float pool for those sequences.
    quantized_kv_start: int = 0
    num_float_blocks: int | None = None  # a fixed float pool of this many blocks (tests)
    # The prefix cache's disk tier: full blocks are also written under this directory
    # (one subdirectory per model identity) and loaded back by later requests, also after a
    # restart.  None turns it off.
    kv_cache_dir: str | None = None
    kv_disk_bytes: int = 10 << 30  # size cap of one model's disk tier; LRU files go first
    prefix_cache: bool = True  # False: every prompt is computed from scratch (measurements)
    # Speculative decoding (omlx.scheduler.speculation): prompt lookup drafts for every
    # request that does not opt out, verified in the step's one ragged pass.
    speculative: bool = True
    num_draft_tokens: int = 8  # the most draft tokens one sequence verifies per step
    # A smaller model (its id in the model dirs) with the same tokenizer that drafts instead
    # of prompt lookup; the model pool loads it and hands it to the engine.
    draft_model: str | None = None
    # Models with recurrent-state layers: tokens between state snapshots kept for the prefix
    # cache (rounded up to a whole number of blocks; a resent conversation resumes from the
    # last snapshot inside its cached prefix), and the memory the snapshots may hold.
    state_snapshot_tokens: int = 256
    state_snapshot_bytes: int = 512 << 20
    # Sliding-window layers in a pool of their own, so a sequence's KV in them is bounded by
    # the window (False: they share the main pool and keep every block, as full layers do).
    window_kv: bool = True
