"""The prompt of a conversation with images, for a vision model: the chat template's text,
the images fetched and decoded under limits, and the model's processor run over both
(off the event loop).  Every failure is a 4xx naming the field it came from."""

from __future__ import annotations

import dataclasses

from omlx.models.loaded import LoadedModel
from omlx.scheduler.multimodal import MultimodalInput
from omlx.vision.images import ImageError, ImageLimits, load_images
from omlx.vision.ocr import with_default_prompt
from omlx.vision.prompt import ImagePromptError, prepare

from .conversation import check_message_count, check_prompt_chars, check_user_text, render_prompt
from .errors import APIError, invalid
from .offload import offload
from .turn_request import TurnRequest


def image_error(exc: ImageError) -> APIError:
    kind = "invalid_request_error"
    return APIError(exc.message, exc.status, kind, exc.param, exc.code)


def check_takes_images(loaded: LoadedModel, request: TurnRequest) -> None:
    from .audio_prompt import check_takes_audio

    check_takes_audio(loaded, request)
    images = request.conversation.images if request.conversation is not None else []
    if images and not loaded.takes_images:
        raise invalid(f"'{loaded.model_id}' accepts text only and cannot take images; "
                      "send them to a vision (vlm) model", images[0].param, "unsupported_content")


def ocr_conversation(loaded: LoadedModel, request: TurnRequest):
    """The conversation an OCR model is asked: image-only user turns get its instruction."""
    conversation = request.conversation
    ocr = getattr(loaded.vision, "ocr", None)
    if ocr is None or conversation is None:
        return conversation
    return dataclasses.replace(conversation, messages=with_default_prompt(conversation.messages, ocr))


async def image_prompt(loaded: LoadedModel, request: TurnRequest, limits: ImageLimits,
                       size: int | None = 0, audio_limits=None) -> tuple[list[int], MultimodalInput | None]:
    """`size`: the request body's bytes, which the template and the processor's work scale
    with (they run in the offload pool's lane for that size)."""
    side = loaded.vision
    conversation = ocr_conversation(loaded, request)
    from .audio_prompt import audio_prompt, check_clip_count, request_clips

    clips = request_clips(request)
    check_clip_count(loaded, clips)
    sources = conversation.images
    if side.max_images is not None and len(sources) > side.max_images:
        raise invalid(f"'{loaded.model_id}' ({side.family}) takes at most {side.max_images} image(s) per "
                      f"request; this one has {len(sources)}", sources[side.max_images].param, "too_many_images")
    # A prompt whose text alone cannot fit is refused before any image is fetched.
    text = await offload(_rendered_text, loaded, conversation, request.prompt_param, size=size)
    if clips:  # clips (and any images) go through the omni model's processor
        return await audio_prompt(loaded, request, conversation, text, audio_limits, limits, size)
    try:
        images = await load_images(sources, limits)
    except ImageError as exc:
        raise image_error(exc) from None
    try:
        return await offload(prepare, side.processor, side.image_token_id, text, images,
                             request.resize_shape, size=size)
    except ImagePromptError as exc:
        raise invalid(str(exc), sources[0].param, "invalid_image") from None


def _rendered_text(loaded: LoadedModel, conversation, param: str) -> str:
    check_message_count(conversation, loaded.context_window, param)
    check_user_text(loaded.tokenizer, conversation, loaded.context_window, param)
    text = render_prompt(loaded.tokenizer, conversation, param, tokenize=False)
    check_prompt_chars(loaded.tokenizer, text, loaded.context_window, param)
    return text
