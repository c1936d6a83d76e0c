"""Model management over HTTP on a real server with a small memory budget: status, load,
unload, LRU eviction, a streaming request holding its model, 507 when nothing can be evicted,
and LM Studio's `/api/v1/models` computed from the files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from omlx_process import call, omlx_server

from omlx.testing.tiny_models import TinyModelSpec, build_model

KV_CACHE_GB = 0.001  # ~1 MiB of KV pool per model
KV_BYTES = int(KV_CACHE_GB * 2**30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api-models")
    for seed, name in enumerate(("a", "b", "c")):
        build_model(root / name, TinyModelSpec(seed=seed))
    from mlx_lm import convert

    convert(str(root / "a"), mlx_path=str(root / "org" / "tiny-4bit"), quantize=True, q_bits=4, q_group_size=32)
    vision = build_model(root / "vision", TinyModelSpec())
    config = json.loads((vision / "config.json").read_text())
    (vision / "config.json").write_text(json.dumps({**config, "vision_config": {"depth": 1}}))
    (root / "torch-only").mkdir()
    (root / "torch-only" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "torch-only" / "pytorch_model.bin").write_bytes(b"\0")
    return root


def estimate(model_dir: Path, name: str) -> int:
    return (model_dir / name / "model.safetensors").stat().st_size + KV_BYTES


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    budget = int(estimate(model_dir, "a") * 2.5)  # two tiny models fit, not three
    workdir = tmp_path_factory.mktemp("models-api")
    (workdir / "home").mkdir()
    (workdir / "home" / "model_settings.json").write_text(json.dumps({"b": {"alias": "bee"}}))
    with omlx_server(model_dir, workdir, "--kv-cache-gb", str(KV_CACHE_GB),
                     "--max-model-memory", str(budget)) as running:
        yield running


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def status(server) -> dict[str, dict]:
    code, body = call(server, "GET", "/v1/models/status")
    assert code == 200
    return {m["id"]: m for m in body["models"]}


def unload_all(server) -> None:
    for model_id, entry in status(server).items():
        if entry["loaded"]:
            assert call(server, "POST", f"/v1/models/{model_id}/unload")[0] == 200


def eos_bias(model_dir: Path, name: str) -> dict[str, int]:
    eos = json.loads((model_dir / name / "config.json").read_text())["eos_token_id"]
    return {str(eos): -100}


def test_status_lists_every_model_with_its_type_and_limits(server, model_dir):
    code, body = call(server, "GET", "/v1/models/status")
    assert code == 200
    models = {m["id"]: m for m in body["models"]}
    assert {"a", "b", "c", "org/tiny-4bit", "vision"} <= set(models)
    assert models["vision"]["model_type"] == "vlm"
    assert models["b"]["alias"] == "bee"
    for name in ("a", "b", "c"):
        entry = models[name]
        assert entry["model_type"] == "llm"
        assert entry["max_context_window"] == 4096
        assert entry["max_tokens"] == 4096
        assert entry["size_bytes"] == (model_dir / name / "model.safetensors").stat().st_size
    unavailable = {Path(u["path"]).name: u["reason"] for u in body["unavailable"]}
    assert "PyTorch .bin" in unavailable["torch-only"]
    assert body["memory"]["budget_bytes"] == int(estimate(model_dir, "a") * 2.5)


def test_load_unload_and_lru_eviction(server, model_dir):
    unload_all(server)
    code, a = call(server, "POST", "/v1/models/a/load")
    assert code == 200 and a["loaded"] and 0 < a["memory_bytes"] <= estimate(model_dir, "a")
    assert call(server, "POST", "/v1/models/bee/load")[1]["id"] == "b"  # by alias
    call(server, "POST", "/v1/models/a/load")  # a is now more recently used than b
    code, c = call(server, "POST", "/v1/models/c/load")
    assert code == 200 and c["loaded"]

    loaded = {m for m, e in status(server).items() if e["loaded"]}
    assert loaded == {"a", "c"}
    memory = call(server, "GET", "/v1/models/status")[1]["memory"]
    assert memory["used_bytes"] <= memory["budget_bytes"]
    assert memory["evictions"] >= 1

    code, body = call(server, "POST", "/v1/models/c/unload")
    assert code == 200 and body["unloaded"] is True and body["loaded"] is False
    code, body = call(server, "POST", "/v1/models/c/unload")
    assert code == 200 and body["unloaded"] is False


def test_model_errors_are_api_shaped(server):
    code, body = call(server, "POST", "/v1/models/nope/load")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    code, body = call(server, "POST", "/v1/models/vision/load")
    assert code == 400 and body["error"]["code"] == "model_not_supported"
    assert "vlm" in body["error"]["message"]
    code, body = call(server, "POST", "/v1/models/nope/unload")
    assert code == 404 and body["error"]["param"] == "model"


def test_chat_on_an_embedding_model_is_a_400(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sentence-transformers/all-MiniLM-L6-v2",
                                       messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.code == "model_not_supported"


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_streaming_requests_hold_their_models_and_a_newcomer_gets_507(server, client, model_dir):
    unload_all(server)
    # Long generations (EOS forbidden); each is paused after its first chunk while the
    # test looks at the pool.
    streams = [
        client.completions.create(model=name, prompt="hello there", max_tokens=1900, stream=True,
                                  logit_bias=eos_bias(model_dir, name))
        for name in ("a", "b")
    ]
    try:
        for stream in streams:
            next(iter(stream))
        models = status(server)
        assert models["a"]["active_requests"] == 1 and models["b"]["active_requests"] == 1

        code, body = call(server, "POST", "/v1/models/a/unload")
        assert code == 409 and body["error"]["code"] == "model_busy"

        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="c", prompt="hi", max_tokens=2)
        assert info.value.status_code == 507
        assert info.value.code == "insufficient_memory"
        assert "in use or pinned: a (1 request(s)), b (1 request(s))" in info.value.message
        assert {m for m, e in status(server).items() if e["loaded"]} == {"a", "b"}
    finally:
        for stream in streams:
            stream.close()  # a disconnect: the handler ends and gives its lease back

    assert wait_until(lambda: all(e["active_requests"] == 0 for e in status(server).values()))
    result = client.completions.create(model="c", prompt="hi", max_tokens=2)
    assert result.model == "c" and result.usage.completion_tokens >= 1
    assert status(server)["c"]["loaded"]


def test_lmstudio_models_are_described_from_their_files(server, model_dir):
    unload_all(server)
    call(server, "POST", "/v1/models/a/load")
    code, body = call(server, "GET", "/api/v1/models")
    assert code == 200
    models = {m["key"]: m for m in body["models"]}

    params = sum(v.size for v in mx.load(str(model_dir / "a" / "model.safetensors")).values())
    a = models["a"]
    assert a["type"] == "llm"
    assert a["publisher"] == "local"
    assert a["architecture"] == "qwen3"
    assert a["format"] == "mlx"
    assert a["size_bytes"] == (model_dir / "a" / "model.safetensors").stat().st_size
    assert a["quantization"]["name"] == "f32"
    assert a["quantization"]["bits_per_weight"] == pytest.approx(32, rel=0.02)
    assert a["params_string"] == f"{params / 1e3:.0f}K"
    assert a["max_context_length"] == 4096
    assert a["capabilities"] == {"vision": False, "audio": False, "trained_for_tool_use": True,
                                "reasoning": True}
    assert [i["id"] for i in a["loaded_instances"]] == ["a"]
    assert a["loaded_instances"][0]["config"]["context_length"] == 4096

    quantized = models["org/tiny-4bit"]
    assert quantized["publisher"] == "org"
    assert quantized["display_name"] == "Tiny 4bit"
    assert quantized["quantization"]["name"] == "4bit"
    # Same logical weights as the model it was quantized from; ~4 bits each plus scales.
    assert quantized["params_string"] == a["params_string"]
    assert 4 < quantized["quantization"]["bits_per_weight"] < 8
    assert quantized["loaded_instances"] == []

    assert models["vision"]["type"] == "vlm"
    assert models["vision"]["capabilities"]["vision"] is True
    assert models["sentence-transformers/all-MiniLM-L6-v2"]["type"] == "embedding"
    assert models["sentence-transformers/all-MiniLM-L6-v2"]["params_string"] == "23M"


def test_lmstudio_load_and_unload(server):
    unload_all(server)
    code, body = call(server, "POST", "/api/v1/models/load", {"model": "bee"})
    assert code == 200 and body["instance_id"] == "b" and body["status"] == "loaded"
    assert status(server)["b"]["loaded"]
    code, body = call(server, "POST", "/api/v1/models/unload", {"instance_id": "b"})
    assert code == 200 and body == {"instance_id": "b"}
    assert not status(server)["b"]["loaded"]
    code, body = call(server, "POST", "/api/v1/models/load", {})
    assert code == 400 and body["error"]["param"] == "model"
