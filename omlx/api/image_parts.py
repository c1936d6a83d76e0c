"""Message content with images, the same for every API family.

Each family's parser reads its own image part (OpenAI `image_url`, Responses `input_image`,
Anthropic `image` blocks) into an `ImageSource` and builds the message content with
`MessageContent`: a plain string when the message has no image (what every text chat template
expects), else the Hugging Face list of parts (`{"type": "text", "text"}` / `{"type": "image"}`)
that vision chat templates place images from.  An image part carries its source under a key
no template reads (`omlx_image`), so the conversation's images are always those of its
messages, in the order the template renders them - also for a Responses history replayed
from the store.
"""

from __future__ import annotations

import dataclasses

from omlx.vision.images import ImageSource

from .errors import invalid
from .media_parts import conversation_sources


SOURCE_KEY = "omlx_image"


class MessageContent:
    def __init__(self):
        self.parts: list[dict] = []
        self.has_image = False

    def text(self, text: str) -> None:
        self.parts.append({"type": "text", "text": text})

    def image(self, source: ImageSource) -> None:
        self.parts.append({"type": "image", SOURCE_KEY: dataclasses.asdict(source)})
        self.has_image = True

    def audio(self, source) -> None:
        """An audio clip (omlx.audio.clips.AudioSource): the part omni templates place clips
        from (see audio_parts)."""
        from .audio_parts import SOURCE_KEY as AUDIO_KEY

        self.parts.append({"type": "audio", AUDIO_KEY: dataclasses.asdict(source)})
        self.has_image = True  # media: the content stays a list of parts

    def value(self) -> str | list[dict]:
        if not self.has_image:
            return "".join(p["text"] for p in self.parts)
        return self.parts


def openai_image(part: dict, where: str) -> ImageSource:
    """An OpenAI chat `image_url` part: `{"image_url": {"url": ...}}` (or the URL as a string)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url.url must be a data: URL or an http(s) URL", where, "invalid_image")
    return ImageSource(url, where)


def responses_image(part: dict, where: str) -> ImageSource:
    """A Responses `input_image` part: `image_url` (a URL or data: URL); `file_id` is not served."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        if part.get("file_id") is not None:
            raise invalid(f"{where}: images by file_id are not supported; send image_url", where, "unsupported_content")
        raise invalid(f"{where}.image_url must be a data: URL or an http(s) URL", where, "invalid_image")
    return ImageSource(url, where)


def anthropic_image(block: dict, where: str) -> ImageSource:
    """An Anthropic `image` block: `source` of type `base64` (media_type + data) or `url`."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{where}.source must be an object", where)
    kind = source.get("type")
    if kind == "base64":
        data, media = source.get("data"), source.get("media_type")
        if not isinstance(data, str) or not data:
            raise invalid(f"{where}.source.data must be base64 image data", where)
        if not isinstance(media, str):
            raise invalid(f"{where}.source.media_type must be a string such as image/png", where)
        return ImageSource(data, where, base64=True, media_type=media)
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise invalid(f"{where}.source.url must be an http(s) URL", where)
        return ImageSource(url, where)
    raise invalid(f"{where}.source.type must be 'base64' or 'url', got {kind!r}", where)


def conversation_images(messages: list[dict]) -> list[ImageSource]:
    """The images of a conversation's messages, in order."""
    return conversation_sources(messages, "image", SOURCE_KEY, ImageSource)
