"""Typed settings, in-process: the files become GlobalSettings / ModelSettings once per file
version, one precedence decides every request default (model > family > global), and one
EngineConfig.from_settings turns server options and model settings into an engine config
whose defaults are the server options' own."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from omlx.scheduler.engine_config import _FROM_SETTINGS, EngineConfig
from omlx.settings import GLOBAL_KEYS, MODEL_KEYS, SERVER_OPTIONS, SettingsStore, resolve_server_options
from omlx.settings_typed import GlobalSettings, ModelSettings, RequestDefaults, request_defaults
from omlx.vision.ocr import OCR_FAMILIES


def test_every_settings_key_is_a_typed_field():
    # A key checked in a file but missing from the type would only survive in `extra`.
    assert set(GLOBAL_KEYS) == {f.name for f in dataclasses.fields(GlobalSettings)} - {"extra"}
    assert set(MODEL_KEYS) == {f.name for f in dataclasses.fields(ModelSettings)} - {"extra"}


def test_files_are_parsed_once_per_version(tmp_path):
    path = tmp_path / "model_settings.json"
    path.write_text(json.dumps({"m": {"max_tokens": 9, "sampling": {"temperature": 0.2}}}))
    store = SettingsStore(tmp_path)
    first = store.of_model("m")
    assert isinstance(first, ModelSettings) and first.max_tokens == 9
    assert store.of_model("m") is first  # the same object while the file is unchanged
    path.write_text(json.dumps({"m": {"max_tokens": 12}}))
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)  # a new version, whatever the clock
    assert store.of_model("m").max_tokens == 12 and store.of_model("m").sampling is None
    assert store.of_model("unknown") == ModelSettings()


def test_overrides_replace_fields_without_reparsing(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"max_tokens": 100, "ttl": 60, "host": "0.0.0.0"}))
    store = SettingsStore(tmp_path)
    store.overrides.update({"max_tokens": 8})
    glob = store.globals()
    assert (glob.max_tokens, glob.ttl, glob.host) == (8, 60, "0.0.0.0")
    assert store.global_settings() == {"max_tokens": 8, "ttl": 60, "host": "0.0.0.0"}


def _store(tmp_path: Path, glob: dict, models: dict) -> SettingsStore:
    (tmp_path / "settings.json").write_text(json.dumps(glob))
    (tmp_path / "model_settings.json").write_text(json.dumps(models))
    return SettingsStore(tmp_path)


def test_one_precedence_model_over_family_over_global(tmp_path):
    store = _store(
        tmp_path,
        {"sampling": {"temperature": 0.9, "top_p": 0.8, "stop": "G"}, "max_tokens": 300,
         "chat_template_kwargs": {"enable_thinking": False, "style": "global"}},
        {"ocr": {"sampling": {"temperature": 0.3}, "chat_template_kwargs": {"style": "model"},
                 "thinking_budget": 64, "force_sampling": True, "forced_ct_kwargs": ["style"]}},
    )
    glm = OCR_FAMILIES["glm_ocr"]
    found = store.defaults("ocr", glm.request_layer())
    assert found.sampling == {"temperature": 0.3,  # the model's own
                              "repetition_penalty": 1.1,  # the family's
                              "top_p": 0.8}  # the global one, which neither sets
    assert found.stop == tuple(glm.stop) and found.max_tokens == glm.max_tokens  # family over global
    assert found.template_kwargs == {"enable_thinking": False, "style": "model"}
    assert found.forced_template_kwargs == {"style": "model"}
    assert found.thinking_budget == 64 and found.forced_sampling == {"temperature", "top_p", "top_k"}
    # Without the family the global values show through; a model with no settings gets them all.
    plain = store.defaults("ocr")
    assert plain.stop == ("G",) and plain.max_tokens == 300 and plain.sampling["temperature"] == 0.3
    other = store.defaults("other")
    assert other.sampling == {"temperature": 0.9, "top_p": 0.8} and other.forced_sampling == frozenset()


def test_a_model_setting_left_null_falls_back_to_the_global_one(tmp_path):
    store = _store(tmp_path, {"sampling": {"temperature": 0.5}}, {"m": {"sampling": {"temperature": None}}})
    assert store.defaults("m").sampling == {"temperature": 0.5}


def test_layers_merge_objects_key_by_key_and_take_scalars_from_the_first_that_sets_them():
    high = RequestDefaults(sampling={"top_k": 5}, template_kwargs={"a": 1})
    low = RequestDefaults(sampling={"top_k": 9, "seed": 3}, template_kwargs={"a": 0, "b": 2}, max_tokens=7,
                          force_sampling=False)
    merged = request_defaults(high, None, low)
    assert merged.sampling == {"top_k": 5, "seed": 3} and merged.template_kwargs == {"a": 1, "b": 2}
    assert merged.max_tokens == 7 and merged.force_sampling is False
    assert merged.as_fields() == {"top_k": 5, "seed": 3, "max_tokens": 7, "force_sampling": False,
                                  "chat_template_kwargs": {"a": 1, "b": 2}}
    assert request_defaults() == RequestDefaults()


# ---------------------------------------------------------------------------- engine config


def test_engine_defaults_are_the_server_options_defaults():
    built_in = EngineConfig()
    defaults = {option.key: option.default for option in SERVER_OPTIONS}
    checked = 0
    for key, (field, convert) in _FROM_SETTINGS.items():
        if defaults.get(key) is not None:
            assert getattr(built_in, field) == convert(defaults[key]), key
            checked += 1
    assert checked >= 10
    # And resolving no options at all changes nothing but where the disk tier lives.
    resolved = EngineConfig.from_settings(resolve_server_options({}, {}, {}), home=Path("/srv/omlx"))
    assert resolved == dataclasses.replace(built_in, kv_cache_dir="/srv/omlx/cache")


def test_server_options_become_an_engine_config():
    options = resolve_server_options(
        {"kv_cache_gb": 1.5, "kv_disk_gb": 0.5, "block_size": 64, "speculative_decoding": False,
         "kv_bits": 8, "max_model_len": 2048, "kv_cache_dir": "~/kv"},
        {}, {"max_num_seqs": 4})
    config = EngineConfig.from_settings(options, home=Path("/unused"))
    assert config.kv_cache_bytes == 3 << 29 and config.kv_disk_bytes == 1 << 29
    assert (config.block_size, config.speculative, config.kv_bits, config.max_model_len, config.max_num_seqs) == (
        64, False, 8, 2048, 4)
    assert config.kv_cache_dir == str(Path("~/kv").expanduser())
    # The disk tier is off without the prefix cache, or when kv_disk is.
    for off in ({"prefix_cache": False}, {"kv_disk": False}):
        assert EngineConfig.from_settings(resolve_server_options(off, {}, {}), home=Path("/x")).kv_cache_dir is None


def test_model_settings_over_the_servers_engine_config():
    base = EngineConfig(kv_bits=8, max_model_len=4096, kv_cache_bytes=4 << 30)
    assert EngineConfig.from_settings(ModelSettings(), base=base) is base
    model = ModelSettings(kv_bits=0, kv_cache_gb=0.25, max_context_window=1024, speculative_decoding=False,
                          num_draft_tokens=3, draft_model="small")
    config = EngineConfig.from_settings(model, base=base)
    assert config.kv_bits is None and config.kv_cache_bytes == 1 << 28 and config.max_model_len == 1024
    assert (config.speculative, config.num_draft_tokens, config.draft_model) == (False, 3, "small")
    # A model's context cap never raises the server's.
    assert EngineConfig.from_settings({"max_context_window": 8192}, base=base).max_model_len == 4096
    assert EngineConfig.from_settings({"max_context_window": 8192}, base=EngineConfig()).max_model_len == 8192


@pytest.mark.parametrize("kind", ["embedder", "cross_encoder", "llm"])
def test_every_model_kind_implements_resident(kind):
    from omlx.embeddings import LoadedEmbedder
    from omlx.models.loaded import LoadedModel
    from omlx.models.resident import Resident
    from omlx.rerank import LoadedCrossEncoder

    cls = {"embedder": LoadedEmbedder, "cross_encoder": LoadedCrossEncoder, "llm": LoadedModel}[kind]
    members = [name for name in dir(Resident) if not name.startswith("_")]
    annotations = [name for name in Resident.__annotations__]
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [m for m in members + annotations if not hasattr(cls, m) and m not in fields]
    assert missing == []
    assert cls.generates is (kind == "llm")


def test_the_dict_forms_agree_with_the_typed_precedence(tmp_path):
    # SettingsStore.request_defaults and vision.ocr.with_ocr_defaults are the dict forms of
    # the same precedence (kept for callers holding dicts); they must say what it says.
    from omlx.api.turn_request import ModelDefaults
    from omlx.vision.ocr import with_ocr_defaults

    store = _store(
        tmp_path,
        {"sampling": {"temperature": 0.5, "top_p": 0.9, "stop": ["G"]}, "max_tokens": 100,
         "chat_template_kwargs": {"enable_thinking": False}},
        {"m": {"sampling": {"temperature": 0.1}, "max_tokens": 20, "chat_template_kwargs": {"style": "x"},
               "force_sampling": True, "forced_ct_kwargs": ["style"], "thinking_budget": 7}},
    )
    for model_id in ("m", "other"):
        for family in (None, OCR_FAMILIES["glm_ocr"], OCR_FAMILIES["dots_ocr"]):
            merged = store.request_defaults(model_id)
            if family is not None:
                merged = with_ocr_defaults(merged, store.model(model_id), family)
            typed = store.defaults(model_id, family.request_layer() if family is not None else None)
            assert ModelDefaults.from_settings(merged) == ModelDefaults.from_settings(typed.as_fields())
            assert merged == typed.as_fields()
