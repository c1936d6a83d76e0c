"""oMLX's settings files, env names and defaults, in-process: every key omlx has a meaning
for is read from oMLX's own format, model settings are written back in the format found,
and a configured default is applied to the typed request without ever failing it."""

from __future__ import annotations

import json
import logging

import pytest

from omlx.api.anthropic_protocol import parse_messages
from omlx.api.errors import APIError
from omlx.api.openai_protocol import parse_chat
from omlx.api.responses_protocol import parse_responses
from omlx.api.turn_request import ModelDefaults, apply_defaults
from omlx.settings import SettingsStore, resolve_server_options

MESSAGES = [{"role": "user", "content": "hi"}]

OMLX_GLOBAL = {
    "version": "1.0",
    "server": {"host": "0.0.0.0", "port": 8123, "log_level": "debug", "cors_origins": ["*"]},
    "model": {"model_dirs": ["/models/a", "/models/b"], "model_fallback": False},
    "memory": {"memory_guard_tier": "balanced"},
    "scheduler": {"max_concurrent_requests": 6, "chunked_prefill": False},
    "cache": {"enabled": False, "ssd_cache_dir": "/ssd/cache", "ssd_cache_max_size": "2GB",
              "hot_cache_max_size": "0", "hot_cache_only": True},
    "auth": {"api_key": "sekrit", "sub_keys": [{"key": "k2", "name": "ci", "created_at": "x"}]},
    "mcp": {"config_path": "/etc/mcp.json", "expose_tools": False},
    "huggingface": {"endpoint": "https://hf-mirror.example", "hf_cache_enabled": False},
    "sampling": {"max_context_window": 32768, "max_context_window_policy": 8192, "max_tokens": 900,
                 "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05},
    "idle_timeout": {"idle_timeout_seconds": 600},
    "ui": {"language": "en"},
}

OMLX_MODELS = {
    "version": 1,
    "models": {
        "Qwen3-8B-4bit": {
            "model_alias": "qwen3-8b", "model_type_override": "llm", "is_pinned": True, "ttl_seconds": 300,
            "trust_remote_code": True, "max_context_window": 16384, "max_tokens": 2048,
            "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
            "presence_penalty": 0.5, "chat_template_kwargs": {"style": "terse"}, "enable_thinking": False,
            "preserve_thinking": True, "thinking_budget_enabled": True, "thinking_budget_tokens": 512,
            "force_sampling": True, "forced_ct_kwargs": ["enable_thinking"],
            # oMLX features omlx has no meaning for: kept as they are, never an error.
            "is_favorite": True, "dflash_enabled": False, "active_profile_name": None,
        },
        "bge-m3": {"model_type_override": "embedding", "is_hidden": False},
    },
}


def test_omlx_global_sections_map_to_omlx_settings(tmp_path, caplog):
    (tmp_path / "settings.json").write_text(json.dumps(OMLX_GLOBAL))
    with caplog.at_level(logging.WARNING, logger="omlx.settings"):
        settings = SettingsStore(tmp_path).global_settings()
    assert settings == {
        "host": "0.0.0.0", "port": 8123, "log_level": "debug", "model_dirs": ["/models/a", "/models/b"],
        "max_num_seqs": 6, "prefix_cache": False, "kv_cache_dir": "/ssd/cache", "kv_disk_gb": 2.0,
        "kv_disk": False, "api_key": "sekrit", "api_keys": {"ci": "k2"}, "hf_endpoint": "https://hf-mirror.example",
        "hf_cache": False, "max_tokens": 900, "max_model_len": 8192, "ttl": 600,
        "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05},
        "mcp_config": "/etc/mcp.json", "mcp_expose_tools": False,
    }
    assert "unknown setting" not in caplog.text  # oMLX's other sections are not typos
    # The server options take them like omlx's own keys (flag > env > file).
    options = resolve_server_options({}, {}, settings)
    assert (options["host"], options["port"], options["max_num_seqs"], options["prefix_cache"]) == ("0.0.0.0", 8123, 6, False)
    assert (options["mcp_config"], options["mcp_expose_tools"]) == ("/etc/mcp.json", False)


def test_skip_api_key_verification_means_no_key(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"auth": {"api_key": "k", "skip_api_key_verification": True}}))
    assert "api_key" not in SettingsStore(tmp_path).global_settings()


def test_omlx_model_settings_map_to_omlx_keys(tmp_path):
    (tmp_path / "model_settings.json").write_text(json.dumps(OMLX_MODELS))
    store = SettingsStore(tmp_path)
    assert store.model("Qwen3-8B-4bit") == {
        "alias": "qwen3-8b", "model_type": "llm", "pinned": True, "ttl": 300, "trust_remote_code": True,
        "max_context_window": 16384, "max_tokens": 2048,
        "sampling": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                     "presence_penalty": 0.5},
        "chat_template_kwargs": {"style": "terse", "enable_thinking": False, "preserve_thinking": True},
        "thinking_budget": 512, "force_sampling": True, "forced_ct_kwargs": ["enable_thinking"],
    }
    assert store.alias_target("qwen3-8b") == "Qwen3-8B-4bit"
    assert store.pinned("Qwen3-8B-4bit") and store.ttl("Qwen3-8B-4bit") == 300
    assert store.trust_remote_code("Qwen3-8B-4bit")
    assert store.model("bge-m3") == {"model_type": "embedding"}


def test_model_settings_are_written_back_in_the_format_found(tmp_path):
    (tmp_path / "model_settings.json").write_text(json.dumps(OMLX_MODELS))
    store = SettingsStore(tmp_path)
    store.update_model("Qwen3-8B-4bit", {"alias": "q8", "max_tokens": None, "kv_bits": 8,
                                         "sampling": {"temperature": 0.2}})
    written = json.loads((tmp_path / "model_settings.json").read_text())
    assert written["version"] == 1 and set(written["models"]) == {"Qwen3-8B-4bit", "bge-m3"}
    entry = written["models"]["Qwen3-8B-4bit"]
    assert entry["model_alias"] == "q8" and "max_tokens" not in entry and entry["temperature"] == 0.2
    assert "top_p" not in entry  # the sampling object was replaced, as in omlx's own format
    assert entry["is_pinned"] is True and entry["enable_thinking"] is False
    assert entry["thinking_budget_enabled"] is True and entry["thinking_budget_tokens"] == 512
    assert entry["kv_bits"] == 8  # omlx's own keys go in under their own names
    assert entry["is_favorite"] is True and entry["dflash_enabled"] is False  # oMLX's, kept
    assert written["models"]["bge-m3"] == OMLX_MODELS["models"]["bge-m3"]  # untouched
    assert SettingsStore(tmp_path).model("Qwen3-8B-4bit")["alias"] == "q8"

    # omlx's own flat format stays flat.
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "model_settings.json").write_text(json.dumps({"m": {"alias": "x"}}))
    SettingsStore(flat).update_model("m", {"ttl": 5})
    assert json.loads((flat / "model_settings.json").read_text()) == {"m": {"alias": "x", "ttl": 5}}


def test_omlx_env_names():
    env = {"OMLX_MODEL_DIR": "/a,/b", "OMLX_MAX_CONCURRENT_REQUESTS": "3", "OMLX_CACHE_ENABLED": "false",
           "OMLX_SSD_CACHE_DIR": "/ssd", "OMLX_SSD_CACHE_MAX_SIZE": "512MB", "OMLX_HOT_CACHE_ONLY": "true",
           "OMLX_HF_CACHE_ENABLED": "0", "OMLX_HF_ENDPOINT": "https://mirror", "OMLX_API_KEY": "k",
           "OMLX_LOG_LEVEL": "debug"}
    options = resolve_server_options({}, env, {})
    assert options["model_dirs"] == ["/a", "/b"]
    assert options["max_num_seqs"] == 3 and options["prefix_cache"] is False
    assert options["kv_cache_dir"] == "/ssd" and options["kv_disk_gb"] == 0.5 and options["kv_disk"] is False
    assert options["hf_cache"] is False and options["hf_endpoint"] == "https://mirror"
    assert options["api_key"] == "k" and options["log_level"] == "debug"


def _defaults(**merged) -> ModelDefaults:
    return ModelDefaults.from_settings(merged)


def test_defaults_apply_to_every_family_the_same_way():
    defaults = _defaults(temperature=0.3, min_p=0.1, presence_penalty=0.5, seed=7, max_tokens=12,
                         chat_template_kwargs={"enable_thinking": False})
    chat = apply_defaults(parse_chat({"model": "m", "messages": MESSAGES}), defaults)
    messages = apply_defaults(parse_messages({"model": "m", "messages": MESSAGES, "max_tokens": 40}), defaults)
    responses = apply_defaults(parse_responses({"model": "m", "input": "hi"}).turn_request([]), defaults)
    for resolved in (chat, messages, responses):
        s = resolved.sampling
        assert (s.temperature, s.min_p, s.presence_penalty, s.seed) == (0.3, 0.1, 0.5, 7)
        assert resolved.request.conversation.template_kwargs == {"enable_thinking": False}
    assert chat.max_tokens == 12 and responses.max_tokens == 12  # a configured max_tokens reaches Responses
    assert messages.max_tokens == 40 and not messages.max_tokens_from_default  # Anthropic requires its own


def test_a_default_outside_an_apis_range_never_fails_its_requests(caplog):
    # Anthropic's temperature goes to 1: a client's 1.5 is a 400, a configured 1.5 applies.
    with pytest.raises(APIError) as exc:
        parse_messages({"model": "m", "messages": MESSAGES, "max_tokens": 5, "temperature": 1.5})
    assert exc.value.param == "temperature"
    resolved = apply_defaults(parse_messages({"model": "m", "messages": MESSAGES, "max_tokens": 5}),
                              _defaults(temperature=1.5))
    assert resolved.sampling.temperature == 1.5
    # A default no engine could run (a presence penalty of 9) is skipped, with a warning.
    with caplog.at_level(logging.WARNING, logger="omlx.api.sampling"):
        resolved = apply_defaults(parse_chat({"model": "m", "messages": MESSAGES}),
                                  _defaults(presence_penalty=9.0, top_p=0.5))
    assert resolved.sampling.presence_penalty == 0.0 and resolved.sampling.top_p == 0.5
    assert "presence_penalty=9.0" in caplog.text


def test_force_sampling_and_forced_template_kwargs_win_over_the_request():
    defaults = _defaults(temperature=0.0, top_p=0.5, min_p=0.2, force_sampling=True,
                         chat_template_kwargs={"enable_thinking": False, "style": "x"},
                         forced_ct_kwargs=["enable_thinking"])
    body = {"model": "m", "messages": MESSAGES, "temperature": 1.2, "top_p": 0.9, "min_p": 0.0,
            "chat_template_kwargs": {"enable_thinking": True, "style": "y"}}
    resolved = apply_defaults(parse_chat(body), defaults)
    assert (resolved.sampling.temperature, resolved.sampling.top_p) == (0.0, 0.5)  # pinned
    assert resolved.sampling.min_p == 0.0  # not one of the pinned fields: the request's
    assert resolved.request.conversation.template_kwargs == {"enable_thinking": False, "style": "y"}


def test_thinking_budget_and_stop_defaults():
    resolved = apply_defaults(parse_chat({"model": "m", "messages": MESSAGES}),
                              _defaults(thinking_budget=64, stop=["END"]))
    assert resolved.thinking_budget == 64 and resolved.stop == ["END"]
    resolved = apply_defaults(parse_chat({"model": "m", "messages": MESSAGES, "thinking_budget": 8, "stop": []}),
                              _defaults(thinking_budget=64, stop=["END"]))
    assert resolved.thinking_budget == 8 and resolved.stop == []  # an explicit empty list is a choice
