"""Transcription by an omni model (an mlx-vlm model with an audio tower, e.g. Gemma 4): the
clip and an instruction as one user turn through the same engine and path as a chat request
(its clip encoded at prefill, decoded batched with everyone else), greedy unless the request
sets a temperature; the answer's text is the transcript.

Gemma 4 hears at most 750 audio tokens of 40 ms (30 s) of a clip: a longer clip is cut into
equal windows of at most 30 s, each window one turn (they run concurrently, batched in the
engine; each travels as 16-bit PCM), and their texts are joined, one segment per window.  No
word timestamps.
"""

from __future__ import annotations

import asyncio
import base64
import math

import numpy as np
from aiohttp import web

from omlx.audio.clips import SAMPLE_RATE, AudioSource
from omlx.audio.transcription import Transcript

from .conversation import Conversation
from .generation import collect_choices
from .image_parts import MessageContent
from .sampling_fields import SamplingRequest
from .serving import Serving
from .turn_request import TurnRequest

# Tokens a window's transcript may take: speech runs ~3 words (~4-5 tokens) a second.
TOKENS_PER_SECOND = 12
MIN_TOKENS = 64
WINDOW_S = 30.0  # Gemma 4's processor: audio_seq_length 750 x audio_ms_per_token 40


def instruction(task: str, language: str | None, prompt: str | None) -> str:
    from mlx_whisper.tokenizer import LANGUAGES

    if task == "translate":
        text = "Translate the speech in this audio clip into English. Answer with the translation only."
    else:
        text = "Transcribe the speech in this audio clip verbatim. Answer with the transcript only."
        if language:
            text += f" The speech is in {LANGUAGES.get(language, language).title()}."
    if prompt:
        text += f" It follows this text: {prompt}"
    return text


def windows(samples: np.ndarray, window_s: float = WINDOW_S) -> list[np.ndarray]:
    """The clip in equal consecutive windows of at most `window_s` (one when it fits)."""
    count = max(1, math.ceil(len(samples) / (window_s * SAMPLE_RATE)))
    size = math.ceil(len(samples) / count)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def pcm16_wav(samples: np.ndarray) -> bytes:
    """A window as 16 kHz mono 16-bit PCM WAV (what miniaudio decodes back exactly; clips from
    16-bit sources lose nothing, others at most half a step of 2^-15)."""
    import io
    import wave

    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.tobytes())
    return out.getvalue()


async def omni_transcript(serving: Serving, http: web.Request, model: str, data: bytes, samples: np.ndarray,
                          task: str, fields: dict) -> Transcript:
    duration = len(samples) / SAMPLE_RATE
    parts = windows(samples)
    if len(parts) == 1:
        texts = [await _window_text(serving, http, model, data, duration, task, fields)]
    else:
        tasks = [asyncio.ensure_future(_window_text(serving, http, model, pcm16_wav(part), len(part) / SAMPLE_RATE,
                                                    task, fields)) for part in parts]
        try:
            texts = await asyncio.gather(*tasks)
        except BaseException:  # one window failed or the client left: the others stop too
            for task_ in tasks:
                task_.cancel()
            raise
    segments, start = [], 0.0
    for i, (part, text) in enumerate(zip(parts, texts)):
        end = start + len(part) / SAMPLE_RATE
        if text:
            segments.append({"id": len(segments), "seek": int(round(start * 100)), "start": round(start, 3),
                             "end": round(end, 3), "text": text})
        start = end
    return Transcript(" ".join(t for t in texts if t), fields["language"] or "", duration, segments)


async def _window_text(serving: Serving, http: web.Request, model: str, data: bytes, duration: float, task: str,
                       fields: dict) -> str:
    content = MessageContent()
    content.audio(AudioSource(base64.b64encode(data).decode(), "file", base64=True))
    content.text(instruction(task, fields["language"], fields["prompt"]))
    turn = TurnRequest(
        model=model, sampling=SamplingRequest(temperature=fields["temperature"]),
        conversation=Conversation(messages=[{"role": "user", "content": content.value()}]),
        max_tokens=max(MIN_TOKENS, math.ceil(duration * TOKENS_PER_SECOND)), cap_max_tokens=True,
        id_prefix="transcription", prompt_param="file")
    running = await serving.start(http, turn)
    await collect_choices(running.stream)
    return running.stream.text.text.strip()
