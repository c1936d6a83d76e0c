"""Loading a vision-language (or OCR) model: mlx-vlm's model and processor, the tokenizer the
text side of the server uses, and what the API needs to know to prepare image prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .encoder import LanguageAdapter, PassInputs, _image_token_id, audio_token_id
from .ocr import OCRDefaults, ocr_defaults

log = logging.getLogger("omlx.vision")

# Families whose mlx-vlm model merges one image per prompt only.
SINGLE_IMAGE_FAMILIES = {"llava"}


@dataclass
class VisionSide:
    """A loaded VLM's image side, as the API layer uses it."""

    vlm: object  # the mlx-vlm model
    processor: object
    image_token_id: int | None
    family: str  # config model_type
    ocr: OCRDefaults | None = None
    # The token the processor expands each audio clip into; None: the model takes no audio
    # (no audio tower, or one mlx-vlm did not build).
    audio_token_id: int | None = None

    @property
    def max_images(self) -> int | None:
        return 1 if self.family in SINGLE_IMAGE_FAMILIES else None

    @property
    def takes_audio(self) -> bool:
        return self.audio_token_id is not None

    @property
    def max_clips(self) -> int | None:
        from omlx.audio.prompt import max_clips

        return max_clips(self.family)


def evaluate_constants(vlm) -> None:
    """Evaluate the arrays towers keep outside their parameters (Gemma 4's audio attention
    builds its relative-position timescales in __init__ on a helper object).  Left lazy, they
    would be computed first on the engine thread from a graph made on the loading thread,
    which MLX refuses ("There is no Stream(cpu, 0) in current thread")."""
    import mlx.core as mx
    import mlx.nn as nn

    found, seen = [], set()

    def collect(value, depth: int) -> None:
        if isinstance(value, mx.array):
            found.append(value)
            return
        if depth > 3 or id(value) in seen or not hasattr(value, "__dict__"):
            return
        seen.add(id(value))
        # A module's private attributes live in its __dict__ (helpers made with __new__, as
        # Gemma 4's relative-position embedding is, are not among named_modules()).
        for inner in vars(value).values():
            collect(inner, depth + 1)
        if isinstance(value, nn.Module):
            for inner in value.values():
                collect(inner, depth + 1)

    for _, module in vlm.named_modules():
        collect(module, 0)
    if found:
        mx.eval(found)


def load_vision_model(path: str, config: dict, model_type: str, trust_remote_code: bool = False):
    """(language adapter for the engine, its PassInputs, tokenizer wrapper, VisionSide)."""
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer
    from mlx_vlm import load

    vlm, processor = load(path, trust_remote_code=trust_remote_code)
    evaluate_constants(vlm)
    if not hasattr(vlm, "vision_tower") or not hasattr(vlm, "language_model"):
        return None, None, None, VisionSide(vlm, processor, None, str(config.get("model_type") or ""))
    eos = config.get("eos_token_id")
    if eos is None:
        eos = (config.get("text_config") or {}).get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    # mlx-lm's wrapper of the same tokenizer files: its streaming detokenizer and tool
    # parser serve the text side exactly as for an LLM.
    tokenizer = load_tokenizer(Path(path), {"trust_remote_code": True} if trust_remote_code else None,
                               eos_token_ids=eos_ids or None)
    side = VisionSide(vlm, processor, _image_token_id(vlm.config), str(config.get("model_type") or ""),
                      ocr_defaults(config) if model_type == "ocr" else None, audio_token_id(vlm, processor))
    return LanguageAdapter(vlm), PassInputs(vlm), tokenizer, side
