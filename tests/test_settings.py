"""Settings files and precedence, in-process: server options (flag > env > file > default),
request defaults (request > model > global), validation, and atomic persistence."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from omlx.api.openai_protocol import parse_chat
from omlx.api.turn_request import ModelDefaults, apply_defaults
from omlx.settings import (
    SettingsError,
    SettingsStore,
    parse_bytes,
    resolve_server_options,
    write_json_atomic,
)


def test_server_options_flag_beats_env_beats_file_beats_default():
    file = {"port": 9000, "host": "0.0.0.0", "max_num_seqs": 4, "block_size": 64}
    env = {"OMLX_PORT": "9100", "OMLX_MAX_NUM_SEQS": "12"}
    cli = {"port": 9200}

    options = resolve_server_options(cli, env, file)

    assert options["port"] == 9200  # flag
    assert options["max_num_seqs"] == 12  # env over file
    assert options["host"] == "0.0.0.0"  # file over default
    assert options["block_size"] == 64
    assert options["max_num_batched_tokens"] == 512  # built-in default
    assert options["trust_remote_code"] is False


def test_mlx_vlm_env_names_are_honoured(caplog):
    env = {"PREFILL_STEP_SIZE": "48", "MAX_KV_SIZE": "1024", "MLX_TRUST_REMOTE_CODE": "true",
           "PRELOAD_MODEL": "org/m,other", "KV_BITS": "4", "KV_GROUP_SIZE": "64"}
    with caplog.at_level(logging.WARNING, logger="omlx.settings"):
        options = resolve_server_options({}, env, {"max_num_batched_tokens": 100})

    assert options["max_num_batched_tokens"] == 48
    assert options["max_model_len"] == 1024
    assert options["trust_remote_code"] is True
    assert options["preload"] == ["org/m", "other"]
    assert options["kv_bits"] == 4
    assert options["kv_group_size"] == 64


def test_omlx_env_name_wins_over_the_mlx_vlm_one():
    options = resolve_server_options({}, {"OMLX_MAX_NUM_BATCHED_TOKENS": "96", "PREFILL_STEP_SIZE": "48"}, {})
    assert options["max_num_batched_tokens"] == 96


def test_a_malformed_env_value_is_an_error_naming_it():
    with pytest.raises(SettingsError, match="OMLX_PORT='eighty'"):
        resolve_server_options({}, {"OMLX_PORT": "eighty"}, {})


def test_cli_reports_a_bad_env_value_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "omlx", "models", "--model-dir", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin", "OMLX_HOME": str(tmp_path), "OMLX_MAX_MODEL_MEMORY": "lots"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "OMLX_MAX_MODEL_MEMORY='lots'" in result.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("8GB", 8 << 30), ("8 GiB", 8 << 30), ("512M", 512 << 20), ("1.5g", int(1.5 * 2**30)),
    ("4096", 4096), (1000, 1000),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1GB", 0, True, "8XB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(SettingsError):
        parse_bytes(bad)


def test_hand_edited_files_keep_their_valid_part(tmp_path, caplog):
    (tmp_path / "settings.json").write_text(json.dumps(
        {"port": "not-a-port", "max_tokens": 64, "colour": "blue", "sampling": {"temperature": 0.2}}))
    (tmp_path / "model_settings.json").write_text(json.dumps(
        {"m": {"alias": "mm", "ttl": -5, "pinned": True}, "n": "not an object"}))
    with caplog.at_level(logging.WARNING, logger="omlx.settings"):
        store = SettingsStore(tmp_path)
        assert store.global_settings() == {"max_tokens": 64, "sampling": {"temperature": 0.2}}
        assert store.model("m") == {"alias": "mm", "pinned": True}
        assert store.model("n") == {}
    assert "unknown setting 'colour'" in caplog.text
    assert "'ttl' must be positive" in caplog.text


def test_broken_json_falls_back_to_defaults(tmp_path, caplog):
    (tmp_path / "settings.json").write_text("{oops")
    with caplog.at_level(logging.WARNING, logger="omlx.settings"):
        assert SettingsStore(tmp_path).global_settings() == {}
    assert "not valid JSON" in caplog.text


def test_request_defaults_precedence(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({
        "sampling": {"temperature": 0.5, "top_p": 0.9}, "max_tokens": 100,
        "chat_template_kwargs": {"enable_thinking": False, "style": "global"},
    }))
    (tmp_path / "model_settings.json").write_text(json.dumps({
        "m": {"sampling": {"temperature": 0.1}, "max_tokens": 20, "chat_template_kwargs": {"style": "model"}},
    }))
    store = SettingsStore(tmp_path)

    defaults = store.request_defaults("m")
    assert defaults == {"temperature": 0.1, "top_p": 0.9, "max_tokens": 20,
                        "chat_template_kwargs": {"enable_thinking": False, "style": "model"}}
    assert store.request_defaults("other")["temperature"] == 0.5

    # Applied to the parsed request: the request's own values win, null means unset.
    body = {"model": "m", "temperature": 0.7, "top_p": None, "chat_template_kwargs": {"enable_thinking": True},
            "messages": [{"role": "user", "content": "hi"}]}
    resolved = apply_defaults(parse_chat(body), ModelDefaults.from_settings(defaults))
    assert resolved.sampling.temperature == 0.7  # the request wins
    assert resolved.sampling.top_p == 0.9  # null means unset
    assert resolved.max_tokens == 20 and resolved.max_tokens_from_default
    assert resolved.request.conversation.template_kwargs == {"enable_thinking": True, "style": "model"}
    assert body["chat_template_kwargs"] == {"enable_thinking": True}  # not mutated
    # A request that chose max_completion_tokens keeps it as its only limit.
    limited = apply_defaults(parse_chat({**body, "max_completion_tokens": 5}), ModelDefaults.from_settings(defaults))
    assert limited.max_tokens == 5 and not limited.max_tokens_from_default


def test_cli_overrides_apply_over_the_file(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"max_tokens": 100, "ttl": 60}))
    store = SettingsStore(tmp_path)
    store.overrides.update({"max_tokens": 8})
    assert store.request_defaults("x")["max_tokens"] == 8
    assert store.ttl("x") == 60


def test_update_model_validates_persists_and_removes_with_null(tmp_path):
    store = SettingsStore(tmp_path)
    saved = store.update_model("org/m", {"alias": "fast", "ttl": 30, "sampling": {"temperature": 0.2}})
    assert saved == {"alias": "fast", "ttl": 30, "sampling": {"temperature": 0.2}}
    on_disk = json.loads((tmp_path / "model_settings.json").read_text())
    assert on_disk == {"org/m": saved}
    assert store.alias_target("fast") == "org/m"

    assert store.update_model("org/m", {"ttl": None}) == {"alias": "fast", "sampling": {"temperature": 0.2}}
    assert SettingsStore(tmp_path).model("org/m") == {"alias": "fast", "sampling": {"temperature": 0.2}}

    for bad, field in [({"ttl": "soon"}, "ttl"), ({"colour": 1}, "colour"),
                       ({"sampling": {"temprature": 1}}, "sampling.temprature"),
                       ({"model_type": "robot"}, "model_type"), ({"pinned": "yes"}, "pinned")]:
        with pytest.raises(SettingsError) as info:
            store.update_model("org/m", bad)
        assert info.value.field == field
    store.update_model("other", {"alias": "x"})
    with pytest.raises(SettingsError, match="already used by 'org/m'"):
        store.update_model("other", {"alias": "fast"})


def test_files_edited_on_disk_are_picked_up_without_restart(tmp_path):
    store = SettingsStore(tmp_path)
    assert store.model("m") == {}
    (tmp_path / "model_settings.json").write_text(json.dumps({"m": {"max_tokens": 9}}))
    assert store.model("m") == {"max_tokens": 9}


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "model_settings.json"
    write_json_atomic(target, {"old": True})

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("omlx.settings.json.dump", explode)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["model_settings.json"]  # no temp file left


def test_omlx_home_env_moves_both_files(tmp_path, monkeypatch):
    monkeypatch.setenv("OMLX_HOME", str(tmp_path / "elsewhere"))
    store = SettingsStore()
    assert store.global_path == tmp_path / "elsewhere" / "settings.json"
    assert store.models_path == Path(tmp_path / "elsewhere" / "model_settings.json")


def test_model_kv_quantization_overrides_the_server_default():
    from omlx.models.pool import engine_config_for
    from omlx.scheduler import EngineConfig
    from omlx.settings import validate_model_settings

    base = EngineConfig(kv_bits=8)
    assert engine_config_for(base, {}) is base
    assert engine_config_for(base, validate_model_settings({"kv_bits": 4, "kv_group_size": 32})).kv_bits == 4
    assert engine_config_for(base, {"kv_bits": 0}).kv_bits is None  # 0: this model stays unquantized
    with pytest.raises(SettingsError):
        validate_model_settings({"kv_bits": 3})


def test_model_kv_cache_gb_overrides_the_servers_cap():
    from omlx.models.pool import engine_config_for
    from omlx.scheduler import EngineConfig
    from omlx.settings import validate_model_settings

    base = EngineConfig(kv_cache_bytes=4 << 30)
    assert engine_config_for(base, validate_model_settings({"kv_cache_gb": 0.5})).kv_cache_bytes == 1 << 29
    assert engine_config_for(EngineConfig(), {}).kv_cache_bytes is None  # the default cap, decided at load
    with pytest.raises(SettingsError):
        validate_model_settings({"kv_cache_gb": -1})
