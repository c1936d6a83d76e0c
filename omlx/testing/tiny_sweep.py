"""Tiny random-weight models of (nearly) every mlx-lm family whose caches are not plain
`KVCache`: the coverage sweep of `tests/test_family_sweep.py`.

Each entry of `SWEEP_FAMILIES` is a config for mlx-lm's own `Model(ModelArgs.from_dict(...))`
(hidden 64, 2-4 layers, windows of 8-16 tokens, MoE with 4 experts), chosen so that every
layer kind the family has appears at least once.  `build_sweep_model` writes it the way
`omlx.testing.tiny_families.build_family_model` writes its families (same tokenizer, ChatML
template, output head spread so greedy choices are well separated), loadable with
`mlx_lm.load`.  `ALL_FAMILIES` adds the families of `tiny_families.FAMILIES` (qwen3_5, lfm2,
nemotron_h, gemma3_text, olmo3, gpt_oss, llama4_text, llama4, falcon_h1).

mlx-lm 0.32 models with a `make_cache` that are not here, and why:

    gear                 mlx_lm.load fails on it: transformers' AutoConfig (read by the
                         tokenizer loader) rejects its layer type "conv_mixer"
    deepseek_v41, kimi_k3, muse_spark, minimax_m3_vl, longcat_flash_ngram
                         large multi-part models (1000+ lines: multi-stream layers, sparse
                         indexers, n-gram embeddings, vision towers); not built tiny yet
    lfm2-vl              a vision-language wrapper of lfm2 (lfm2 is covered)
"""

from __future__ import annotations

from pathlib import Path

from .tiny_families import FAMILIES, build_from_config

SWA2 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

SWEEP_FAMILIES: dict[str, dict] = {
    # -- recurrent state + full attention ------------------------------------------------------
    "qwen3_next": {
        "model_type": "qwen3_next",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 64, "mlp_only_layers": [], "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
        "max_position_embeddings": 4096, "full_attention_interval": 2, "norm_topk_prob": True,
    },
    "qwen3_5_moe": {
        "model_type": "qwen3_5_moe",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 64,
        "moe_intermediate_size": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_parameters": {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1]},
    },
    "granitemoehybrid": {  # Granite 4: Mamba-2 + attention, MoE with a shared MLP
        "model_type": "granitemoehybrid",
        "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4, "max_position_embeddings": 4096,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": False,
        "embedding_multiplier": 1.0, "attention_multiplier": 0.25, "logits_scaling": 1.0,
        "residual_multiplier": 1.0, "layer_types": ["mamba", "attention", "mamba", "attention"],
        "rms_norm_eps": 1e-5, "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 64,
        "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_proj_bias": False, "mamba_d_state": 16,
        "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": True, "mamba_expand": 1,
        "tie_word_embeddings": False,
    },
    "jamba": {
        "model_type": "jamba",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1,
        "expert_layer_period": 2, "mamba_d_conv": 4, "mamba_d_state": 8, "mamba_expand": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "kimi_linear": {  # Kimi Delta Attention + MLA
        "model_type": "kimi_linear",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "linear_attn_config": {"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16,
                               "short_conv_kernel_size": 4},
        "model_max_length": 4096, "num_experts": 4, "moe_intermediate_size": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "num_experts_per_token": 2,
        "num_shared_experts": 1, "first_k_dense_replace": 1,
    },
    "lfm2_moe": {
        "model_type": "lfm2_moe",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "use_expert_bias": True,
        "num_dense_layers": 1, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
        "full_attn_idxs": [1, 3], "rope_theta": 10000.0,
    },
    "olmo_hybrid": {
        "model_type": "olmo_hybrid",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "linear_allow_neg_eigval": True,
        "tie_word_embeddings": False, "attention_bias": False, "head_dim": 16,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    },
    "plamo2": {
        "model_type": "plamo2",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size_per_head": 16, "max_position_embeddings": 4096, "attention_window_size": 4096,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_num_heads": 4, "mamba_step": 2,
        "mamba_chunk_size": 16, "intermediate_size": 128, "tie_word_embeddings": False,
    },
    "bailing_moe_linear": {  # Ling linear: lightning attention + full attention, MoE
        "model_type": "bailing_moe_linear",
        "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 4096, "moe_intermediate_size": 32,
        "num_experts": 4, "num_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4,
        "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "first_k_dense_replace": 1, "layer_group_size": 2, "group_norm_size": 1,
        "head_dim": 16, "topk_group": 1,
    },
    "bailing_hybrid": {  # Ling 2.5: lightning attention + MLA, MoE
        "model_type": "bailing_hybrid",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
        "num_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "layer_group_size": 2, "group_norm_size": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "routed_scaling_factor": 1.0, "head_dim": 16, "kv_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    },
    "bailing_moe_v3": {  # Kimi Delta Attention + MLA, MoE
        "model_type": "bailing_moe_v3",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "layer_group_size": 2, "head_dim": 16,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rope_theta": 10000.0, "max_position_embeddings": 4096,
    },
    # -- recurrent state only ------------------------------------------------------------------
    "mamba": {
        "model_type": "mamba",
        "hidden_size": 64, "intermediate_size": 128, "state_size": 8, "num_hidden_layers": 2,
        "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": 8,
        "tie_word_embeddings": False,
    },
    "mamba2": {
        "model_type": "mamba2",
        "num_heads": 4, "head_dim": 16, "hidden_size": 64, "intermediate_size": 64, "state_size": 16, "expand": 1,
        "num_hidden_layers": 2, "layer_norm_epsilon": 1e-5, "conv_kernel": 4, "n_groups": 1,
        "use_bias": False, "use_conv_bias": True, "tie_word_embeddings": False,
        "time_step_limit": [0.0, float("inf")], "time_step_rank": "auto", "ssm_state_size": 16,
    },
    "rwkv7": {
        "model_type": "rwkv7",
        "hidden_size": 64, "intermediate_size": 128, "norm_eps": 1e-5, "head_dim": 16, "num_hidden_layers": 2,
        "a_low_rank_dim": 8, "v_low_rank_dim": 8, "gate_low_rank_dim": 16, "decay_low_rank_dim": 8,
    },
    # -- recurrent state + sliding window ------------------------------------------------------
    "recurrent_gemma": {
        "model_type": "recurrent_gemma",
        "attention_bias": False, "conv1d_width": 4, "hidden_size": 64, "intermediate_size": 128,
        "logits_soft_cap": 30.0, "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_window_size": 8,
        "block_types": ["recurrent", "recurrent", "attention"], "lru_width": 64,
    },
    "baichuan_m1": {  # one CacheList (short conv state + KV) per layer
        "model_type": "baichuan_m1",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 10000.0, "sliding_window": 8, "sliding_window_layers": [0, 2],
        "conv_window": 2, "rms_norm_eps": 1e-6, "num_swa_attention_heads": 4, "num_swa_key_value_heads": 2,
    },
    # -- sliding windows -----------------------------------------------------------------------
    "llama_swa": {  # llama with sliding-window layers (layer_types)
        "model_type": "llama",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "sliding_window": 8, "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
    "ministral3": {
        "model_type": "ministral3",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "sliding_window": 16, "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                            "original_max_position_embeddings": 4096, "llama_4_scaling_beta": 0.1,
                            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    "cohere2": {
        "model_type": "cohere2",
        "hidden_size": 64, "head_dim": 16, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
        "logit_scale": 0.25, "sliding_window": 8, "sliding_window_pattern": 2,
    },
    "exaone4": {
        "model_type": "exaone4",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "rms_norm_eps": 1e-5, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "head_dim": 16, "tie_word_embeddings": False, "rope_scaling": None, "sliding_window": 8,
        "sliding_window_pattern": "LLLG",
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    },
    "gemma3n": {
        "model_type": "gemma3n",
        "text_config": {
            "model_type": "gemma3n_text", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
            "num_attention_heads": 4, "head_dim": 16, "rms_norm_eps": 1e-6, "num_key_value_heads": 2,
            "num_kv_shared_layers": 2, "vocab_size_per_layer_input": 512, "sliding_window": 8,
            "max_position_embeddings": 4096, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
            "final_logit_softcapping": 30.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0], "hidden_size_per_layer_input": 8,
            "altup_num_inputs": 2, "altup_coef_clip": 120.0, "altup_correct_scale": True,
            "altup_active_idx": 0, "laurel_rank": 8,
        },
    },
    "gemma4_text": {
        "model_type": "gemma4_text",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "head_dim": 16, "global_head_dim": 32, "num_key_value_heads": 2, "num_kv_shared_layers": 2,
        "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 8, "sliding_window": 8,
        "sliding_window_pattern": 2, "max_position_embeddings": 4096,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
    "gemma3": {  # the Gemma 3 VLM checkpoint's language model (text only)
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
            "sliding_window": 8, "sliding_window_pattern": 2, "max_position_embeddings": 4096,
            "rope_theta": 10000.0, "rope_local_base_freq": 10000.0,
        },
    },
    "gemma4": {  # the Gemma 4 VLM checkpoint's language model (text only)
        "model_type": "gemma4",
        "text_config": {
            "model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
            "num_attention_heads": 4, "head_dim": 16, "global_head_dim": 32, "num_key_value_heads": 2,
            "num_kv_shared_layers": 0, "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 8,
            "sliding_window": 8, "sliding_window_pattern": 2, "max_position_embeddings": 4096,
        },
    },
    "mimo_v2_flash": {
        "model_type": "mimo_v2_flash",
        "num_experts_per_tok": 2, "hybrid_layer_pattern": [0, 1, 1, 0], "moe_layer_freq": [0, 1, 1, 1],
        "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False, "sliding_window_size": 8,
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "n_shared_experts": None, "n_routed_experts": 4,
        "routed_scaling_factor": 1.0, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "max_position_embeddings": 4096,
        "layernorm_epsilon": 1e-5, "rope_theta": 10000.0, "swa_rope_theta": 10000.0,
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "head_dim": 16, "v_head_dim": 16,
        "swa_head_dim": 16, "swa_v_head_dim": 16, "partial_rotary_factor": 0.5,
    },
    "step3p5": {
        "model_type": "step3p5",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_attention_groups": 2,
        "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 4096, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "moe_num_experts": 4, "moe_top_k": 2, "moe_intermediate_size": 32, "share_expert_dim": 32,
        "moe_layers_enum": "1,2,3",
    },
    "afmoe": {
        "model_type": "afmoe",
        "layer_types": SWA2, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 4096, "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1,
        "num_dense_layers": 1, "route_scale": 1.0, "sliding_window": 8,
    },
    "exaone_moe": {
        "model_type": "exaone_moe",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
        "num_experts_per_tok": 2, "num_shared_experts": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "sliding_window": 8, "layer_types": SWA2, "is_moe_layer": [False, True, True, True],
        "rope_theta": 10000.0, "routed_scaling_factor": 1.0,
    },
    "laguna": {
        "model_type": "laguna",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "sliding_window": 8,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "layer_types": SWA2,
    },
    "mellum": {
        "model_type": "mellum",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "rms_norm_eps": 1e-6,
        "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "norm_topk_prob": True, "sliding_window": 8, "layer_types": SWA2,
        "rope_parameters": {"sliding_attention": {"rope_theta": 10000.0},
                            "full_attention": {"rope_theta": 100000.0}},
    },
    "muse_glimmer": {
        "model_type": "muse_glimmer",
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8, "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    },
    "plamo3": {
        "model_type": "plamo3",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 4096, "window_size": 8, "sliding_window_pattern": 2,
        "rope_theta": 100000, "intermediate_size": 128, "tie_word_embeddings": False,
    },
    "spark2_5": {
        "model_type": "spark2_5",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8, "max_position_embeddings": 4096,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_theta": 10000.0},
                            "full_attention": {"rope_theta": 100000.0, "partial_rotary_factor": 0.5}},
    },
    "iquestloopcoder": {  # two loops over the layers: full attention, then a window
        "model_type": "iquestloopcoder",
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "rms_norm_eps": 1e-5, "head_dim": 16, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "loop_num": 2, "loop_window_size": 8,
    },
    # -- other layouts -------------------------------------------------------------------------
    "afm7": {  # the last layers reuse the KV of an earlier layer
        "model_type": "afm7",
        "hidden_dim": 64, "num_layers": 4, "num_kv_reuse_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    },
    "nanbeige": {  # the layer stack looped twice: one KVCache per (loop, layer)
        "model_type": "nanbeige",
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "head_dim": 16, "max_position_embeddings": 4096,
        "num_loops": 2,
    },
    "nemotron-nas": {  # some layers without attention: fewer caches than layers
        "model_type": "nemotron-nas",
        "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "block_configs": [
            {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}},
            {"attention": {"no_op": True}, "ffn": {"ffn_mult": 1.0}},
            {"attention": {"replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}},
        ],
    },
    "longcat_flash": {  # MLA, two attention blocks per layer: one CacheList per layer
        "model_type": "longcat_flash",
        "attention_method": "MLA", "zero_expert_type": "identity", "hidden_size": 64, "ffn_hidden_size": 128,
        "moe_topk": 2, "expert_ffn_hidden_size": 32, "n_routed_experts": 4, "zero_expert_num": 2,
        "num_layers": 2, "max_position_embeddings": 4096, "num_attention_heads": 4, "kv_lora_rank": 32,
        "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True, "attention_bias": False,
    },
    "deepseek_v32": {  # MLA + a lightning indexer: one CacheList per layer
        "model_type": "deepseek_v32",
        "hidden_size": 64, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
        "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 4,
        "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "qk_nope_head_dim": 16, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "max_position_embeddings": 4096,
    },
}


ALL_FAMILIES: dict[str, dict] = {**FAMILIES, **SWEEP_FAMILIES}


def build_sweep_model(path: str | Path, family: str, seed: int = 0, logit_scale: float = 8.0,
                      **overrides) -> Path:
    """Write the tiny random `family` model (see ALL_FAMILIES) into `path`; returns the path."""
    return build_from_config(path, {**ALL_FAMILIES[family], **overrides}, seed=seed, logit_scale=logit_scale)
