"""A small but real Whisper in mlx-whisper's layout, built on the spot: mlx-whisper's own
`Whisper` model with random weights saved as `weights.safetensors` and its dimensions as
`config.json` (what mlx-community's Whisper conversions hold).  The tokenizer is the one
mlx-whisper ships (the multilingual tiktoken vocabulary), so the folder needs nothing else;
`mlx_whisper.transcribe(audio, path_or_hf_repo=folder)` runs it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten


TEXT_TOKENS = 50257  # the vocabulary's text tokens; end-of-text, languages, tasks, timestamps follow


@dataclass
class TinyWhisperSpec:
    n_mels: int = 80
    n_audio_ctx: int = 1500  # Whisper's 30 s window (3000 mel frames, halved by its convolution)
    n_audio_state: int = 64
    n_audio_head: int = 2
    n_audio_layer: int = 1
    n_vocab: int = 51865  # the multilingual vocabulary
    # Whisper decodes up to half its text context per 30 s window: 32 tokens here keep a
    # random model's windows short.
    n_text_ctx: int = 64
    n_text_state: int = 64
    n_text_head: int = 2
    n_text_layer: int = 1
    logit_scale: float = 4.0
    seed: int = 0


def build_whisper(path: str | Path, spec: TinyWhisperSpec | None = None) -> Path:
    from mlx_whisper.whisper import ModelDimensions, Whisper

    spec = spec or TinyWhisperSpec()
    dims = {k: v for k, v in asdict(spec).items() if k not in ("seed", "logit_scale")}
    mx.random.seed(spec.seed)
    model = Whisper(ModelDimensions(**dims), mx.float32)
    # Random weights give nearly flat logits, where Whisper's timestamp rules win every step;
    # a spread tied embedding makes greedy text tokens (the output is then varied text).
    # Special tokens (end of text, timestamps) are kept weaker, so that windows hold text.
    embedding = model.decoder.token_embedding
    scale = mx.where(mx.arange(spec.n_vocab) < TEXT_TOKENS, spec.logit_scale, spec.logit_scale / 8)
    embedding.weight = embedding.weight * scale[:, None]
    mx.eval(model.parameters())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # alignment_heads (which cross-attention heads time words) stays integer.
    weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "weights.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=2))
    return path
