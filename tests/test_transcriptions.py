"""`/v1/audio/transcriptions` and `/v1/audio/translations` through a real server and the
openai SDK, served by a tiny random-weight Whisper (omlx.testing.tiny_whisper) found in the
model dir: the text equals mlx-whisper's own `transcribe` on the same samples, every
response_format parses (srt and vtt by the `srt` and `webvtt-py` parsers), long clips are cut
into Whisper's 30 s windows, and bad uploads get OpenAI-shaped 4xx answers."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

from omlx.audio.clips import SAMPLE_RATE, decode
from omlx.testing.tiny_audio import build_audio_model
from omlx.testing.tiny_models import TinyModelSpec, build_model
from omlx.testing.tiny_whisper import build_whisper

WHISPER, OMNI, TEXT = "tiny-whisper", "tiny-gemma4-audio", "tiny-text"


def sweep(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)


def encode(samples: np.ndarray, fmt: str) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, SAMPLE_RATE, format=fmt.upper())
    return out.getvalue()


@pytest.fixture(scope="module")
def stt_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stt-models")
    build_whisper(root / WHISPER)
    build_audio_model(root / OMNI)
    build_model(root / TEXT, TinyModelSpec())
    return root


@pytest.fixture(scope="module")
def sserver(stt_models, tmp_path_factory):
    from omlx_process import omlx_server

    with omlx_server(stt_models, tmp_path_factory.mktemp("stt-server"), "--kv-cache-gb", "0.05",
                     "--audio-max-bytes", "3MB", "--audio-max-seconds", "90", failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def oai(sserver):
    import openai

    with openai.OpenAI(base_url=sserver.base_url, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


_library: dict = {}


def library(path, data: bytes, **options) -> dict:
    """mlx-whisper alone on the samples the server decodes from `data` (greedy, float32)."""
    import mlx_whisper

    key = (data, tuple(sorted(options.items())))
    if key not in _library:
        samples = decode(data, "file").samples
        _library[key] = mlx_whisper.transcribe(samples, path_or_hf_repo=str(path), temperature=0.0, fp16=False,
                                               verbose=None, **options)
    return _library[key]


def test_discovered_as_stt(sserver):
    with urllib.request.urlopen(sserver.root + "/v1/models/status", timeout=10) as r:
        status = {m["id"]: m for m in json.loads(r.read())["models"]}
    assert status[WHISPER]["model_type"] == "stt" and status[WHISPER]["audio"] is True
    assert status[OMNI]["model_type"] == "vlm" and status[OMNI]["audio"] is True


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_text_equals_mlx_whisper_alone(oai, sserver, fmt):
    data = encode(sweep(2.0), fmt)
    result = oai.audio.transcriptions.create(model=WHISPER, file=(f"clip.{fmt}", data), temperature=0)
    expected = library(sserver.model_path(WHISPER), data)
    assert expected["text"].strip()  # the tiny model says something: the comparison means something
    assert result.text == expected["text"]


def test_language_and_prompt_reach_the_model(oai, sserver):
    data = encode(noise(1.5, seed=1), "wav")
    result = oai.audio.transcriptions.create(model=WHISPER, file=("clip.wav", data), language="de",
                                             prompt="ein kleiner Test")
    expected = library(sserver.model_path(WHISPER), data, language="de", initial_prompt="ein kleiner Test")
    assert result.text == expected["text"]


def test_translation_equals_mlx_whisper_alone(oai, sserver):
    data = encode(noise(1.0, seed=2), "flac")
    result = oai.audio.translations.create(model=WHISPER, file=("clip.flac", data))
    assert result.text == library(sserver.model_path(WHISPER), data, task="translate")["text"]


def test_every_response_format_parses(oai, sserver):
    import srt
    import webvtt

    data = encode(sweep(3.0), "wav")
    expected = library(sserver.model_path(WHISPER), data, language="en")
    common = dict(model=WHISPER, file=("clip.wav", data), language="en")

    text = oai.audio.transcriptions.create(response_format="text", **common)
    assert text.strip() == expected["text"].strip()

    subtitles = list(srt.parse(oai.audio.transcriptions.create(response_format="srt", **common)))
    segments = [s for s in expected["segments"] if s["text"].strip()]
    assert [s.content for s in subtitles] == [s["text"].strip() for s in segments]
    assert [round(s.start.total_seconds(), 3) for s in subtitles] == [round(s["start"], 3) for s in segments]

    captions = webvtt.from_buffer(io.StringIO(oai.audio.transcriptions.create(response_format="vtt", **common)))
    assert [c.text for c in captions] == [s["text"].strip() for s in segments]
    assert [c.end_in_seconds for c in captions] == [int(s["end"]) for s in segments]

    # Word timestamps change where Whisper's next window starts (at the last word's end), as
    # in the library: compared with the library asked for them too.
    expected = library(sserver.model_path(WHISPER), data, language="en", word_timestamps=True)
    verbose = oai.audio.transcriptions.create(response_format="verbose_json", timestamp_granularities=["word", "segment"],
                                              **common)
    assert verbose.text == expected["text"] and verbose.language == "en"
    assert abs(verbose.duration - 3.0) < 0.01
    assert [s.text for s in verbose.segments] == [s["text"] for s in expected["segments"]]
    assert [w.word for w in verbose.words] == [w["word"] for s in expected["segments"] for w in s["words"]]


def test_long_clip_is_cut_into_windows(oai, sserver):
    """70 s: three of Whisper's 30 s windows, their text joined, as the library does it."""
    data = encode(noise(70.0, seed=3), "flac")
    result = oai.audio.transcriptions.create(model=WHISPER, file=("long.flac", data), response_format="verbose_json",
                                             language="en")
    expected = library(sserver.model_path(WHISPER), data, language="en")
    assert result.text == expected["text"]
    assert max(s.end for s in result.segments) > 30.0  # segments past the first window


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_omni_model_transcribes_through_the_chat_path(oai, sserver, task):
    """An omni model answers a transcription instruction about the clip: the text is what
    mlx_vlm.generate answers alone to that turn (greedy)."""
    import math

    from mlx_vlm import generate, load
    from mlx_vlm.utils import load_audio

    from omlx.api.omni_transcription import MIN_TOKENS, TOKENS_PER_SECOND, instruction

    data = encode(sweep(1.6), "mp3")
    if task == "transcribe":
        result = oai.audio.transcriptions.create(model=OMNI, file=("clip.mp3", data), language="en",
                                                 response_format="verbose_json")
    else:
        result = oai.audio.translations.create(model=OMNI, file=("clip.mp3", data), response_format="verbose_json")
    model, processor = load(str(sserver.model_path(OMNI)))
    messages = [{"role": "user", "content": [
        {"type": "audio"}, {"type": "text", "text": instruction(task, "en" if task == "transcribe" else None, None)}]}]
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    samples = load_audio(io.BytesIO(data), sr=SAMPLE_RATE)
    max_tokens = max(MIN_TOKENS, math.ceil(len(samples) / SAMPLE_RATE * TOKENS_PER_SECOND))
    reference = generate(model, processor, prompt, audio=[samples], max_tokens=max_tokens, temperature=0.0,
                         verbose=False)
    eos = set(model.config.eos_token_id)
    tokens = [t for t in reference.token_ids]
    tokens = tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
    expected = processor.tokenizer.decode(tokens).strip()
    assert expected
    assert result.text == expected
    assert [s.text for s in result.segments] == [expected] and abs(result.duration - 1.6) < 0.01


def test_omni_model_cuts_a_long_clip_into_windows(oai, sserver):
    """Gemma 4 hears at most 30 s of a clip: 40 s become two 20 s windows, each transcribed as
    mlx_vlm.generate does alone, their texts joined, one segment each."""
    import math

    from mlx_vlm import generate, load

    from omlx.api.omni_transcription import MIN_TOKENS, TOKENS_PER_SECOND, instruction, pcm16_wav, windows

    samples = noise(40.0, seed=6)
    data = encode(samples, "flac")
    result = oai.audio.transcriptions.create(model=OMNI, file=("long.flac", data), language="en",
                                             response_format="verbose_json")
    decoded = decode(data, "file").samples
    parts = windows(decoded)
    assert [len(p) for p in parts] == [320_000, 320_000]
    # The windows travel as 16-bit PCM: from a 16-bit FLAC, exactly.
    assert all(np.array_equal(decode(pcm16_wav(part), "x").samples, part) for part in parts)
    model, processor = load(str(sserver.model_path(OMNI)))
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": instruction("transcribe", "en", None)}]}],
        add_generation_prompt=True, tokenize=False)
    eos = set(model.config.eos_token_id)
    texts = []
    for part in parts:
        out = generate(model, processor, prompt, audio=[part], temperature=0.0, verbose=False,
                       max_tokens=max(MIN_TOKENS, math.ceil(len(part) / SAMPLE_RATE * TOKENS_PER_SECOND)))
        tokens = list(out.token_ids)
        texts.append(processor.tokenizer.decode(tokens[:next((i for i, t in enumerate(tokens) if t in eos),
                                                             len(tokens))]).strip())
    assert all(texts)  # both windows say something: the join is checked
    assert result.text == " ".join(texts)
    assert [(s.start, s.end, s.text) for s in result.segments] == [(0.0, 20.0, texts[0]), (20.0, 40.0, texts[1])]


# ---------------------------------------------------------------------------- bad input
def _multipart(fields: dict, file: tuple[str, bytes] | None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file is not None:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode() + file[1] + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _post(server, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(server.root + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("name, fields, file, status, code", [
    ("no file", {"model": WHISPER}, None, 400, "missing_file"),
    ("no model", {}, ("a.wav", encode(sweep(0.5), "wav")), 400, "missing_model"),
    ("bad response_format", {"model": WHISPER, "response_format": "docx"}, ("a.wav", encode(sweep(0.5), "wav")),
     400, "invalid_value"),
    ("bad temperature", {"model": WHISPER, "temperature": "hot"}, ("a.wav", encode(sweep(0.5), "wav")), 400,
     "invalid_type"),
    ("unknown language", {"model": WHISPER, "language": "xx-klingon"}, ("a.wav", encode(sweep(0.5), "wav")), 400,
     "invalid_value"),
    ("granularities without verbose_json", {"model": WHISPER, "timestamp_granularities[]": "word"},
     ("a.wav", encode(sweep(0.5), "wav")), 400, "invalid_value"),
    ("not audio", {"model": WHISPER}, ("a.wav", b"this is a text file, not audio" * 4), 400,
     "unsupported_audio_format"),
    ("truncated", {"model": WHISPER}, ("a.wav", encode(sweep(0.5), "wav")[:30]), 400, "invalid_audio"),
    ("too long", {"model": WHISPER}, ("a.flac", encode(np.zeros(91 * SAMPLE_RATE, np.float32), "flac")), 413,
     "audio_too_long"),
    ("too large", {"model": WHISPER}, ("a.wav", bytes(44) + bytes(3 << 20)), 413, "audio_too_large"),
    ("a model without audio", {"model": TEXT}, ("a.wav", encode(sweep(0.5), "wav")), 400, "model_not_stt"),
    ("word timestamps from an omni model", {"model": OMNI, "response_format": "verbose_json",
                                            "timestamp_granularities[]": "word"},
     ("a.wav", encode(sweep(0.5), "wav")), 400, "invalid_value"),
    ("unknown model", {"model": "no-such-model"}, ("a.wav", encode(sweep(0.5), "wav")), 404, None),
])
def test_bad_uploads_get_4xx(sserver, name, fields, file, status, code):
    body, content_type = _multipart(fields, file)
    got, out = _post(sserver, "/v1/audio/transcriptions", body, content_type)
    assert got == status, (name, out)
    if code is not None:
        assert out["error"]["code"] == code, (name, out)
    assert out["error"]["message"]


def test_json_body_is_refused(sserver):
    got, out = _post(sserver, "/v1/audio/transcriptions", json.dumps({"model": WHISPER}).encode(), "application/json")
    assert got == 400 and out["error"]["code"] == "invalid_content_type"


def test_language_is_not_a_translation_field(sserver):
    body, content_type = _multipart({"model": WHISPER, "language": "en"}, ("a.wav", encode(sweep(0.5), "wav")))
    got, out = _post(sserver, "/v1/audio/translations", body, content_type)
    assert got == 400 and out["error"]["param"] == "language"


def test_health_lists_the_transcriber(oai, sserver):
    oai.audio.transcriptions.create(model=WHISPER, file=("clip.wav", encode(sweep(0.5), "wav")))
    loaded = sserver.health()["stt_models_loaded"][WHISPER]
    assert loaded["batches"] >= 1 and loaded["inputs"] >= 1 and loaded["memory_bytes"] > 0


def test_audio_urls_follow_the_media_policy(sserver):
    """Audio URLs are fetched inside the server's media URL policy, as images are: this
    server allows no local addresses, so a clip URL on the loopback is refused, unfetched."""
    body = {"model": OMNI, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": f"{sserver.root}/health"}}, {"type": "text", "text": "hi"}]}]}
    got, out = _post(sserver, "/v1/chat/completions", json.dumps(body).encode(), "application/json")
    assert got == 400 and out["error"]["code"] == "media_url_not_allowed", out
    assert out["error"]["param"] == "messages[0].content"
