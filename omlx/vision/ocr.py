"""OCR models (vision models trained to transcribe) and what a request to one gets by default.

oMLX's OCR families are DeepSeek-OCR, DOTS-OCR and GLM-OCR: a request that gives no
instruction gets the family's own transcription prompt, and one that gives no stop sequences
gets the chat-turn markers the family's decoder tends to run past.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omlx.settings_typed import ModelSettings, RequestDefaults, request_defaults
from omlx.settings_values import SAMPLING_KEYS

GREEDY = {"temperature": 0.0}  # transcription wants the most likely text


@dataclass(frozen=True)
class OCRDefaults:
    prompt: str
    stop: tuple[str, ...]
    max_tokens: int = 4096
    sampling: dict = field(default_factory=lambda: dict(GREEDY))

    def request_layer(self) -> RequestDefaults:
        """These defaults as a layer of the settings' precedence: under the model's own
        settings, over the global ones (oMLX's order)."""
        return RequestDefaults(sampling=dict(self.sampling), stop=self.stop or None, max_tokens=self.max_tokens)


# By mlx-vlm model type (config.json "model_type").
OCR_FAMILIES = {
    "deepseekocr": OCRDefaults("<|grounding|>Convert the document to markdown.",
                               ("<｜end▁of▁sentence｜>", "<|User|>"), 8192),
    "deepseekocr_2": OCRDefaults("<|grounding|>Convert the document to markdown.",
                                 ("<｜end▁of▁sentence｜>", "<|User|>"), 8192),
    "dots_ocr": OCRDefaults("Extract the text content from this image.", ("<|endofassistant|>", "<|user|>")),
    "glm_ocr": OCRDefaults("Text Recognition:", ("<|user|>", "<|endoftext|>"),
                           sampling={**GREEDY, "repetition_penalty": 1.1}),
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


def with_ocr_defaults(merged: dict, model_settings: dict, defaults: OCRDefaults) -> dict:
    """`merged` (request defaults in the request body's form, model over global) with the OCR
    family's defaults placed under the model's own settings (`model_settings`, one model's
    entry).  The serving path passes the family's layer to SettingsStore.defaults instead;
    this is the same precedence for callers holding the dict forms."""
    below = RequestDefaults.from_sampling({k: v for k, v in merged.items() if k in SAMPLING_KEYS},
                                          max_tokens=merged.get("max_tokens"),
                                          template_kwargs=merged.get("chat_template_kwargs") or {})
    model = ModelSettings.from_dict(model_settings).request_layer()
    layered = request_defaults(model, defaults.request_layer(), below).as_fields()
    return {**merged, **layered}
