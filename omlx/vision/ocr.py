"""OCR models (vision models trained to transcribe) and what a request to one gets by default.

oMLX's OCR families are DeepSeek-OCR, DOTS-OCR and GLM-OCR: a request that gives no
instruction gets the family's own transcription prompt, and one that gives no stop sequences
gets the chat-turn markers the family's decoder tends to run past.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OCRDefaults:
    prompt: str
    stop: tuple[str, ...]
    max_tokens: int = 4096


# By mlx-vlm model type (config.json "model_type").
OCR_FAMILIES = {
    "deepseekocr": OCRDefaults("<|grounding|>Convert the document to markdown.",
                               ("<｜end▁of▁sentence｜>", "<|User|>"), 8192),
    "deepseekocr_2": OCRDefaults("<|grounding|>Convert the document to markdown.",
                                 ("<｜end▁of▁sentence｜>", "<|User|>"), 8192),
    "dots_ocr": OCRDefaults("Extract the text content from this image.", ("<|endofassistant|>", "<|user|>")),
    "glm_ocr": OCRDefaults("Text Recognition:", ("<|user|>", "<|endoftext|>")),
}
# An OCR model of another family: a plain transcription instruction, no extra stops.
GENERIC = OCRDefaults("Convert the document to markdown.", ())


def ocr_defaults(config: dict) -> OCRDefaults:
    """The defaults of an OCR model, by its config's model_type (detected from the config)."""
    model_type = str(config.get("model_type") or "").lower()
    return OCR_FAMILIES.get(model_type, GENERIC)


def with_default_prompt(messages: list[dict], defaults: OCRDefaults) -> list[dict]:
    """A user turn that carries images but no text gets the family's instruction."""
    out = []
    for message in messages:
        content = message.get("content")
        if (message.get("role") == "user" and isinstance(content, list)
                and any(p.get("type") == "image" for p in content)
                and not any(p.get("type") == "text" and p.get("text", "").strip() for p in content)):
            message = {**message, "content": [*content, {"type": "text", "text": defaults.prompt}]}
        out.append(message)
    return out
