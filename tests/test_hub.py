"""`omlx pull` against a local server imitating the hub's file API (HF_ENDPOINT), and serving
MLX models straight from a Hugging Face cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from fake_hub import FakeHub, RunningHub

from omlx.models.discovery import default_hf_cache_dir, discover_hf_cache
from omlx.models.pool import ModelNotFound, ModelPool
from omlx.scheduler import EngineConfig
from omlx.settings import SettingsStore
from omlx.testing.tiny_models import TinyModelSpec, build_model

# ~27 MB of weights: big enough that a connection dropped after 16 MB leaves a 10 MB chunk
# on disk for the next attempt to resume from.
PULL_SPEC = TinyModelSpec(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub-repo")
    build_model(root, PULL_SPEC)
    (root / "pytorch_model.bin").write_bytes(b"\0" * 1000)  # duplicate weights a pull must skip
    (root / "model-q4.gguf").write_bytes(b"GGUF")
    return root


def run_cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMLX_", "HF_"))}
    return subprocess.run([sys.executable, "-m", "omlx", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_pull_downloads_the_serving_files_and_resumes_a_dropped_transfer(hub_repo, tmp_path):
    hub = FakeHub({"mlx-community/tiny-chat": hub_repo}, fail_once={"model.safetensors": 16 << 20})
    with RunningHub(hub):
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "OMLX_HOME": str(tmp_path / "home")}
        result = run_cli("pull", "mlx-community/tiny-chat", "--model-dir", str(tmp_path / "models"),
                         env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "models" / "mlx-community" / "tiny-chat"
    assert "mlx-community/tiny-chat: llm model" in result.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert sha256(folder / name) == sha256(hub_repo / name)
    assert not (folder / "pytorch_model.bin").exists()
    assert not (folder / "model-q4.gguf").exists()
    weights = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    # The first transfer broke off; the retry asked only for the rest.
    assert len(weights) == 2 and weights[0].range is None
    assert weights[1].range is not None and weights[1].range.startswith("bytes=") and weights[1].range != "bytes=0-"
    assert "Trying to resume download" in result.stderr


def test_pulled_model_is_served_without_restart(hub_repo, tmp_path, monkeypatch):
    from omlx.hub import pull

    pool = ModelPool([tmp_path / "models"], EngineConfig(), memory_budget=1 << 30,
                     settings=SettingsStore(tmp_path / "home"))
    with pytest.raises(ModelNotFound):
        pool.resolve("org/pulled")
    with RunningHub(FakeHub({"org/pulled": hub_repo})) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        folder = pull("org/pulled", tmp_path / "models")
    assert folder == tmp_path / "models" / "org" / "pulled"
    assert pool.resolve("org/pulled").model_type == "llm"  # picked up by the rescan


@pytest.mark.slow
def test_pull_errors_are_plain_messages(hub_repo, tmp_path):
    with RunningHub(FakeHub({"org/exists": hub_repo})) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "OMLX_HOME": str(tmp_path / "home")}
        missing = run_cli("pull", "org/missing", "--model-dir", str(tmp_path / "m"), env=env, cwd=tmp_path)
        bad_id = run_cli("pull", "../etc", "--model-dir", str(tmp_path / "m"), env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert "no model repo 'org/missing'" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert bad_id.returncode == 1 and "not a hub repo id" in bad_id.stderr


# ---------------------------------------------------------------------------- HF cache


def cached_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, ref: bool = True) -> Path:
    """Lay out a repo as huggingface_hub does: content-addressed blobs, a snapshot of
    symlinks to them, and refs/main naming the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return snapshot


def safetensors_bytes(tmp_path: Path, metadata: dict | None) -> bytes:
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), {"w": mx.zeros((4, 4))}, metadata=metadata)
    return path.read_bytes()


@pytest.fixture()
def hf_cache(tmp_path) -> Path:
    cache = tmp_path / "hub"
    mlx_weights = safetensors_bytes(tmp_path, {"format": "mlx"})
    torch_weights = safetensors_bytes(tmp_path, {"format": "pt"})
    llm = json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}).encode()
    cached_repo(cache, "mlx-community/chat-4bit", {"config.json": llm, "model.safetensors": torch_weights})
    cached_repo(cache, "someone/mlx-converted", {"config.json": llm, "model.safetensors": mlx_weights}, ref=False)
    cached_repo(cache, "org/quantized", {
        "config.json": json.dumps({"model_type": "llama", "quantization": {"bits": 4, "group_size": 64}}).encode(),
        "model.safetensors": torch_weights})
    cached_repo(cache, "org/ocr", {
        "config.json": json.dumps({"architectures": ["GotOcr2ForConditionalGeneration"], "vision_config": {}}).encode(),
        "model.safetensors": mlx_weights})
    cached_repo(cache, "bert/pytorch-only", {"config.json": llm, "model.safetensors": torch_weights})
    cached_repo(cache, "org/no-config", {"model.safetensors": mlx_weights})
    cached_repo(cache, "mlx-community/gguf-only", {"config.json": llm, "model.gguf": b"GGUF"})
    (cache / "datasets--org--data").mkdir()
    return cache


def test_hf_cache_serves_mlx_repos_only(hf_cache):
    models, skipped = discover_hf_cache(hf_cache)
    found = {m.model_id: m for m in models}
    assert set(found) == {"mlx-community/chat-4bit", "someone/mlx-converted", "org/quantized", "org/ocr"}
    assert found["org/ocr"].model_type == "ocr"
    chat = found["mlx-community/chat-4bit"]
    assert chat.path.parent.name == "snapshots"
    assert chat.size_bytes == (chat.path / "model.safetensors").stat().st_size > 0  # through the symlink
    # An MLX repo that cannot be served is reported; non-MLX repos are passed over quietly.
    assert [(s.path.parent.parent.name, "GGUF" in s.reason) for s in skipped] == [("models--mlx-community--gguf-only", True)]


def test_hf_cache_models_join_the_pool_behind_the_model_dirs(hf_cache, tmp_path):
    local = tmp_path / "models" / "org" / "quantized"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (local / "model.safetensors").write_bytes(safetensors_bytes(tmp_path, None))
    pool = ModelPool([tmp_path / "models"], EngineConfig(), memory_budget=1 << 30,
                     settings=SettingsStore(tmp_path / "home"), hf_cache_dirs=[hf_cache])
    assert pool.resolve("org/quantized").path == local  # the model dir wins
    assert pool.resolve("chat-4bit").model_id == "mlx-community/chat-4bit"
    assert "mlx-community/chat-4bit" in {m.model_id for m in pool.servable()}


@pytest.mark.slow
def test_cli_models_lists_the_hf_cache_unless_told_not_to(hf_cache, tmp_path):
    env = {"HF_HUB_CACHE": str(hf_cache), "OMLX_HOME": str(tmp_path / "home")}
    (tmp_path / "models").mkdir()
    with_cache = run_cli("models", "--model-dir", str(tmp_path / "models"), env=env, cwd=tmp_path)
    without = run_cli("models", "--model-dir", str(tmp_path / "models"), "--no-hf-cache", env=env, cwd=tmp_path)
    assert with_cache.returncode == 0 and without.returncode == 0
    assert "mlx-community/chat-4bit" in with_cache.stdout and "org/ocr" in with_cache.stdout
    assert "mlx-community/chat-4bit" not in without.stdout
    assert "bert/pytorch-only" not in with_cache.stdout


def test_default_hf_cache_dir_follows_the_hf_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert default_hf_cache_dir() == tmp_path / "cache"
