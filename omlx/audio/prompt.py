"""A conversation with audio clips (and maybe images) into what the engine runs: prompt token
ids with one audio token per audio feature (the model's processor expands each placeholder by
the clip's duration), the processor's feature arrays, and where each clip's and image's
tokens sit with its content hash (the prefix cache keys blocks on them).

Several clips: mlx-vlm's Gemma 4 / Gemma 3n models encode a request's clips as one padded
batch and scatter the flattened features over the audio tokens, so a second clip of another
length would take the padding of the first.  The engine encodes Gemma 4's clips one by one
(omlx.audio.clip_features); families it does not (`max_clips`) take one clip per request,
and a request with more gets a 400 rather than a wrong answer.
"""

from __future__ import annotations

import numpy as np

from omlx.scheduler.multimodal import ImageSpan, MultimodalInput
from omlx.vision.prompt import ImagePromptError, check_runs, image_runs

from .clips import SAMPLE_RATE, DecodedAudio

# Families whose mlx-vlm model merges the features of one clip per prompt correctly, and
# which the engine serves one clip a prompt (Gemma 4's clips go through the tower one by one:
# omlx.audio.clip_features).
SINGLE_CLIP_FAMILIES = {"gemma3n"}


class AudioPromptError(ImagePromptError):
    """The model's processor refused these clips (the client's input, a 400)."""


def max_clips(family: str) -> int | None:
    return 1 if family in SINGLE_CLIP_FAMILIES else None


def prepare(processor, image_token_id: int | None, audio_token_id: int, prompt_text: str, images: list,
            clips: list[DecodedAudio], resize_shape: tuple[int, ...] | None = None
            ) -> tuple[list[int], MultimodalInput]:
    """Token ids of `prompt_text` with its clips and images, and their MultimodalInput.  Runs
    the processor (mel features, image patches): CPU work, call it off the event loop."""
    marker = getattr(processor, "audio_token", None)
    if isinstance(marker, str) and marker and prompt_text.count(marker) != len(clips):
        raise AudioPromptError(
            f"the rendered prompt places {prompt_text.count(marker)} audio clip(s) for {len(clips)} sent: the chat "
            f"template must place each clip once, and message text may not contain {marker!r}")
    shortest = getattr(getattr(processor, "feature_extractor", None), "frame_length", 0) or 0
    for i, clip in enumerate(clips):
        if len(clip.samples) < shortest:
            raise AudioPromptError(f"audio clip {i} lasts {clip.seconds * 1000:.1f} ms, shorter than one "
                                   f"{shortest / SAMPLE_RATE * 1000:.0f} ms frame of the model's features")
    kwargs = {"audio": [clip.samples for clip in clips]}
    shape = None
    if images:
        from mlx_vlm.utils import process_image

        if resize_shape is not None:
            shape = (resize_shape[0], resize_shape[0]) if len(resize_shape) == 1 else tuple(resize_shape)
        kwargs["images"] = [process_image(image.image, shape, processor.image_processor) for image in images]
    try:
        out = processor(text=[prompt_text], **kwargs)
    except Exception as exc:
        raise AudioPromptError(f"the model's processor could not prepare these clips: {exc}") from None
    ids = np.asarray(out["input_ids"]).reshape(-1).tolist()
    arrays = {
        key: np.asarray(value) for key, value in out.items()
        if key not in ("input_ids", "attention_mask", "mm_token_type_ids") and value is not None
        and not isinstance(value, (list, str))
    }
    if "input_features" not in arrays:
        raise AudioPromptError("the model's processor produced no audio features for these clips")
    audio_runs = image_runs(ids, audio_token_id)
    _check_audio_runs(audio_runs, clips, processor)
    spans = [ImageSpan(a, b, b"audio:" + clip.digest) for (a, b), clip in zip(audio_runs, clips)]
    if images:
        runs = image_runs(ids, image_token_id)
        check_runs(runs, images, arrays, processor)
        suffix = repr(shape).encode() if shape else b""
        spans += [ImageSpan(a, b, image.digest + suffix) for (a, b), image in zip(runs, images)]
    spans.sort(key=lambda span: span.start)
    return ids, MultimodalInput(spans=spans, arrays=arrays)


def _check_audio_runs(runs, clips: list[DecodedAudio], processor) -> None:
    """One run of audio tokens per clip, each as long as the processor says that clip's
    features are (text spelling the audio token itself would misplace them)."""
    if len(runs) != len(clips):
        raise AudioPromptError(
            f"the prompt has {len(runs)} runs of audio tokens for {len(clips)} clip(s): the chat template must "
            "place each clip once, and message text may not contain the model's audio token")
    count = getattr(processor, "_compute_audio_num_tokens", None)
    if count is None:
        return
    expected = [count(clip.samples, SAMPLE_RATE) for clip in clips]
    lengths = [b - a for a, b in runs]
    if lengths != expected:
        raise AudioPromptError(
            f"the audio tokens in the prompt ({lengths}) do not match the clips' features ({expected}): "
            "message text may not contain the model's audio token")
