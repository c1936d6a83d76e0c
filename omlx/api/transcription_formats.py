"""A transcript in OpenAI's `response_format`s: json (`{"text"}`), text, srt, vtt and
verbose_json (task, language, duration, text, segments and / or words, as
`timestamp_granularities` asks)."""

from __future__ import annotations

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
CONTENT_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
SEGMENT_FIELDS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                  "compression_ratio", "no_speech_prob")


def timestamp(seconds: float, separator: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def cues(transcript) -> list[tuple[float, float, str]]:
    """(start, end, text) of each non-empty segment; a transcript with text but no segment
    timing is one cue over the whole clip."""
    out = [(float(s["start"]), float(s["end"]), s["text"].strip()) for s in transcript.segments
           if s.get("text", "").strip()]
    if not out and transcript.text.strip():
        out = [(0.0, transcript.duration, transcript.text.strip())]
    return [(start, max(end, start), text) for start, end, text in out]


def srt(transcript) -> str:
    blocks = [f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n"
              for i, (a, b, text) in enumerate(cues(transcript), start=1)]
    return "\n".join(blocks)


def vtt(transcript) -> str:
    blocks = [f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text}\n" for a, b, text in cues(transcript)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose_json(transcript, task: str, granularities: tuple[str, ...]) -> dict:
    body = {"task": task, "language": transcript.language, "duration": round(transcript.duration, 3),
            "text": transcript.text}
    if "segment" in granularities or not granularities:
        body["segments"] = [{k: _plain(s.get(k)) for k in SEGMENT_FIELDS if k in s} for s in transcript.segments]
    if "word" in granularities:
        body["words"] = [{"word": w["word"], "start": float(w["start"]), "end": float(w["end"])}
                         for w in transcript.words]
    return body


def _plain(value):
    """Numpy / MLX scalars and lists as JSON values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
