"""Build small but real vision-language model folders on the spot.

Like `tiny_models`, for the multimodal families omlx serves: a real mlx-vlm architecture
(Qwen2-VL with its multimodal RoPE, or LLaVA with a plain CLIP tower and projector) with
random weights saved as safetensors, the byte-level BPE tokenizer of `tiny_models` plus the
family's image tokens, an image-processor config, and a ChatML chat template that places
image parts.  `mlx_vlm.load(path)` loads the result like a checkpoint from the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .model_folder import chatml_template, write_chatml_tokenizer, write_weights
from .tiny_models import CONTROL_TOKENS, SPECIAL_TOKENS, build_tokenizer

# Where an image part goes in the prompt, per family; the processor expands it to one
# token per image feature.
IMAGE_MARKUP = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
}
FAMILY_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>"],
}


def chat_template(family: str) -> str:
    """ChatML with list content: text parts verbatim, image parts as the family's markup."""
    return chatml_template(IMAGE_MARKUP[family])


@dataclass
class TinyVLMSpec:
    family: str = "qwen2_vl"  # or "llava"
    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    # LLaVA: the square image size the CLIP tower takes (patch 14 -> (size/14)^2 tokens).
    image_size: int = 56
    # Qwen2-VL: the pixel range its processor resizes images into.
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    max_position_embeddings: int = 4096
    logit_scale: float = 8.0
    seed: int = 0
    # Override of config.json "architectures" (e.g. an OCR-named one: the server then
    # detects an OCR model and gives it OCR defaults).
    architecture: str | None = None
    # Benchmarks: greedy decoding never picks a token whose text is not printable ASCII (nor
    # an end-of-turn token), so every server streams visible text for the whole max_tokens
    # and time to first token is measured alike (a zero output row loses to the largest of
    # hundreds of random logits).
    printable_only: bool = False


def build_vlm(path: str | Path, spec: TinyVLMSpec | None = None) -> Path:
    spec = spec or TinyVLMSpec()
    if spec.family not in IMAGE_MARKUP:
        raise ValueError(f"unsupported tiny VLM family {spec.family!r}")
    tokenizer = build_tokenizer(spec.vocab_size)
    from tokenizers import AddedToken

    family_tokens = FAMILY_TOKENS[spec.family]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in family_tokens])
    vocab = max(spec.vocab_size, tokenizer.get_vocab_size())
    config = _config(spec, tokenizer, vocab)
    if spec.architecture:
        config["architectures"] = [spec.architecture]
    model = _random_model(spec, config)
    if spec.printable_only:
        _printable_only(model, tokenizer)
    path = Path(path)
    write_weights(path, model, config)
    _write_tokenizer(path, spec, tokenizer, family_tokens)
    (path / "preprocessor_config.json").write_text(json.dumps(_preprocessor(spec), indent=2))
    if spec.family == "llava":
        # The processor expands each <image> to one token per CLIP patch (the CLS feature
        # is dropped by the "default" feature selection).
        (path / "processor_config.json").write_text(json.dumps({
            "patch_size": 14, "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1, "image_token": "<image>",
        }))
    return path


def _config(spec: TinyVLMSpec, tokenizer, vocab: int) -> dict:
    eos = tokenizer.token_to_id("<|im_end|>")
    text = {
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": False,
    }
    if spec.family == "qwen2_vl":
        head_dim = spec.hidden_size // spec.num_attention_heads
        # Sections of the rotary half-dim for time, height and width positions.
        quarter = head_dim // 8
        sections = [head_dim // 2 - 2 * quarter, quarter, quarter]
        return {
            "model_type": "qwen2_vl",
            "architectures": ["Qwen2VLForConditionalGeneration"],
            **text,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": sections},
            "image_token_id": tokenizer.token_to_id("<|image_pad|>"),
            "video_token_id": tokenizer.token_to_id("<|video_pad|>"),
            "vision_start_token_id": tokenizer.token_to_id("<|vision_start|>"),
            "vision_end_token_id": tokenizer.token_to_id("<|vision_end|>"),
            "eos_token_id": eos,
            "torch_dtype": "float32",
            "vision_config": {
                "model_type": "qwen2_vl",
                "depth": spec.vision_layers,
                "embed_dim": spec.vision_width,
                "hidden_size": spec.hidden_size,
                "num_heads": spec.vision_heads,
                "mlp_ratio": 2,
                "in_channels": 3,
                "patch_size": 14,
                "spatial_patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
        }
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {"model_type": "llama", **text, "rope_theta": 10000.0},
        "vision_config": {
            "model_type": "clip_vision_model",
            "num_hidden_layers": spec.vision_layers,
            "hidden_size": spec.vision_width,
            "intermediate_size": spec.vision_width * 2,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": 14,
            "projection_dim": spec.vision_width,
            "num_channels": 3,
            "layer_norm_eps": 1e-5,
        },
        "image_token_index": tokenizer.token_to_id("<image>"),
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "projector_hidden_act": "gelu",
        "vocab_size": vocab,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def _random_model(spec: TinyVLMSpec, config: dict):
    from mlx_vlm.utils import get_model_and_args

    module, _ = get_model_and_args(config)
    model_config = module.ModelConfig.from_dict(dict(config))
    model_config.vision_config = module.VisionConfig.from_dict(config["vision_config"])
    text = config.get("text_config") or config
    model_config.text_config = module.TextConfig.from_dict(dict(text))
    mx.random.seed(spec.seed)
    model = module.Model(model_config)
    # Random weights give nearly flat logits: a scaled head keeps greedy choices apart.
    head = model.language_model.lm_head
    head.weight = head.weight * spec.logit_scale
    mx.eval(model.parameters())
    return model


def _printable_only(model, tokenizer) -> None:
    head = model.language_model.lm_head
    weight = head.weight
    weight[tokenizer.get_vocab_size():] = 0.0  # padding rows past the vocabulary: no text at all
    for token in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token], skip_special_tokens=False)
        if not text or not text.isascii() or not text.isprintable() or tokenizer.id_to_token(token) in SPECIAL_TOKENS:
            weight[token] = 0.0
    head.weight = weight
    mx.eval(head.weight)


def _write_tokenizer(path: Path, spec: TinyVLMSpec, tokenizer, family_tokens: list[str]) -> None:
    write_chatml_tokenizer(path, tokenizer, max_length=spec.max_position_embeddings,
                           chat_template=chat_template(spec.family), markup=SPECIAL_TOKENS + family_tokens,
                           special=set(CONTROL_TOKENS) | set(family_tokens),
                           extra={"image_token": "<image>"} if spec.family == "llava" else None)


def _preprocessor(spec: TinyVLMSpec) -> dict:
    if spec.family == "qwen2_vl":
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "min_pixels": spec.min_pixels,
            "max_pixels": spec.max_pixels,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "size": {"shortest_edge": spec.image_size},
        "do_center_crop": True,
        "do_resize": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
    }
