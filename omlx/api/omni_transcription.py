"""Transcription by an omni model (an mlx-vlm model with an audio tower, e.g. Gemma 4): the
clip and an instruction as one user turn through the same engine and path as a chat request
(its clip encoded at prefill, decoded batched with everyone else), greedy unless the request
sets a temperature; the answer's text is the transcript.  No timestamps: srt / vtt get one
cue over the whole clip, verbose_json one segment."""

from __future__ import annotations

import base64
import math

from aiohttp import web

from omlx.audio.clips import AudioSource
from omlx.audio.transcription import Transcript

from .conversation import Conversation
from .generation import collect_choices
from .image_parts import MessageContent
from .sampling_fields import SamplingRequest
from .serving import Serving
from .turn_request import TurnRequest

# Tokens a clip's transcript may take: speech runs ~3 words (~4-5 tokens) a second.
TOKENS_PER_SECOND = 12
MIN_TOKENS = 64


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


async def omni_transcript(serving: Serving, http: web.Request, model: str, data: bytes, duration: float,
                          task: str, fields: dict) -> Transcript:
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
    text = running.stream.text.text.strip()
    segments = [{"id": 0, "seek": 0, "start": 0.0, "end": round(duration, 3), "text": text}] if text else []
    return Transcript(text, fields["language"] or "", duration, segments)
