"""What the image and audio part modules share: normalized media parts carry their source's
fields under a key of their own (image_parts.SOURCE_KEY, audio_parts.SOURCE_KEY), and the
prompt builders collect them back, in conversation order."""

from __future__ import annotations


def conversation_sources(messages: list[dict], part_type: str, source_key: str, source_cls) -> list:
    """`source_cls(**fields)` for every `part_type` part of the messages' list contents that
    carries its source under `source_key`, in order."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            out += [source_cls(**part[source_key]) for part in content
                    if isinstance(part, dict) and part.get("type") == part_type and source_key in part]
    return out
