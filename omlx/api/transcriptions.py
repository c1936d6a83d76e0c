"""`POST /v1/audio/transcriptions` and `POST /v1/audio/translations` in OpenAI's shape.

A multipart upload: `file` (the clip: whatever omlx.audio.clips decodes, under the server's
audio limits), `model`, and optionally `language` (ISO-639-1; transcriptions only), `prompt`
(text the model continues from: spelling, names, the previous window), `response_format`
(json, text, srt, vtt, verbose_json), `temperature` and `timestamp_granularities[]` (segment
and / or word, with verbose_json).  Served by the speech-to-text models of the model dirs
(omlx.audio.transcription: Whisper through mlx-whisper, which cuts long clips into 30 s windows
and joins their text) and by omni models with a transcription instruction
(omlx.api.omni_transcription).
"""

from __future__ import annotations

from aiohttp import web

from omlx.audio.clips import AudioError, decode
from omlx.models.pool import ModelPool
from omlx.serving_limits import limits_of

from . import transcription_formats as formats
from .audio_prompt import audio_error
from .errors import invalid
from .model_access import lease_for_request
from .offload import offload
from .omni_transcription import omni_transcript
from .serving import Serving

GRANULARITIES = ("segment", "word")


class TranscriptionRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.serving = Serving(pool)  # omni models transcribe through the chat path

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/translations", self.translations)

    async def transcriptions(self, request: web.Request) -> web.Response:
        return await self._serve(request, "transcribe")

    async def translations(self, request: web.Request) -> web.Response:
        return await self._serve(request, "translate")

    async def _serve(self, request: web.Request, task: str) -> web.Response:
        form = await _form(request)
        fields = parse_fields(form, task)
        limits = limits_of(request.app).audio
        data = _upload(form, limits.max_bytes)
        try:
            clip = await offload(decode, data, "file", limits, size=len(data))
        except AudioError as exc:
            raise audio_error(exc) from None
        info = self.pool.resolve(fields["model"]) if _known(self.pool, fields["model"]) else None
        if info is not None and info.model_type != "stt":
            if not info.takes_audio:
                raise invalid(f"'{fields['model']}' is a{'n' if info.model_type[0] in 'aeiou' else ''} "
                              f"{info.model_type} model without an audio tower; /v1/audio/* is served by "
                              "speech-to-text (stt) and omni models", "model", "model_not_stt")
            if "word" in fields["granularities"]:
                raise invalid("word timestamps come from speech-to-text (Whisper) models only", "timestamp_granularities",
                              "invalid_value")
            transcript = await omni_transcript(self.serving, request, fields["model"], data, clip.samples, task,
                                               fields)
            return respond(transcript, fields["response_format"], task, fields["granularities"])
        transcriber = await lease_for_request(request, self.pool, fields["model"], "stt")
        transcript = await transcriber.transcribe(
            clip.samples, task=task, language=fields["language"], prompt=fields["prompt"],
            temperature=fields["temperature"], words="word" in fields["granularities"])
        return respond(transcript, fields["response_format"], task, fields["granularities"])


def respond(transcript, response_format: str, task: str, granularities: tuple[str, ...]) -> web.Response:
    if response_format == "json":
        return web.json_response({"text": transcript.text})
    if response_format == "verbose_json":
        return web.json_response(formats.verbose_json(transcript, task, granularities))
    body = {"text": transcript.text, "srt": formats.srt, "vtt": formats.vtt}[response_format]
    text = body if isinstance(body, str) else body(transcript)
    return web.Response(text=text, content_type=formats.CONTENT_TYPES[response_format])


async def _form(request: web.Request):
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("this route takes a multipart/form-data upload (fields 'file' and 'model')", None,
                      "invalid_content_type")
    try:
        return await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise
    except Exception as exc:  # a malformed multipart body
        raise invalid(f"the multipart body could not be read: {exc}", None, "invalid_multipart") from None


def _upload(form, max_bytes: int) -> bytes:
    field = form.get("file")
    if field is None or not hasattr(field, "file"):
        raise invalid("'file' is required: the audio file, as a multipart file field", "file", "missing_file")
    data = field.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise audio_error(AudioError(f"the audio file is larger than the {max_bytes} byte limit", "file",
                                     "audio_too_large", 413))
    return data


def parse_fields(form, task: str) -> dict:
    """The form's fields, checked (400 with the field's name for any bad one)."""
    model = _text(form, "model")
    if not model:
        raise invalid("'model' is required", "model", "missing_model")
    response_format = _text(form, "response_format") or "json"
    if response_format not in formats.FORMATS:
        raise invalid(f"'response_format' must be one of {', '.join(formats.FORMATS)}", "response_format",
                      "invalid_value")
    temperature = 0.0
    if _text(form, "temperature") is not None:
        try:
            temperature = float(_text(form, "temperature"))
        except ValueError:
            raise invalid("'temperature' must be a number", "temperature", "invalid_type") from None
        if not 0.0 <= temperature <= 1.0:
            raise invalid("'temperature' must be between 0 and 1", "temperature", "invalid_value")
    language = _text(form, "language") or None
    if language is not None:
        if task == "translate":
            raise invalid("'language' is not a field of translations (the output is English)", "language",
                          "invalid_value")
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        language = language.lower()
        language = TO_LANGUAGE_CODE.get(language, language)
        if language not in LANGUAGES:
            raise invalid(f"'language' {language!r} is not a language Whisper knows (ISO-639-1, e.g. 'en')",
                          "language", "invalid_value")
    granularities = tuple(dict.fromkeys(
        value for key in ("timestamp_granularities[]", "timestamp_granularities")
        for value in form.getall(key, []) if isinstance(value, str)))
    for value in granularities:
        if value not in GRANULARITIES:
            raise invalid(f"'timestamp_granularities' takes 'segment' and / or 'word', not {value!r}",
                          "timestamp_granularities", "invalid_value")
    if granularities and response_format != "verbose_json":
        raise invalid("'timestamp_granularities' needs response_format 'verbose_json'", "timestamp_granularities",
                      "invalid_value")
    return {"model": model, "response_format": response_format, "temperature": temperature,
            "language": language, "prompt": _text(form, "prompt"), "granularities": granularities}


def _text(form, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a text field", name, "invalid_type")
    return value.strip()


def _known(pool: ModelPool, name: str) -> bool:
    try:
        pool.resolve(name)
        return True
    except Exception:  # unknown names get the lease's own 404
        return False
