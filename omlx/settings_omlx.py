"""oMLX's settings files read as they are, and model settings written back the way they came.

oMLX keeps `settings.json` in sections (`server`, `model`, `sampling`, `auth`, `cache`,
`scheduler`, `huggingface`, `idle_timeout`, ...) and `model_settings.json` as
`{"version": 1, "models": {"<dir>": {"model_alias": ..., "is_pinned": ..., ...}}}`.  An oMLX
user's files work unchanged: every key omlx has a meaning for is translated to omlx's own
key, keys it has none for are left alone (and kept when the file is written back).
"""

from __future__ import annotations

import logging
from typing import Any

from omlx.settings_values import SettingsError, parse_bytes

log = logging.getLogger("omlx.settings")

# ---------------------------------------------------------------------------- model_settings.json

# oMLX key -> omlx key, where the value means the same.
MODEL_KEYS = {
    "model_alias": "alias",
    "model_type_override": "model_type",
    "is_pinned": "pinned",
    "ttl_seconds": "ttl",
    "trust_remote_code": "trust_remote_code",
    "max_context_window": "max_context_window",
    "max_tokens": "max_tokens",
    "chat_template_kwargs": "chat_template_kwargs",
    "force_sampling": "force_sampling",
    "forced_ct_kwargs": "forced_ct_kwargs",
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed")
# Dedicated toggles oMLX passes to the chat template (None: the template's own default).
TEMPLATE_SWITCHES = ("enable_thinking", "preserve_thinking")
BUDGET_ON, BUDGET_TOKENS = "thinking_budget_enabled", "thinking_budget_tokens"
_OWN_KEYS = set(MODEL_KEYS) | set(SAMPLING_KEYS) | set(TEMPLATE_SWITCHES) | {BUDGET_ON, BUDGET_TOKENS}


def is_omlx_models_file(raw: Any) -> bool:
    return isinstance(raw, dict) and "version" in raw and isinstance(raw.get("models"), dict)


def model_from_omlx(entry: Any, omlx_keys=()) -> Any:
    """One model's oMLX entry in omlx's keys (null values mean "unset" in oMLX too).  Keys of
    omlx's own (`omlx_keys`: kv_bits, tool_parser, ...) may sit in the same entry; oMLX keys
    omlx has no meaning for (profiles, speculative decoding, ...) are passed over quietly."""
    if not isinstance(entry, dict):
        return entry
    out: dict = {}
    for key, value in entry.items():
        if value is None:
            continue
        if key in MODEL_KEYS:
            out[MODEL_KEYS[key]] = value
        elif key in SAMPLING_KEYS:
            out.setdefault("sampling", {})[key] = value
    switches = {k: entry[k] for k in TEMPLATE_SWITCHES if entry.get(k) is not None}
    if switches:
        kwargs = out.get("chat_template_kwargs")
        out["chat_template_kwargs"] = {**(kwargs if isinstance(kwargs, dict) else {}), **switches}
    if entry.get(BUDGET_ON) and entry.get(BUDGET_TOKENS) is not None:
        out["thinking_budget"] = entry[BUDGET_TOKENS]
    for key, value in entry.items():
        if key in omlx_keys and key not in _OWN_KEYS and value is not None and key not in out:
            out[key] = value
    return out


def model_to_omlx(settings: dict, original: dict | None, omlx_keys) -> dict:
    """omlx's settings for one model as an oMLX entry, keeping every key of `original` that
    omlx does not manage (oMLX-only features such as profiles or speculative decoding)."""
    back = {v: k for k, v in MODEL_KEYS.items()}
    entry = {k: v for k, v in (original or {}).items() if k not in _OWN_KEYS and k not in omlx_keys}
    for key, value in settings.items():
        if key == "sampling":
            entry.update(value)
        elif key == "chat_template_kwargs":
            kwargs = dict(value)
            for switch in TEMPLATE_SWITCHES:
                if switch in kwargs:
                    entry[switch] = kwargs.pop(switch)
            if kwargs:
                entry["chat_template_kwargs"] = kwargs
        elif key == "thinking_budget":
            entry[BUDGET_ON], entry[BUDGET_TOKENS] = True, value
        else:
            entry[back.get(key, key)] = value
    return entry


# ---------------------------------------------------------------------------- settings.json

SECTIONS = {"server", "model", "memory", "scheduler", "cache", "auth", "mcp", "huggingface", "modelscope",
            "network", "sampling", "logging", "ui", "claude_code", "integrations", "idle_timeout", "version"}
_OMLX_ONLY = SECTIONS - {"sampling"}  # omlx's own settings.json has a `sampling` object too


def is_omlx_global_file(raw: Any) -> bool:
    return isinstance(raw, dict) and any(key in raw for key in _OMLX_ONLY)


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def global_from_omlx(raw: dict) -> dict:
    """oMLX's sections in omlx's global keys; omlx's own top-level keys pass through."""
    out = {k: v for k, v in raw.items() if k not in SECTIONS}
    server, model, sampling = _section(raw, "server"), _section(raw, "model"), _section(raw, "sampling")
    for key in ("host", "port", "log_level"):
        if server.get(key) is not None:
            out[key] = server[key]
    dirs = model.get("model_dirs") or model.get("model_dir")
    if dirs:
        out["model_dirs"] = [dirs] if isinstance(dirs, str) else dirs
    values = {k: sampling[k] for k in SAMPLING_KEYS if sampling.get(k) is not None}
    if values:
        out["sampling"] = values
    if sampling.get("max_tokens") is not None:
        out["max_tokens"] = sampling["max_tokens"]
    if sampling.get("max_context_window_policy") is not None:  # a cap on every model's context
        out["max_model_len"] = sampling["max_context_window_policy"]
    auth = _section(raw, "auth")
    if auth.get("skip_api_key_verification"):
        log.info("settings.json: auth.skip_api_key_verification is set; no API key is required")
    else:
        if auth.get("api_key"):
            out["api_key"] = auth["api_key"]
        subs = auth.get("sub_keys")
        if isinstance(subs, list):
            named = {str(s.get("name") or f"sub-key-{i}"): s.get("key")
                     for i, s in enumerate(subs) if isinstance(s, dict) and isinstance(s.get("key"), str)}
            if named:
                out["api_keys"] = named
    cache = _section(raw, "cache")
    if cache.get("enabled") is not None:
        out["prefix_cache"] = cache["enabled"]
    if cache.get("ssd_cache_dir"):
        out["kv_cache_dir"] = cache["ssd_cache_dir"]
    size = cache.get("ssd_cache_max_size")
    if size is not None and size != "auto":
        try:
            out["kv_disk_gb"] = parse_bytes(size, "cache.ssd_cache_max_size") / 2**30
        except SettingsError as exc:
            log.warning("settings.json: %s; ignoring it", exc)
    if cache.get("hot_cache_only"):
        out["kv_disk"] = False  # oMLX's "keep the cache in memory, no disk I/O"
    scheduler = _section(raw, "scheduler")
    if scheduler.get("max_concurrent_requests") is not None:
        out["max_num_seqs"] = scheduler["max_concurrent_requests"]
    hf = _section(raw, "huggingface")
    if hf.get("hf_cache_enabled") is not None:
        out["hf_cache"] = hf["hf_cache_enabled"]
    if hf.get("endpoint"):
        out["hf_endpoint"] = hf["endpoint"]
    idle = _section(raw, "idle_timeout")
    if idle.get("idle_timeout_seconds") is not None:
        out["ttl"] = idle["idle_timeout_seconds"]
    mcp = _section(raw, "mcp")
    if mcp.get("config_path"):
        out["mcp_config"] = mcp["config_path"]
    if mcp.get("expose_tools") is not None:
        out["mcp_expose_tools"] = mcp["expose_tools"]
    return out
