"""Audio clips from requests: base64 payloads (OpenAI `input_audio`), `data:` URLs and
http(s) URLs, fetched and decoded under limits to 16 kHz mono float32, each with a hash of
its decoded samples (the prefix cache keys blocks on it).

Decoding is mlx-vlm's own (`mlx_audio.audio_io.read`: miniaudio for WAV / MP3 / FLAC, ffmpeg
for the container formats when it is installed; then `mlx_audio.utils.resample_audio`, what
`mlx_vlm.utils.load_audio` does), so a clip served here gives the samples `mlx_vlm.generate`
would see.  Every failure is an `AudioError` naming the request field it came from, which the
API layer answers as a 4xx in the route family's shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
from dataclasses import dataclass

import numpy as np

from omlx.media_payload import MediaError, MediaKind, decode_base64, fetch_media, split_data_url

SAMPLE_RATE = 16_000
# What miniaudio decodes in-process; the rest need an ffmpeg binary on PATH.
NATIVE_FORMATS = ("wav", "mp3", "flac")
FFMPEG_FORMATS = ("ogg", "opus", "webm", "m4a", "mp4", "aac", "aiff")
MEDIA_TYPES = {
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac",
    "audio/ogg": "ogg", "audio/opus": "opus", "audio/webm": "webm", "audio/mp4": "m4a",
    "audio/m4a": "m4a", "audio/x-m4a": "m4a", "audio/aac": "aac", "audio/aiff": "aiff",
}


def supported_formats() -> tuple[str, ...]:
    return NATIVE_FORMATS + (FFMPEG_FORMATS if shutil.which("ffmpeg") else ())


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int = 25 << 20  # encoded size, per clip (OpenAI's upload limit)
    max_seconds: float = 600.0  # decoded duration, per clip
    fetch_timeout_s: float = 10.0  # whole fetch of an http(s) clip
    max_clips: int = 8  # per request


@dataclass(frozen=True)
class AudioSource:
    """Where a request's clip comes from: `url` is a data: URL or an http(s) URL, or (with
    `base64=True`) the base64 payload itself, `format` the client's word for its encoding."""

    url: str
    param: str  # the request field, for error messages
    base64: bool = False
    format: str | None = None


@dataclass
class DecodedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    digest: bytes  # hash of the decoded samples

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


class AudioError(MediaError):
    default_code = "invalid_audio"


AUDIO = MediaKind(error=AudioError, item="the audio clip", data="the audio data", noun="clip",
                  data_url_example="data:audio/wav;base64,...", too_large_code="audio_too_large", fetch_what="audio")


async def load_clips(sources: list[AudioSource], limits: AudioLimits = AudioLimits()) -> list[DecodedAudio]:
    """All of a request's clips, fetched concurrently, decoded off the event loop (in the
server's offload pool, omlx.api.offload)."""
    if len(sources) > limits.max_clips:
        raise AudioError(f"a request may carry at most {limits.max_clips} audio clips, this one has {len(sources)}",
                         sources[limits.max_clips].param, "too_many_audio_clips")
    return list(await asyncio.gather(*(load_clip(s, limits) for s in sources)))


async def load_clip(source: AudioSource, limits: AudioLimits = AudioLimits()) -> DecodedAudio:
    from omlx.api.offload import offload  # the bounded worker pool request CPU work runs in

    data = await clip_bytes(source, limits)
    return await offload(decode, data, source.param, limits, size=len(data))


async def clip_bytes(source: AudioSource, limits: AudioLimits) -> bytes:
    url = source.url
    if not isinstance(url, str) or not url:
        raise AudioError("the audio source is empty", source.param)
    _check_declared(source.format, source.param)
    if source.base64:
        return decode_base64(url, source.param, limits.max_bytes, AUDIO)
    if url.startswith("data:"):
        media, payload = split_data_url(url, source.param, AUDIO)
        if media and media not in MEDIA_TYPES and media != "application/octet-stream":
            raise AudioError(f"unsupported audio media type {media!r}", source.param, "unsupported_audio_format")
        if media in MEDIA_TYPES:
            _check_declared(MEDIA_TYPES[media], source.param)
        return decode_base64(payload, source.param, limits.max_bytes, AUDIO)
    if url.startswith(("http://", "https://", "file:")):
        return await fetch_media(url, source.param, limits.max_bytes, limits.fetch_timeout_s, AUDIO)
    raise AudioError("an audio URL must be a data: URL or an http(s) URL", source.param)


def _check_declared(fmt: str | None, param: str) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, str) or fmt.lower() not in supported_formats():
        raise AudioError(f"unsupported audio format {fmt!r}; this server decodes {', '.join(supported_formats())}",
                         param, "unsupported_audio_format")


def decode(data: bytes, param: str, limits: AudioLimits = AudioLimits()) -> DecodedAudio:
    """Decode one clip to 16 kHz mono float32 and check its length (CPU work: call it off the
    event loop).  Decoding stops just past the duration limit, so an hour-long upload costs
    no more than a clip at the limit."""
    from mlx_audio.audio_io import _detect_format_from_bytes, read
    from mlx_audio.utils import resample_audio

    if len(data) > limits.max_bytes:
        raise AudioError(f"the audio clip is larger than the {limits.max_bytes} byte limit", param,
                         "audio_too_large", 413)
    if not data:
        raise AudioError("the audio clip is empty", param)
    detected = _detect_format_from_bytes(data[:64])
    if detected is None:
        raise AudioError("the audio data is not a format this server can decode "
                         f"(supported: {', '.join(supported_formats())})", param, "unsupported_audio_format")
    if detected not in supported_formats() and not (detected in ("aifc",) and "aiff" in supported_formats()):
        raise AudioError(f"{detected} audio needs ffmpeg, which this server does not have; send "
                         f"{', '.join(NATIVE_FORMATS)}", param, "unsupported_audio_format")
    try:
        audio, rate = read(io.BytesIO(data), dtype="float32", duration=limits.max_seconds + 0.05)
    except Exception as exc:  # corrupt or truncated data behind a valid header
        raise AudioError(f"the audio data is corrupt or truncated: {exc}", param) from None
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if audio.size == 0 or not rate:
        raise AudioError("the audio clip decodes to no samples", param)
    if audio.size / rate > limits.max_seconds:
        raise AudioError(f"the audio clip is longer than the {limits.max_seconds:g} s limit", param,
                         "audio_too_long", 413)
    if not np.isfinite(audio).all():
        raise AudioError("the audio clip decodes to samples that are not finite", param)
    if rate != SAMPLE_RATE:
        audio = np.asarray(resample_audio(audio, rate, SAMPLE_RATE), dtype=np.float32)
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    digest = hashlib.blake2b(f"audio:{SAMPLE_RATE}:".encode(), digest_size=16)
    digest.update(audio.tobytes())
    return DecodedAudio(audio, digest.digest())
