"""A small but real Gemma 4 with an audio tower, built on the spot.

mlx-vlm's own `gemma4.Model` (language model, vision tower, USM conformer audio tower and the
audio embedder) with random weights saved as safetensors, the byte-level BPE tokenizer of
`tiny_models` plus Gemma 4's image / audio markup tokens (named in `tokenizer_config.json` so
the processor finds them), a processor config (Gemma 4's numpy mel feature extractor: 16 kHz,
40 ms per audio token) and a ChatML chat template that places image and audio parts.
`mlx_vlm.load(path)` loads the folder like a checkpoint from the hub, and
`mlx_vlm.generate(..., audio=[...])` runs it.

By default the language model is kept to what the paged engine runs (one head size for full
and sliding layers, no KV-sharing layers); `per_layer_inputs=True` adds Gemma 4's per-layer
token embeddings, `global_head_dim` / `kv_shared_layers` the rest of what the E2B / E4B
checkpoints (the ones with audio towers) have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .model_folder import chatml_template, write_chatml_tokenizer, write_weights
from .tiny_models import CONTROL_TOKENS, SPECIAL_TOKENS, build_tokenizer

# Gemma 4's multimodal markup: a part's placeholder, and the begin / end tokens the processor
# wraps its expanded soft tokens in.
MEDIA_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "video_token": "<|video|>",
}
AUDIO_MS_PER_TOKEN = 40
SAMPLE_RATE = 16_000


def chat_template() -> str:
    """ChatML with list content: text verbatim, image and audio parts as Gemma 4's placeholders."""
    return chatml_template(MEDIA_TOKENS["image_token"], MEDIA_TOKENS["audio_token"])


@dataclass
class TinyAudioSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    # Real Gemma 4 E2B / E4B: full-attention layers with wider heads and layers that read an
    # earlier layer's KV (the paged engine refuses both; the fallback engine serves them).
    global_head_dim: int | None = None
    kv_shared_layers: int = 0
    vocab_size: int = 512
    sliding_window: int = 64
    audio_hidden: int = 32
    audio_layers: int = 1
    audio_heads: int = 2
    per_layer_inputs: bool = False
    audio_scale: float = 16.0
    with_audio: bool = True  # False: the same family with no audio tower (a vision-only Gemma 4)
    logit_scale: float = 2.0  # Gemma 4 soft-caps its logits at 30: a larger spread saturates
    seed: int = 0
    max_position_embeddings: int = 4096


def build_audio_model(path: str | Path, spec: TinyAudioSpec | None = None) -> Path:
    spec = spec or TinyAudioSpec()
    from tokenizers import AddedToken

    tokenizer = build_tokenizer(spec.vocab_size)
    media = list(MEDIA_TOKENS.values())
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in media])
    vocab = max(spec.vocab_size, tokenizer.get_vocab_size())
    config = _config(spec, tokenizer, vocab)
    model = _random_model(spec, config)
    path = Path(path)
    write_weights(path, model, config)
    _write_tokenizer(path, spec, tokenizer, media)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor",
        "audio_seq_length": 750,
        "audio_ms_per_token": AUDIO_MS_PER_TOKEN,
        "image_processor": {"patch_size": 16, "max_soft_tokens": 16, "pooling_kernel_size": 2},
        "feature_extractor": {"feature_size": 128, "sampling_rate": SAMPLE_RATE},
    }, indent=2))
    return path


def _config(spec: TinyAudioSpec, tokenizer, vocab: int) -> dict:
    ids = {name: tokenizer.token_to_id(token) for name, token in MEDIA_TOKENS.items()}
    eos = tokenizer.token_to_id("<|im_end|>")
    text = {
        "model_type": "gemma4_text",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "global_head_dim": spec.global_head_dim or spec.head_dim,
        "num_kv_shared_layers": spec.kv_shared_layers,
        "vocab_size": vocab,
        "vocab_size_per_layer_input": vocab,
        "hidden_size_per_layer_input": 8 if spec.per_layer_inputs else 0,
        "sliding_window": spec.sliding_window,
        "sliding_window_pattern": 2,
        "max_position_embeddings": spec.max_position_embeddings,
        "use_double_wide_mlp": False,
        "tie_word_embeddings": True,
    }
    vision = {
        "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 16,
        "patch_size": 16, "pooling_kernel_size": 2, "default_output_length": 16,
        "position_embedding_size": 256,
    }
    audio = {
        "hidden_size": spec.audio_hidden, "num_hidden_layers": spec.audio_layers,
        "num_attention_heads": spec.audio_heads, "subsampling_conv_channels": [8, 4],
        "conv_kernel_size": 5, "attention_chunk_size": 12, "attention_context_left": 13,
        "attention_context_right": 0, "output_proj_dims": spec.audio_hidden,
    }
    config = {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "image_token_id": ids["image_token"],
        "audio_token_id": ids["audio_token"],
        "video_token_id": ids["video_token"],
        "boi_token_id": ids["boi_token"],
        "eoi_token_id": ids["eoi_token"],
        "boa_token_id": ids["boa_token"],
        "eoa_token_id": ids["eoa_token"],
        "vision_soft_tokens_per_image": 16,
        "audio_ms_per_token": AUDIO_MS_PER_TOKEN,
        "eos_token_id": [eos],
        "torch_dtype": "float32",
    }
    if spec.with_audio:
        config["audio_config"] = audio
    return config


def _random_model(spec: TinyAudioSpec, config: dict):
    from mlx_vlm.models import gemma4

    model_config = gemma4.ModelConfig.from_dict(dict(config))
    model_config.text_config = gemma4.TextConfig.from_dict(config["text_config"])
    model_config.vision_config = gemma4.VisionConfig.from_dict(config["vision_config"])
    if "audio_config" in config:
        model_config.audio_config = gemma4.AudioConfig.from_dict(config["audio_config"])
    mx.random.seed(spec.seed)
    model = gemma4.Model(model_config)
    # Random weights give nearly flat logits; the tied embedding is spread so greedy choices
    # are well apart (Gemma scales its inputs by sqrt(hidden) itself).
    embed = model.language_model.model.embed_tokens
    embed.weight = embed.weight * (spec.logit_scale / 2)
    # The clip's soft tokens as loud as the text rows, so that what a clip holds shows in
    # the answer (a sweep, noise and silence answer differently).
    if model.embed_audio is not None:
        projection = model.embed_audio.embedding_projection
        projection.weight = projection.weight * spec.audio_scale
    mx.eval(model.parameters())
    return model


def _write_tokenizer(path: Path, spec: TinyAudioSpec, tokenizer, media: list[str]) -> None:
    # transformers gives the tokenizer the `extra_special_tokens` as attributes (`audio_token`,
    # `audio_token_id`...), which Gemma 4's processor reads its markup from.
    write_chatml_tokenizer(path, tokenizer, max_length=spec.max_position_embeddings, chat_template=chat_template(),
                           markup=SPECIAL_TOKENS + media, special=set(CONTROL_TOKENS) | set(media),
                           extra={"extra_special_tokens": dict(MEDIA_TOKENS)})
