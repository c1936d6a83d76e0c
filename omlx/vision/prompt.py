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

    marker = getattr(processor, "image_token", None)
    if isinstance(marker, str) and marker and prompt_text.count(marker) != len(images):
        raise ImagePromptError(
            f"the rendered prompt places {prompt_text.count(marker)} image(s) for {len(images)} sent: the chat "
            f"template must place each image once, and message text may not contain {marker!r}")

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
    runs = image_runs(ids, image_token_id)
    check_runs(runs, images, arrays, processor)
    suffix = repr(shape).encode() if shape else b""
    spans = [ImageSpan(a, b, image.digest + suffix) for (a, b), image in zip(runs, images)]
    return ids, MultimodalInput(spans=spans, arrays=arrays)


def image_runs(ids: list[int], image_token_id: int | None) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens in the prompt."""
    runs = []
    start = None
    for position, token in enumerate(ids + [None]):
        if token == image_token_id and start is None:
            start = position
        elif token != image_token_id and start is not None:
            runs.append((start, position))
            start = None
    return runs


def check_runs(runs, images, arrays: dict, processor) -> None:
    """One run of image tokens per image, each as long as that image's features: what the
    vision side will merge.  A prompt whose text spells the model's image token itself would
    otherwise ask the engine to place features that do not exist."""
    if len(runs) != len(images):
        raise ImagePromptError(
            f"the prompt has {len(runs)} runs of image tokens for {len(images)} image(s): the chat template "
            "must place each image once, and message text may not contain the model's image token")
    lengths = [b - a for a, b in runs]
    grid = arrays.get("image_grid_thw")
    if grid is not None:
        merge = getattr(getattr(processor, "image_processor", None), "merge_size", 2) or 1
        expected = [int(np.prod(g)) // merge**2 for g in np.asarray(grid).reshape(-1, 3)]
    else:
        expected = [lengths[0]] * len(images)  # fixed-size families: every image alike
    if lengths != expected:
        raise ImagePromptError(
            f"the image tokens in the prompt ({lengths}) do not match the images' features ({expected}): "
            "message text may not contain the model's image token")
