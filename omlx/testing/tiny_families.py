"""Tiny random-weight models of the mlx-lm families whose layers are not all full attention.

Each family is built from mlx-lm's own model class (hidden size 64-128, a few layers), with the
same trained byte-level BPE tokenizer and ChatML template as `tiny_models`, and loads with
`mlx_lm.load` like a checkpoint from the hub.  The shapes are chosen so that every layer kind
the family has appears at least once, with windows and chunks small enough (8-16 tokens) that
test prompts run past them.

    hybrid linear attention  qwen3_5 (Gated DeltaNet + full attention)
    short convolutions       lfm2
    Mamba-2 hybrid           nemotron_h
    sliding windows          gemma3_text, olmo3, gpt_oss (+ attention sinks, MoE)
    no-RoPE layers           llama4_text (full attention only, in mlx-lm 0.32)
    fallback only            llama4 (chunked attention; its model trims the caches itself),
                             falcon_h1 (CacheList: Mamba state and KV in one layer)
"""

from __future__ import annotations

import importlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .tiny_models import TinyModelSpec, _write_folder, build_tokenizer

VOCAB = 512

FAMILIES: dict[str, dict] = {
    "qwen3_5": {
        "model_type": "qwen3_5",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "rope_parameters": {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1]},
    },
    "lfm2": {
        "model_type": "lfm2",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
        "block_dim": 64, "block_ff_dim": 128, "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False, "full_attn_idxs": [1, 3], "tie_word_embeddings": False,
    },
    "nemotron_h": {
        "model_type": "nemotron_h",
        "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 4096,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "attention_bias": False,
        "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False, "ssm_state_size": 16,
        "conv_kernel": 4, "n_groups": 1, "mlp_bias": False, "layer_norm_epsilon": 1e-5,
        "use_bias": False, "use_conv_bias": True, "hybrid_override_pattern": ["M", "*", "-", "M", "*", "-"],
        "tie_word_embeddings": False,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "sliding_window_pattern": 2, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_local_base_freq": 10000.0,
    },
    "olmo3": {
        "model_type": "olmo3",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "sliding_window": 16, "rope_theta": 10000.0,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    },
    "gpt_oss": {
        "model_type": "gpt_oss",
        "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4, "num_local_experts": 4,
        "num_experts_per_tok": 2, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "sliding_window": 8, "rope_theta": 10000, "rms_norm_eps": 1e-5,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
    "llama4_text": {
        "model_type": "llama4_text",
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "intermediate_size": 128,
        "intermediate_size_mlp": 128, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "head_dim": 16, "tie_word_embeddings": False, "no_rope_layers": [1, 1, 1, 0], "use_qk_norm": True,
    },
    "llama4": {
        "model_type": "llama4",
        "text_config": {
            "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8, "head_dim": 16,
            "hidden_size": 64, "interleave_moe_layer_step": 1, "intermediate_size": 64,
            "intermediate_size_mlp": 128, "max_position_embeddings": 4096, "num_attention_heads": 4,
            "num_experts_per_tok": 1, "num_hidden_layers": 4, "num_key_value_heads": 2, "num_local_experts": 2,
            "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 10000.0, "use_qk_norm": True,
            "vocab_size": VOCAB,
        },
    },
    "falcon_h1": {
        "model_type": "falcon_h1",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "mamba_d_conv": 4, "mamba_d_head": 16, "mamba_d_ssm": 64,
        "mamba_d_state": 16, "mamba_expand": 1, "mamba_n_groups": 1, "mamba_n_heads": 4,
        "mamba_chunk_size": 16, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
}


def build_family_model(path: str | Path, family: str, seed: int = 0, logit_scale: float = 8.0,
                       **overrides) -> Path:
    """Write a tiny random `family` model (see FAMILIES) into `path`; returns the path."""
    return build_from_config(path, {**FAMILIES[family], **overrides}, seed=seed, logit_scale=logit_scale)


def build_from_config(path: str | Path, config: dict, seed: int = 0, logit_scale: float = 8.0) -> Path:
    """Write a tiny random model of mlx-lm's `config["model_type"]` built from `config`."""
    config = dict(config)
    spec = TinyModelSpec(model_type=config["model_type"], vocab_size=VOCAB, seed=seed,
                         max_position_embeddings=config.get("max_position_embeddings", 4096))
    tokenizer = build_tokenizer(VOCAB)
    config["vocab_size"] = max(VOCAB, tokenizer.get_vocab_size())
    if "text_config" in config:
        config["text_config"] = {**config["text_config"], "vocab_size": config["vocab_size"]}
    config["eos_token_id"] = tokenizer.token_to_id("<|im_end|>")
    config.setdefault("torch_dtype", "float32")
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    _spread_logits(model, logit_scale, config["eos_token_id"])
    return _write_folder(Path(path), spec, config, model, tokenizer)


def _spread_logits(model, scale: float, eos_id: int) -> None:
    """Random weights give nearly flat logits: scale the output head so greedy choices are
    well separated (token-exact comparisons then test the engine, not rounding luck), and
    zero the end-of-turn row so replies run to max_tokens."""
    head = _output_head(model)
    if head is None:
        return
    weight = head.weight * scale
    weight[eos_id] = 0.0
    head.weight = weight


def _output_head(model) -> nn.Module | None:
    # The head may sit under a language-model wrapper (qwen3_5: language_model.lm_head).
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("lm_head", "output") and isinstance(module, nn.Linear):
            return module
    for _, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            return module  # tied: the embedding is the head
    return None


# Bench-sized members of two families (~200M parameters, float32), for bench/serving_bench.py
# and bench/multiturn_bench.py: the shapes of the small real models, scaled down to hidden
# 1024 and 12 layers so they run at the speed of the serving bench's qwen3 (bench-200m).
BENCH_VOCAB = 32000

# Qwen3.5-0.8B (hidden 1024, 24 layers, 8 x 256 attention heads over 2 KV heads, 16 + 16 linear
# heads of 128, every 4th layer full attention, a quarter of each head rotated) at half the
# depth and half the head sizes: 12 layers (3 full attention, 9 Gated DeltaNet), 8 query heads
# of 128 over 2 KV heads, 8 linear key and value heads of 128.  ~218M parameters.
BENCH_QWEN3_5: dict = {
    "hidden_size": 1024, "intermediate_size": 2560, "num_hidden_layers": 12,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
    "linear_num_value_heads": 8, "linear_num_key_heads": 8, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
    "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "rope_parameters": {"type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [6, 5, 5]},
}

# Gemma 3 1B (hidden 1152, 26 layers, 4 query heads of 256 over 1 KV head, a 512-token window
# on five layers of every six) at hidden 1024 and 12 layers: layers 6 and 12 attend globally,
# the other 10 over the last 512 tokens.  ~210M parameters.
BENCH_GEMMA3: dict = {
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "sliding_window_pattern": 6, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
}

BENCH_FAMILIES: dict[str, tuple[str, dict]] = {
    "bench-qwen3_5": ("qwen3_5", BENCH_QWEN3_5),
    "bench-gemma3": ("gemma3_text", BENCH_GEMMA3),
}


def build_bench_family(path: str | Path, name: str, seed: int = 0, **overrides) -> Path:
    """Write the bench model `name` (a key of BENCH_FAMILIES) into `path`; returns the path.

    Like bench-200m (omlx.testing.tiny_models.BENCH_200M): the 32000-token fixture tokenizer,
    float32, an untied output head left at its random scale (logit_scale 1.0), so generation
    looks like a real model's rather than the sharp greedy choices of the test models.  The
    end-of-turn and think rows of the head are zeroed, so greedy replies run to max_tokens and
    both servers generate the same number of tokens.  `overrides` change the config (e.g.
    sliding_window_pattern=1: the same shape with full attention on every layer)."""
    family, preset = BENCH_FAMILIES[name]
    config = {**FAMILIES[family], **preset, **overrides}
    spec = TinyModelSpec(model_type=config["model_type"], vocab_size=BENCH_VOCAB, seed=seed,
                         max_position_embeddings=config["max_position_embeddings"])
    tokenizer = build_tokenizer(BENCH_VOCAB)
    config["vocab_size"] = max(BENCH_VOCAB, tokenizer.get_vocab_size())
    config["eos_token_id"] = tokenizer.token_to_id("<|im_end|>")
    config.setdefault("torch_dtype", "float32")
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    head = next(m for n, m in model.named_modules() if n.split(".")[-1] == "lm_head")
    weight = head.weight
    for token in ("<|im_end|>", "<think>", "</think>"):
        weight[tokenizer.token_to_id(token)] = 0.0
    head.weight = weight
    return _write_folder(Path(path), spec, config, model, tokenizer)
