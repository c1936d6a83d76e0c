"""Audio in: clips decoded like mlx-vlm decodes them, an omni model's audio tower run at
prefill in the engine's batched pass, and audio content parts on the chat routes.

The model is a tiny random-weight Gemma 4 with an audio tower (omlx.testing.tiny_audio),
built from mlx-vlm's own classes; the clips (a sine sweep, noise, silence) are generated here
and encoded as WAV, FLAC and MP3 by libsndfile (soundfile), then decoded by the server's
path, which is mlx-vlm's.  The correctness bar: greedy tokens equal `mlx_vlm.generate` alone
on the same clip and prompt, whatever else is in flight and whether the prefix was cached.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx.audio.clips import SAMPLE_RATE, AudioError, AudioLimits, decode
from omlx.audio.prompt import AudioPromptError, prepare
from omlx.scheduler.engine import EngineConfig, LLMEngine
from omlx.scheduler.request import GenerationRequest
from omlx.testing.tiny_audio import TinyAudioSpec, build_audio_model
from omlx.vision.encoder import LanguageAdapter, PassInputs

MAX_TOKENS = 8


# ---------------------------------------------------------------------------- clips
def sweep(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t)).astype(np.float32)


def noise(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * rate)).astype(np.float32)


def silence(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def encode(samples: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt.upper())
    return out.getvalue()


CLIPS = {
    "sweep": lambda: sweep(1.3),
    "noise": lambda: noise(0.7),
    "silence": lambda: silence(0.5),
    "long-sweep": lambda: sweep(2.1),
}


def clip_bytes(name: str, fmt: str = "wav") -> bytes:
    return encode(CLIPS[name](), fmt)


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
@pytest.mark.slow
def test_decode_gives_mlx_vlm_samples(fmt):
    from mlx_vlm.utils import load_audio

    data = encode(sweep(1.0, 44_100), fmt, 44_100)  # resampled to 16 kHz on the way
    clip = decode(data, "input_audio")
    reference = load_audio(io.BytesIO(data), sr=SAMPLE_RATE)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert np.array_equal(clip.samples, reference)
    assert abs(clip.seconds - 1.0) < 0.1


def test_stereo_is_mixed_down():
    left, right = sweep(0.5), noise(0.5)
    clip = decode(encode(np.stack([left, right], axis=1), "wav"), "x")
    assert clip.samples.shape == (len(left),)
    np.testing.assert_allclose(clip.samples, (left + right) / 2, atol=1e-4)


def test_digest_follows_the_samples_not_the_bytes():
    wav = decode(clip_bytes("sweep", "wav"), "x")
    # The same samples in a file with extra metadata chunks: other bytes, the same clip.
    import soundfile

    out = io.BytesIO()
    with soundfile.SoundFile(out, "w", SAMPLE_RATE, 1, format="WAV", subtype="PCM_16") as f:
        f.comment = "recorded by a test"
        f.write(sweep(1.3))
    tagged = out.getvalue()
    assert tagged != clip_bytes("sweep", "wav")
    assert decode(tagged, "x").digest == wav.digest
    assert decode(clip_bytes("noise", "wav"), "x").digest != wav.digest


@pytest.mark.parametrize("data, code", [
    (b"", "invalid_audio"),
    (b"this is not audio at all, just text" * 4, "unsupported_audio_format"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "unsupported_audio_format"),
])
def test_bad_clips_are_refused(data, code):
    with pytest.raises(AudioError) as info:
        decode(data, "messages[0].content[0]")
    assert info.value.code == code and info.value.status == 400
    assert info.value.param == "messages[0].content[0]"


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_truncated_clips_are_refused_or_shorter(fmt):
    """A clip cut short either fails to decode (400 invalid_audio) or decodes to what is there;
    it never raises anything else."""
    data = clip_bytes("sweep", fmt)
    for cut in (12, 44, len(data) // 3):
        try:
            clip = decode(data[:cut], "x")
        except AudioError as exc:
            assert exc.status == 400
        else:
            assert 0 < clip.seconds <= 1.3 + 0.1


def test_container_formats_need_ffmpeg():
    """Ogg Vorbis decodes through ffmpeg only: without it, a clear 400 naming what is taken."""
    import shutil

    data = encode(sweep(0.5), "ogg")
    if shutil.which("ffmpeg"):
        assert decode(data, "x").seconds == pytest.approx(0.5, abs=0.05)
        return
    with pytest.raises(AudioError) as info:
        decode(data, "x")
    assert info.value.code == "unsupported_audio_format" and "wav, mp3, flac" in info.value.message


def test_limits():
    data = clip_bytes("long-sweep")
    with pytest.raises(AudioError) as info:
        decode(data, "x", AudioLimits(max_seconds=1.0))
    assert (info.value.code, info.value.status) == ("audio_too_long", 413)
    with pytest.raises(AudioError) as info:
        decode(data, "x", AudioLimits(max_bytes=1000))
    assert (info.value.code, info.value.status) == ("audio_too_large", 413)


# ---------------------------------------------------------------------------- the engine
class Omni:
    """The tiny Gemma 4 loaded with mlx-vlm, its prompts and their reference answers."""

    def __init__(self, path):
        from mlx_vlm import load

        self.model, self.processor = load(str(path))
        self.eos = set(self.model.config.eos_token_id)
        self.audio_token = self.model.config.audio_token_id
        self._references: dict = {}

    def template(self, clip: str | None, words: int) -> str:
        text = "what is in this clip" + " and the cat" * words
        content = ([{"type": "audio"}] if clip else []) + [{"type": "text", "text": text}]
        return self.processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content if clip else text}], add_generation_prompt=True, tokenize=False)

    def prompt(self, clip: str | None, words: int, fmt: str = "wav"):
        """(ids, multimodal, reference tokens) of a user turn with this clip."""
        template = self.template(clip, words)
        clips = [decode(clip_bytes(clip, fmt), "audio")] if clip else []
        if clips:
            ids, multimodal = prepare(self.processor, None, self.audio_token, template, [], clips)
        else:
            ids, multimodal = self.processor.tokenizer.encode(template, add_special_tokens=False), None
        key = (clip, words, fmt)
        if key not in self._references:
            self._references[key] = self.reference(template, [c.samples for c in clips])
        return ids, multimodal, self._references[key]

    def reference(self, prompt: str, audio: list) -> list[int]:
        from mlx_vlm import stream_generate

        tokens = []
        for result in stream_generate(self.model, self.processor, prompt, audio=audio or None,
                                      max_tokens=MAX_TOKENS, temperature=0.0):
            if result.token in self.eos:
                break
            tokens.append(result.token)
        return tokens[:MAX_TOKENS]


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return Omni(build_audio_model(tmp_path_factory.mktemp("omni") / "gemma4-audio"))


def _engine(omni: Omni, budget: int = 64, num_blocks: int = 96, block_size: int = 8, vision_prompts: int = 1):
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                          max_vision_prompts_per_step=vision_prompts)
    return LLMEngine(LanguageAdapter(omni.model), config, context_window=4096, vision=PassInputs(omni.model))


def _run(engine, requests) -> dict[str, list[int]]:
    pending = sorted(requests, key=lambda r: r[0])
    out = {r.request_id: [] for _, r in requests}
    step = 0
    while pending or engine.has_work:
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        for request_id, event in engine.step():
            assert event.error is None, event.error
            if event.token_id is not None:
                out[request_id].append(event.token_id)
        step += 1
    return out


def test_prompt_places_one_token_per_40ms(omni):
    ids, multimodal, _ = omni.prompt("sweep", 0)
    (span,) = multimodal.spans
    assert span.end - span.start == 33  # ceil(1300 ms / 40 ms)
    assert all(t == omni.audio_token for t in ids[span.start:span.end])
    assert set(multimodal.arrays) >= {"input_features", "input_features_mask"}


def test_audio_tokens_in_message_text_are_refused(omni):
    template = omni.template("sweep", 0).replace("what is", "<|audio|> what is")
    clip = decode(clip_bytes("sweep"), "audio")
    with pytest.raises(AudioPromptError):
        prepare(omni.processor, None, omni.audio_token, template, [], [clip])


def test_clips_change_the_answer(omni):
    """The features reach the answer: four clips, four greedy answers (so the exactness tests
    below would see a clip dropped or misplaced)."""
    answers = {name: omni.prompt(name, 2)[2] for name in CLIPS}
    assert len({tuple(a) for a in answers.values()}) == len(CLIPS), answers


@pytest.mark.usefixtures("attention_kernel")  # the fused kernel and the portable path
@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_one_clip_matches_mlx_vlm(omni, fmt):
    ids, multimodal, reference = omni.prompt("sweep", 1, fmt)
    engine = _engine(omni)
    assert _run(engine, [(0, GenerationRequest("a", ids, MAX_TOKENS, multimodal=multimodal))]) == {"a": reference}
    assert engine.runner.vision.clips_encoded == 1
    assert engine.blocks.leaked_blocks() == []


request_plans = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from([None, "sweep", "noise", "silence", "long-sweep"]),
              st.integers(0, 3)),
    min_size=2, max_size=5,
)


@pytest.mark.usefixtures("attention_kernel")  # the fused kernel and the portable path
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=request_plans, budget=st.integers(5, 96), num_blocks=st.integers(40, 120), repeat=st.booleans(),
       vision_prompts=st.integers(1, 3))
@pytest.mark.slow
def test_mixed_requests_match_mlx_vlm_alone(omni, plan, budget, num_blocks, repeat, vision_prompts):
    """Clips of different lengths and text prompts, arriving at any step, under any step budget
    (prefill chunks ending inside a clip's tokens), pool size and prefix-cache state."""
    engine = _engine(omni, budget, num_blocks, vision_prompts=vision_prompts)
    for round_ in range(2 if repeat else 1):
        requests, expected = [], {}
        for k, (arrival, clip, words) in enumerate(plan):
            ids, multimodal, reference = omni.prompt(clip, words)
            rid = f"{round_}-{k}"
            requests.append((arrival, GenerationRequest(rid, ids, MAX_TOKENS, multimodal=multimodal)))
            expected[rid] = reference
        assert _run(engine, requests) == expected
        assert engine.blocks.leaked_blocks() == []


def test_several_clips_of_different_lengths_take_their_own_features(omni):
    """Three clips of different lengths in one prompt: each clip's audio rows are exactly the
    rows mlx-vlm computes for a prompt holding that clip alone (its padded batch would give
    the second clip the first one's padding), and the engine's answer uses those rows."""
    import mlx.core as mx

    from omlx.audio import clip_features

    names = ["long-sweep", "silence", "noise"]
    clips = [decode(clip_bytes(name), "audio") for name in names]
    content = [part for _ in names for part in ({"type": "audio"}, {"type": "text", "text": "and"})]
    template = omni.processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True, tokenize=False)
    ids, multimodal = prepare(omni.processor, None, omni.audio_token, template, [], clips)
    spans = clip_features.audio_spans(multimodal.spans)
    assert [s.end - s.start for s in spans] == [53, 13, 18]
    rows = clip_features.clip_rows(omni.model, multimodal.arrays, multimodal.spans)
    for clip, span, got in zip(clips, spans, rows):
        one = omni.processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "x"}]}],
            add_generation_prompt=True, tokenize=False)
        one_ids, one_mm = prepare(omni.processor, None, omni.audio_token, one, [], [clip])
        arrays = {k: mx.array(v) for k, v in one_mm.arrays.items()}
        embedded = omni.model.get_input_embeddings(mx.array(one_ids)[None], None, **arrays).inputs_embeds[0]
        (one_span,) = one_mm.spans
        np.testing.assert_array_equal(np.array(got), np.array(embedded[one_span.start:one_span.end]))
    engine = _engine(omni, budget=48)
    assert _run(engine, [(0, GenerationRequest("a", ids, MAX_TOKENS, multimodal=multimodal))])["a"]
    assert engine.runner.vision.clips_encoded == 3


@pytest.mark.parametrize("samples", [641, 20_481])
def test_clips_one_feature_short_match_mlx_vlm(omni, samples):
    """At these lengths the processor counts one audio token more than the tower gives
    features (ceil(ms / 40) against the frames' subsampling); mlx-vlm's scatter wraps round
    to the first rows.  Alone and among other clips, a clip gives what mlx-vlm gives it."""
    import mlx.core as mx

    from omlx.audio import clip_features

    data = encode(sweep(samples / SAMPLE_RATE), "wav")
    clip = decode(data, "audio")
    assert len(clip.samples) == samples
    template = omni.template("sweep", 1)
    ids, multimodal = prepare(omni.processor, None, omni.audio_token, template, [], [clip])
    expected = omni.reference(template, [clip.samples])
    engine = _engine(omni)
    assert _run(engine, [(0, GenerationRequest("a", ids, MAX_TOKENS, multimodal=multimodal))]) == {"a": expected}
    # Among other clips: the same rows as alone.
    others = [decode(clip_bytes("noise"), "audio"), clip]
    content = [{"type": "audio"}, {"type": "text", "text": "and"}] * 2
    both = omni.processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                        add_generation_prompt=True, tokenize=False)
    _, several = prepare(omni.processor, None, omni.audio_token, both, [], others)
    rows = clip_features.clip_rows(omni.model, several.arrays, several.spans)[1]
    arrays = {k: mx.array(v) for k, v in multimodal.arrays.items()}
    alone = omni.model.get_input_embeddings(mx.array(ids)[None], None, **arrays).inputs_embeds[0]
    (span,) = multimodal.spans
    np.testing.assert_array_equal(np.array(rows), np.array(alone[span.start:span.end]))


def test_per_layer_inputs_model_matches_mlx_vlm(tmp_path):
    """Gemma 4 E2B / E4B (the checkpoints with audio towers) add per-layer token embeddings,
    which mlx-vlm looks up with every audio position as token 0: clips and text in one batch
    still give mlx-vlm's tokens."""
    per_layer = Omni(build_audio_model(tmp_path / "ple", TinyAudioSpec(per_layer_inputs=True, seed=2)))
    requests, expected = [], {}
    for k, (clip, words) in enumerate([("sweep", 1), (None, 2), ("noise", 0), ("long-sweep", 3)]):
        ids, multimodal, reference = per_layer.prompt(clip, words)
        requests.append((k, GenerationRequest(f"r{k}", ids, MAX_TOKENS, multimodal=multimodal)))
        expected[f"r{k}"] = reference
    engine = _engine(per_layer, budget=24)
    assert engine.runner.vision.per_layer
    assert _run(engine, requests) == expected
    assert engine.blocks.leaked_blocks() == []


def test_pass_inputs_are_mlx_vlms_input_embeddings(tmp_path):
    """The rows a pass feeds a Gemma 4 with per-layer inputs are exactly mlx-vlm's own
    get_input_embeddings: the clip's features, the text rows scaled, and the per-layer token
    embeddings looked up with every audio position as token 0 (both the paged pass and the
    fallback engine's prompt chunks)."""
    from types import SimpleNamespace

    import mlx.core as mx

    model = Omni(build_audio_model(tmp_path / "ple", TinyAudioSpec(per_layer_inputs=True, seed=2)))
    ids, multimodal, _ = model.prompt("sweep", 1)
    arrays = {k: mx.array(v) for k, v in multimodal.arrays.items()}
    reference = model.model.get_input_embeddings(mx.array(ids)[None], None, **arrays)
    inputs = PassInputs(model.model)
    seq = SimpleNamespace(request=SimpleNamespace(multimodal=multimodal), token_ids=ids, num_prompt_tokens=len(ids),
                          num_computed_tokens=0)
    tokens = np.asarray(ids)
    extra = inputs.for_pass([seq], [0], [len(ids)], tokens, np.arange(len(ids)))
    np.testing.assert_array_equal(np.array(extra["inputs_embeds"][:, 0]), np.array(reference.inputs_embeds[0]))
    np.testing.assert_array_equal(np.array(extra["per_layer_inputs"][:, 0]), np.array(reference.per_layer_inputs[0]))
    multimodal.embeddings = None
    chunk = inputs.prompt_chunk(seq, 5, 40)
    np.testing.assert_array_equal(np.array(chunk["inputs_embeds"][0]), np.array(reference.inputs_embeds[0, 5:45]))
    np.testing.assert_array_equal(np.array(chunk["per_layer_inputs"][0]), np.array(reference.per_layer_inputs[0, 5:45]))


@pytest.mark.slow
def test_e2b_shaped_model_takes_audio_on_the_fallback_engine(tmp_path):
    """A Gemma 4 shaped like the E2B / E4B checkpoints (wider full-attention heads, layers that
    read an earlier layer's KV, per-layer inputs) is refused by the paged engine and served by
    the fallback engine over mlx-vlm's own caches: clips and text in flight together still
    give mlx-vlm's tokens."""
    from omlx.scheduler.fallback_engine import FallbackEngine
    from omlx.scheduler.layer_kinds import UnsupportedLayout

    spec = TinyAudioSpec(num_hidden_layers=4, global_head_dim=32, kv_shared_layers=2, per_layer_inputs=True, seed=3)
    e2b = Omni(build_audio_model(tmp_path / "e2b", spec))
    config = EngineConfig(block_size=8, num_blocks=96, max_num_batched_tokens=24)
    with pytest.raises(UnsupportedLayout) as refused:
        LLMEngine(LanguageAdapter(e2b.model), config, context_window=4096, vision=PassInputs(e2b.model))
    engine = FallbackEngine(LanguageAdapter(e2b.model), config, context_window=4096, reason=str(refused.value),
                            vision=PassInputs(e2b.model))
    requests, expected = [], {}
    for k, (clip, words) in enumerate([("sweep", 1), (None, 2), ("noise", 0), ("long-sweep", 3)]):
        ids, multimodal, reference = e2b.prompt(clip, words)
        requests.append((k, GenerationRequest(f"r{k}", ids, MAX_TOKENS, multimodal=multimodal)))
        expected[f"r{k}"] = reference
    assert _run(engine, requests) == expected
    assert engine.runner.vision.clips_encoded == 3


@pytest.mark.usefixtures("attention_kernel")  # the fused kernel and the portable path
def test_repeated_clip_hits_the_prefix_cache_and_another_never_does(omni):
    engine = _engine(omni, budget=512)
    ids, multimodal, reference = omni.prompt("sweep", 3)
    assert _run(engine, [(0, GenerationRequest("a", ids, MAX_TOKENS, multimodal=multimodal))]) == {"a": reference}
    calls = engine.runner.vision.vision_calls
    # The same clip again: every full block through the clip is cached; the tower does not run.
    ids, multimodal, reference = omni.prompt("sweep", 3)
    before = engine.kv_stats()["prefix_cache_hit_tokens"]
    assert _run(engine, [(0, GenerationRequest("b", ids, MAX_TOKENS, multimodal=multimodal))]) == {"b": reference}
    assert engine.kv_stats()["prefix_cache_hit_tokens"] - before >= multimodal.spans[0].end - 8
    assert engine.runner.vision.vision_calls == calls
    # Another clip of the same length has the same token ids: no block from the clip's on hits.
    template = omni.template("sweep", 3)
    clip = decode(encode(noise(1.3, seed=5), "wav"), "audio")
    other_ids, other = prepare(omni.processor, None, omni.audio_token, template, [], [clip])
    assert other_ids == ids
    expected = omni.reference(template, [clip.samples])
    before = engine.kv_stats()["prefix_cache_hit_tokens"]
    assert _run(engine, [(0, GenerationRequest("c", other_ids, MAX_TOKENS, multimodal=other))]) == {"c": expected}
    assert engine.kv_stats()["prefix_cache_hit_tokens"] - before <= other.spans[0].start
    assert engine.runner.vision.vision_calls == calls + 1
    assert engine.blocks.leaked_blocks() == []


# ---------------------------------------------------------------------------- the server
# A tiny Gemma 4 with an audio tower (it has a vision tower too), the same family without an
# audio tower, and a text LLM, served by a real `omlx serve`; requests through the openai SDK.
OMNI, NO_AUDIO, TEXT = "tiny-gemma4-audio", "tiny-gemma4-vision", "tiny-text"
FETCH_TIMEOUT_S = 1.5
MAX_SECONDS = 3.0
PROMPT = "what do you hear in this clip"


class _ClipHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/clip/"):
            body = clip_bytes(self.path.rsplit("/", 1)[1], "mp3")
            self.send_response(200)
            self.send_header("Content-Type", "audio/mpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/slow":
            time.sleep(FETCH_TIMEOUT_S * 3)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def clip_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ClipHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def audio_models(tmp_path_factory):
    from omlx.testing.tiny_models import TinyModelSpec, build_model

    root = tmp_path_factory.mktemp("audio-models")
    build_audio_model(root / OMNI)
    build_audio_model(root / NO_AUDIO, TinyAudioSpec(with_audio=False, seed=1))
    build_model(root / TEXT, TinyModelSpec())
    return root


@pytest.fixture(scope="module")
def aserver(audio_models, tmp_path_factory):
    from omlx_process import omlx_server

    # The clip host is a local server: this server may fetch from local addresses (refused by
    # default: tests/test_transcriptions.py, test_audio_urls_follow_the_media_policy).
    local = ["--allow-local-media-urls"]
    env = {"OMLX_AUDIO_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S)}
    # A small step budget: clip prompts are prefilled in several chunks, some ending inside
    # a clip's tokens.
    with omlx_server(audio_models, tmp_path_factory.mktemp("audio-server"), "--kv-cache-gb", "0.05",
                     "--max-num-batched-tokens", "24", "--audio-max-seconds", str(MAX_SECONDS),
                     "--audio-max-bytes", "200KB", *local, env=env, block_size=16,
                     failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def oai(aserver):
    import openai

    with openai.OpenAI(base_url=aserver.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


_loaded: dict = {}


def reference_text(path, messages: list[dict], clips: list[bytes], max_tokens: int, images=()) -> str:
    """What `mlx_vlm.generate` answers, greedy and alone, to the chat-templated messages and
    the clips decoded by mlx-vlm's own `load_audio`."""
    from mlx_vlm import generate, load
    from mlx_vlm.utils import load_audio

    key = str(path)
    if key not in _loaded:
        _loaded[key] = load(key)
    model, processor = _loaded[key]
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    audio = [load_audio(io.BytesIO(c), sr=SAMPLE_RATE) for c in clips] or None
    pictures = None
    if images:
        from PIL import Image

        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    result = generate(model, processor, prompt, audio=audio, image=pictures, max_tokens=max_tokens,
                      temperature=0.0, verbose=False)
    eos = set(model.config.eos_token_id)
    tokens = []
    for token in result.token_ids:
        if token in eos:
            break
        tokens.append(token)
    return processor.tokenizer.decode(tokens)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_message(clip: str, fmt: str = "wav", text: str = PROMPT, form: str = "input_audio") -> tuple[dict, dict]:
    """(OpenAI chat message, template message) with this clip then the text."""
    data = clip_bytes(clip, fmt)
    if form == "input_audio":
        part = {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}
    else:  # mlx-vlm's server form
        media = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}[fmt]
        part = {"type": "audio_url", "audio_url": {"url": f"data:{media};base64,{b64(data)}"}}
    return ({"role": "user", "content": [part, {"type": "text", "text": text}]},
            {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]})


@pytest.mark.parametrize("fmt, form", [("wav", "input_audio"), ("flac", "input_audio"), ("mp3", "input_audio"),
                                       ("wav", "audio_url")])
def test_chat_clip_matches_mlx_vlm(oai, aserver, fmt, form):
    wire, template = audio_message("sweep", fmt, form=form)
    response = oai.chat.completions.create(model=OMNI, messages=[wire], max_tokens=10, temperature=0)
    expected = reference_text(aserver.model_path(OMNI), [template], [clip_bytes("sweep", fmt)], 10)
    assert response.choices[0].message.content == expected


def test_responses_input_audio(oai, aserver):
    data = clip_bytes("noise", "flac")
    response = oai.responses.create(model=OMNI, max_output_tokens=8, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(data), "format": "flac"}},
                                    {"type": "input_text", "text": PROMPT}]}])
    template = {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]}
    assert response.output_text == reference_text(aserver.model_path(OMNI), [template], [data], 8)


def test_responses_history_keeps_its_clip(oai, aserver):
    """A stored response's clip is part of the conversation a follow-up replays
    (previous_response_id): the follow-up answers as mlx-vlm does to the whole history, and
    the replayed prefix, clip included, comes from the cache."""
    data = clip_bytes("sweep", "wav")
    first = oai.responses.create(model=OMNI, max_output_tokens=6, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}},
                                    {"type": "input_text", "text": PROMPT}]}])
    follow = oai.responses.create(model=OMNI, max_output_tokens=6, temperature=0, previous_response_id=first.id,
                                  input="and again")
    template = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "and again"}]
    assert follow.output_text == reference_text(aserver.model_path(OMNI), template, [data], 6)
    assert follow.usage.input_tokens_details.cached_tokens >= 32


def test_http_clip_url(oai, aserver, clip_host):
    response = oai.chat.completions.create(model=OMNI, max_tokens=8, temperature=0, messages=[{
        "role": "user", "content": [{"type": "audio_url", "audio_url": {"url": f"{clip_host}/clip/silence"}},
                                    {"type": "text", "text": PROMPT}]}])
    template = {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]}
    expected = reference_text(aserver.model_path(OMNI), [template], [clip_bytes("silence", "mp3")], 8)
    assert response.choices[0].message.content == expected


def test_concurrent_clips_images_and_text_match_alone(aserver):
    """Clips of four lengths (mlx-vlm's own server stacks their features and fails), an image
    and text requests in flight together, arriving staggered: each answer equals the model's
    answer alone."""
    import openai
    from PIL import Image

    picture = io.BytesIO()
    Image.fromarray((np.random.RandomState(3).rand(64, 80, 3) * 255).astype(np.uint8)).save(picture, "PNG")
    picture = picture.getvalue()
    cases = []
    for k, (clip, fmt) in enumerate([("sweep", "wav"), ("noise", "mp3"), ("long-sweep", "flac"), ("silence", "wav")]):
        wire, template = audio_message(clip, fmt, PROMPT + " now" * k)
        cases.append(([wire], [template], [clip_bytes(clip, fmt)], []))
    image_wire = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(picture)}},
        {"type": "text", "text": "what is in the picture"}]}
    image_template = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture"}]}
    cases.append(([image_wire], [image_template], [], [picture]))
    for text in ("tell me about the river and the mountain", "the cat and the model"):
        message = {"role": "user", "content": text}
        cases.append(([message], [message], [], []))

    async def run():
        async with openai.AsyncOpenAI(base_url=aserver.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            async def one(k, messages):
                await asyncio.sleep(0.1 * k)
                r = await c.chat.completions.create(model=OMNI, messages=messages, max_tokens=10, temperature=0)
                return r.choices[0].message.content
            return await asyncio.gather(*(one(k, w) for k, (w, _, _, _) in enumerate(cases)))

    answers = asyncio.run(run())
    for (_, template, clips, images), answer in zip(cases, answers):
        assert answer == reference_text(aserver.model_path(OMNI), template, clips, 10, images), template


def test_repeated_clip_reports_cached_tokens(oai, aserver):
    wire, template = audio_message("long-sweep", "wav", "tell me what you hear, in a few words")
    first = oai.chat.completions.create(model=OMNI, messages=[wire], max_tokens=8, temperature=0)
    again = oai.chat.completions.create(model=OMNI, messages=[wire], max_tokens=8, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 48  # the clip is 53 tokens, blocks of 16
    # Another clip of the same length: the same token ids, but nothing past the clip's start hits.
    other = encode(noise(2.1, seed=9), "wav")
    part = {"type": "input_audio", "input_audio": {"data": b64(other), "format": "wav"}}
    response = oai.chat.completions.create(model=OMNI, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [part, wire["content"][1]]}])
    assert response.usage.prompt_tokens_details.cached_tokens == 0  # the clip starts in the first block
    assert response.choices[0].message.content == reference_text(aserver.model_path(OMNI), [template], [other], 8)


def test_status_says_which_models_take_audio(aserver):
    def get(path):
        with urllib.request.urlopen(aserver.root + path, timeout=10) as r:
            return json.loads(r.read())

    status = {m["id"]: m for m in get("/v1/models/status")["models"]}
    assert status[OMNI]["audio"] is True and status[OMNI]["vision"] is True
    assert status[NO_AUDIO]["audio"] is False and status[TEXT]["audio"] is False
    lm = {m["key"]: m for m in get("/api/v1/models")["models"]}
    assert lm[OMNI]["capabilities"]["audio"] is True
    assert lm[NO_AUDIO]["capabilities"]["audio"] is False


# ---------------------------------------------------------------------------- bad input
def _post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.root + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _chat_with(part: dict, model: str = OMNI) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        part, {"type": "text", "text": "hi"}]}]}


def _input_audio(data, fmt="wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data if isinstance(data, str) else b64(data), "format": fmt}}


def bad_inputs(clip_host) -> list[tuple[str, dict, int, str]]:
    wav = clip_bytes("sweep", "wav")
    return [
        ("corrupt base64", _input_audio("@@@not-base64@@@"), 400, "invalid_audio"),
        ("not audio", _input_audio(b"hello, this is not audio at all" * 3), 400, "unsupported_audio_format"),
        ("an image", _input_audio(b"\x89PNG\r\n\x1a\n" + bytes(100)), 400, "unsupported_audio_format"),
        ("truncated header", _input_audio(wav[:30]), 400, "invalid_audio"),
        ("shorter than a feature frame", _input_audio(encode(sweep(0.01), "wav")), 400, "invalid_audio"),
        ("unsupported format", _input_audio(wav, "aiff-c-raw"), 400, "unsupported_audio_format"),
        ("no data", {"type": "input_audio", "input_audio": {"format": "wav"}}, 400, "invalid_audio"),
        ("over the duration limit", _input_audio(encode(silence(MAX_SECONDS + 1), "flac"), "flac"), 413,
         "audio_too_long"),
        ("over the byte limit", _input_audio(encode(noise(MAX_SECONDS - 0.1, rate=48_000), "wav", 48_000)), 413,
         "audio_too_large"),
        ("url 404", {"type": "audio_url", "audio_url": {"url": f"{clip_host}/missing.wav"}}, 400,
         "audio_fetch_failed"),
        ("url timeout", {"type": "audio_url", "audio_url": {"url": f"{clip_host}/slow"}}, 400,
         "audio_fetch_timeout"),
        ("file path", {"type": "audio_url", "audio_url": {"url": "/etc/passwd"}}, 400, "invalid_audio"),
    ]


def test_bad_clips_get_4xx_while_others_are_served(aserver, clip_host):
    """Every bad clip is a clear 4xx (OpenAI shape), and a good request in flight at the same
    time is answered as if alone."""
    wire, template = audio_message("noise", "wav", "and now, what is this")
    results: dict = {}

    def good():
        results["good"] = _post(aserver, "/v1/chat/completions",
                                {"model": OMNI, "max_tokens": 10, "temperature": 0, "messages": [wire]})

    thread = threading.Thread(target=good)
    thread.start()
    for name, part, status, code in bad_inputs(clip_host):
        got_status, body = _post(aserver, "/v1/chat/completions", _chat_with(part))
        assert got_status == status, (name, body)
        assert body["error"]["code"] == code, (name, body)
        assert body["error"]["param"].startswith("messages[0].content"), (name, body)
        assert body["error"]["message"]
    thread.join()
    status, body = results["good"]
    assert status == 200
    assert body["choices"][0]["message"]["content"] == reference_text(
        aserver.model_path(OMNI), [template], [clip_bytes("noise", "wav")], 10)


@pytest.mark.parametrize("model", [NO_AUDIO, TEXT])
def test_audio_to_a_model_without_an_audio_tower_is_refused(aserver, model):
    status, body = _post(aserver, "/v1/chat/completions", _chat_with(_input_audio(clip_bytes("sweep")), model))
    assert status == 400 and body["error"]["code"] == "unsupported_content", body
    assert "audio" in body["error"]["message"]


def test_two_clips_in_a_conversation(oai, aserver):
    """Clips in two user turns of one conversation (of equal length, where mlx-vlm's own
    batch of clips is right too): the answer equals mlx_vlm.generate's."""
    first, second = encode(sweep(1.2), "wav"), encode(noise(1.2, seed=4), "flac")
    messages = [
        {"role": "user", "content": [_input_audio(first), {"type": "text", "text": "remember this"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [_input_audio(second, "flac"), {"type": "text", "text": PROMPT}]}]
    template = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "remember this"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]}]
    response = oai.chat.completions.create(model=OMNI, messages=messages, max_tokens=10, temperature=0)
    assert response.choices[0].message.content == reference_text(aserver.model_path(OMNI), template,
                                                                 [first, second], 10)


def test_one_clip_families_refuse_a_second_clip():
    from omlx.audio.prompt import max_clips

    assert max_clips("gemma3n") == 1  # mlx-vlm's merge, not replaced for this family yet
    assert max_clips("gemma4") is None  # omlx.audio.clip_features


def test_audio_token_spelled_in_text_is_refused(aserver):
    body = _chat_with(_input_audio(clip_bytes("sweep")))
    body["messages"][0]["content"][1]["text"] = "look <|audio|> here"
    status, out = _post(aserver, "/v1/chat/completions", body)
    assert status == 400 and out["error"]["code"] == "invalid_audio", out
    status, _ = _post(aserver, "/v1/chat/completions", _chat_with(_input_audio(clip_bytes("sweep"))))
    assert status == 200


@pytest.mark.slow
def test_audio_limits_from_flags_env_and_defaults():
    from omlx.cli import build_parser, resolve_options, serving_limits

    limits = serving_limits(resolve_options(build_parser().parse_args(["serve", "--audio-max-seconds", "30"])))
    assert limits.audio == AudioLimits(max_seconds=30.0)
