"""Tiny random mlx-vlm models of the vision-language families whose language model is a hybrid
or sliding-window model (Qwen3.5: Gated DeltaNet; Gemma 3: sliding windows), built in memory.

They check the engine runs those language models as mlx-vlm builds them (mlx-vlm's own cache
classes and layer code), through the same adapter and pass inputs the server uses.
"""

from __future__ import annotations

import importlib

import mlx.core as mx

TEXT = {
    "qwen3_5": dict(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=512, num_key_value_heads=2,
        max_position_embeddings=4096, head_dim=16, full_attention_interval=2,
        rope_parameters={"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5},
    ),
    "gemma3": dict(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, head_dim=16, num_key_value_heads=2, query_pre_attn_scalar=16, sliding_window=8,
        sliding_window_pattern=2, vocab_size=512, mm_tokens_per_image=4,
    ),
}
VISION = {
    "qwen3_5": dict(model_type="qwen3_5", depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    "gemma3": dict(model_type="siglip_vision_model", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                   num_attention_heads=2, patch_size=14, image_size=56),
}


def build_vlm_language(family: str, seed: int = 0, logit_scale: float = 8.0):
    """(the mlx-vlm model, the engine's LanguageAdapter over it, its PassInputs)."""
    from omlx.vision.encoder import LanguageAdapter, PassInputs

    module = importlib.import_module(f"mlx_vlm.models.{family}")
    configs = importlib.import_module(f"mlx_vlm.models.{family}.config")
    config = module.ModelConfig.from_dict({
        "model_type": family, "vocab_size": 512,
        "text_config": configs.TextConfig.from_dict(TEXT[family]),
        "vision_config": configs.VisionConfig.from_dict(VISION[family]),
    })
    mx.random.seed(seed)
    vlm = module.Model(config)
    language = vlm.language_model
    head = getattr(language, "lm_head", None)
    if head is not None:
        head.weight = head.weight * logit_scale
    else:  # tied: scale the embedding (Gemma scales its inputs by sqrt(hidden) itself)
        language.model.embed_tokens.weight = language.model.embed_tokens.weight * (logit_scale / 2)
    mx.eval(vlm.parameters())
    return vlm, LanguageAdapter(vlm), PassInputs(vlm)
