"""The prompt of a conversation with audio clips, for an omni model: the chat template's text,
the clips (and any images) fetched and decoded under limits off the event loop, and the
model's processor run over them.  Every failure is a 4xx naming the field it came from."""

from __future__ import annotations

import asyncio

from omlx.audio.clips import AudioError, AudioLimits, load_clips
from omlx.audio.prompt import AudioPromptError, prepare
from omlx.models.loaded import LoadedModel
from omlx.scheduler.multimodal import MultimodalInput
from omlx.vision.images import ImageError, ImageLimits, load_images

from .audio_parts import conversation_audio
from .errors import APIError, invalid
from .offload import offload
from .turn_request import TurnRequest


def audio_error(exc: AudioError) -> APIError:
    return APIError(exc.message, exc.status, "invalid_request_error", exc.param, exc.code)


def request_clips(request: TurnRequest) -> list:
    return conversation_audio(request.conversation.messages) if request.conversation is not None else []


def check_takes_audio(loaded: LoadedModel, request: TurnRequest) -> None:
    clips = request_clips(request)
    if clips and not loaded.takes_audio:
        raise invalid(f"'{loaded.model_id}' has no audio tower and cannot take audio; send clips to an "
                      "audio-capable (omni) model", clips[0].param, "unsupported_content")


def check_clip_count(loaded: LoadedModel, sources: list) -> None:
    most = loaded.vision.max_clips
    if most is not None and len(sources) > most:
        raise invalid(f"'{loaded.model_id}' ({loaded.vision.family}) takes at most {most} audio clip(s) per "
                      f"request (mlx-vlm merges one clip's features per prompt for this family); this one has "
                      f"{len(sources)}", sources[most].param, "too_many_audio_clips")


async def audio_prompt(loaded: LoadedModel, request: TurnRequest, conversation, text: str,
                       limits: AudioLimits | None, image_limits: ImageLimits,
                       size: int | None = 0) -> tuple[list[int], MultimodalInput]:
    """`text`: the rendered prompt (its length already checked against the context); `size`:
    the request body's bytes, which pick the offload lane the processor runs in."""
    side = loaded.vision
    limits = limits or AudioLimits()
    sources = request_clips(request)
    try:
        clips, images = await asyncio.gather(load_clips(sources, limits),
                                             load_images(conversation.images, image_limits))
    except AudioError as exc:
        raise audio_error(exc) from None
    except ImageError as exc:
        raise APIError(exc.message, exc.status, "invalid_request_error", exc.param, exc.code) from None
    try:
        return await offload(prepare, side.processor, side.image_token_id, side.audio_token_id, text,
                             images, clips, request.resize_shape, size=size)
    except AudioPromptError as exc:
        raise invalid(str(exc), sources[0].param, "invalid_audio") from None
