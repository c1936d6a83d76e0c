"""Audio in: clips decoded like mlx-vlm decodes them, an omni model's audio tower run at
prefill in the engine's batched pass, and audio content parts on the chat routes.

The model is a tiny random-weight Gemma 4 with an audio tower (omlx.testing.tiny_audio),
built from mlx-vlm's own classes; the clips (a sine sweep, noise, silence) are generated here
and encoded as WAV, FLAC and MP3 by libsndfile (soundfile), then decoded by the server's
path, which is mlx-vlm's.  The correctness bar: greedy tokens equal `mlx_vlm.generate` alone
on the same clip and prompt, whatever else is in flight and whether the prefix was cached.
"""

from __future__ import annotations

import base64
import io

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

# The engine invariants hold with the fused attention kernel and with the portable path.
pytestmark = pytest.mark.usefixtures("attention_kernel")

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


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=request_plans, budget=st.integers(5, 96), num_blocks=st.integers(40, 120), repeat=st.booleans(),
       vision_prompts=st.integers(1, 3))
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
