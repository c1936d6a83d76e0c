"""Audio content parts, the same for every chat-style API family.

Each family's parser reads its own audio part into an `AudioSource` and adds it to the
message content with `MessageContent.audio` (image_parts): the Hugging Face part
`{"type": "audio"}` that omni chat templates place clips from, carrying its source under a key
no template reads (`omlx_audio`), so a conversation's clips are always those of its messages,
in the order the template renders them (also for a Responses history replayed from the store).

Forms taken:
- OpenAI chat and Responses `input_audio`: `{"input_audio": {"data": <base64>, "format": "wav"}}`
  (Responses also flat: `{"type": "input_audio", "data": ..., "format": ...}`);
- mlx-vlm's server forms: `{"type": "audio_url", "audio_url": {"url": ...}}` (or the URL as a
  string), and `{"type": "audio", "audio": <url>}`, where the URL is a data: URL or http(s).
"""

from __future__ import annotations

from omlx.audio.clips import AudioSource

from .errors import invalid
from .media_parts import conversation_sources

SOURCE_KEY = "omlx_audio"
PART_TYPES = ("input_audio", "audio_url", "audio")


def openai_audio(part: dict, where: str) -> AudioSource:
    """An audio part of a chat message or a Responses input item, any of the forms above."""
    kind = part.get("type")
    if kind == "input_audio":
        value = part.get("input_audio", part)
        if not isinstance(value, dict):
            raise invalid(f"{where}.input_audio must be an object with 'data' and 'format'", where, "invalid_audio")
        data, fmt = value.get("data"), value.get("format")
        if not isinstance(data, str) or not data:
            raise invalid(f"{where}.input_audio.data must be base64 audio data", where, "invalid_audio")
        if fmt is not None and not isinstance(fmt, str):
            raise invalid(f"{where}.input_audio.format must be a string such as 'wav' or 'mp3'", where,
                          "invalid_audio")
        if data.startswith(("data:", "http://", "https://")):  # some clients send a URL here
            return AudioSource(data, where, format=fmt)
        return AudioSource(data, where, base64=True, format=fmt)
    value = part.get("audio_url") if kind == "audio_url" else part.get("audio")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.{kind} must be a data: URL or an http(s) URL", where, "invalid_audio")
    return AudioSource(url, where)


def conversation_audio(messages: list[dict]) -> list[AudioSource]:
    """The clips of a conversation's messages, in order."""
    return conversation_sources(messages, "audio", SOURCE_KEY, AudioSource)
