"""A conversation with images into what the engine runs: prompt token ids (one placeholder per
image feature, as the model's processor expands them), the processor's pixel arrays, and where
each image's tokens sit (with its content hash, for the prefix cache)."""

from __future__ import annotations

import numpy as np

from omlx.scheduler.multimodal import ImageSpan, MultimodalInput

from .images import DecodedImage


class ImagePromptError(ValueError):
    """The model's processor refused these images (the client's input, a 400)."""


def prepare(processor, image_token_id: int | None, prompt_text: str, images: list[DecodedImage],
            resize_shape: tuple[int, ...] | None = None) -> tuple[list[int], MultimodalInput | None]:
    """Token ids of `prompt_text` with its images, and their MultimodalInput (None without
    images).  Runs the processor: CPU work, call it off the event loop."""
    if not images:
        tokenizer = getattr(processor, "tokenizer", processor)
        return list(tokenizer.encode(prompt_text, add_special_tokens=False)), None
    from mlx_vlm.utils import process_image

    shape = None
    if resize_shape is not None:
        shape = (resize_shape[0], resize_shape[0]) if len(resize_shape) == 1 else tuple(resize_shape)
    pictures = [process_image(image.image, shape, processor.image_processor) for image in images]
    try:
        out = processor(text=[prompt_text], images=pictures)
    except Exception as exc:
        raise ImagePromptError(f"the model's processor could not prepare these images: {exc}") from None
    ids = np.asarray(out["input_ids"]).reshape(-1).tolist()
    arrays = {
        key: np.asarray(value) for key, value in out.items()
        if key not in ("input_ids", "attention_mask") and value is not None
    }
    if "pixel_values" not in arrays:
        raise ImagePromptError("the model's processor produced no pixel values for these images")
    spans = image_spans(ids, image_token_id, images, shape)
    return ids, MultimodalInput(spans=spans, arrays=arrays)


def image_spans(ids: list[int], image_token_id: int | None, images: list[DecodedImage],
                shape) -> list[ImageSpan]:
    """The runs of image tokens in the prompt, image by image.  When the runs do not match the
    images one to one (a family that packs several images into one run), every run is keyed
    on all the images: never shared wrongly, only less often."""
    suffix = repr(shape).encode() if shape else b""
    runs = []
    start = None
    for position, token in enumerate(ids + [None]):
        if token == image_token_id and start is None:
            start = position
        elif token != image_token_id and start is not None:
            runs.append((start, position))
            start = None
    if not runs:
        raise ImagePromptError("the prompt has no image tokens for its images (does the chat template place images?)")
    if len(runs) == len(images):
        return [ImageSpan(a, b, image.digest + suffix) for (a, b), image in zip(runs, images)]
    combined = b"".join(image.digest for image in images) + suffix
    return [ImageSpan(a, b, combined) for a, b in runs]
