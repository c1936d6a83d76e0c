"""User settings: `$OMLX_HOME/settings.json` (global) and `$OMLX_HOME/model_settings.json`.

Two precedence chains meet here:

- the server's own options: CLI flag > `OMLX_*` env var (and the mlx-vlm server's env names)
  > settings.json > built-in default (`resolve_server_options`);
- what a request gets: the request body > the model's settings > the global settings >
  built-in defaults (`SettingsStore.request_defaults`, applied to the parsed request by
  omlx.api.turn_request).

Both files are plain JSON a user can edit by hand, in omlx's flat format or in oMLX's
(sections in settings.json, `{"version": 1, "models": {...}}` in model_settings.json; see
omlx.settings_omlx), and model settings are written back in the format the file had.  The server re-reads a file when its mtime
changes, and edits made through the API are written atomically (temp file + os.replace), so
a crash mid-write never leaves a half-written file and changes apply without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omlx.settings_typed import (
    NO_MODEL_SETTINGS,
    GlobalSettings,
    ModelSettings,
    RequestDefaults,
    first_set,
    model_request_defaults,
)
from omlx.settings_omlx import (
    global_from_omlx,
    is_omlx_global_file,
    is_omlx_models_file,
    model_from_omlx,
    model_to_omlx,
)
from omlx.settings_values import (  # noqa: F401 - SettingsError, parse_bytes, ...: imported from here too
    MODEL_TYPES,
    SAMPLING_KEYS,
    SettingsError,
    bool_text,
    dirs_text,
    gib_from_size,
    kv_bits,
    kv_dtype,
    kv_dtype_text,
    model_type,
    non_negative_int_text,
    optional_non_negative_int,
    optional_positive,
    optional_positive_int,
    optional_sampling,
    optional_size,
    parse_bytes,
    string_list,
    typed,
    validate_sampling,
)

log = logging.getLogger("omlx.settings")

GLOBAL_FILE = "settings.json"
MODELS_FILE = "model_settings.json"


def omlx_home() -> Path:
    # OMLX_BASE_PATH is oMLX's name for the same folder.
    return Path(os.environ.get("OMLX_HOME") or os.environ.get("OMLX_BASE_PATH") or "~/.omlx").expanduser()


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_model_memory_bytes() -> int:
    """Three quarters of physical memory: room for the models, leaving the OS and the server
    process itself the rest (on Apple Silicon the same memory is the GPU's)."""
    total = physical_memory_bytes()
    return int(total * 0.75) if total else 8 << 30


# ---------------------------------------------------------------------------- keys


# Per-model keys and how each is checked.  None always means "not set" (and, in an update,
# "remove this key").
MODEL_KEYS: dict[str, Callable] = {
    "alias": typed(str),
    "model_type": model_type,
    "sampling": optional_sampling,
    "max_tokens": optional_positive_int,
    "ttl": optional_positive,
    "pinned": typed(bool),
    "trust_remote_code": typed(bool),
    "chat_template_kwargs": typed(dict),
    "tool_parser": typed(str),
    "adapter_path": typed(str),
    # This model's KV pool cap in GiB, over the server's --kv-cache-gb; and quantized KV for
    # its pool (4 or 8; 0 keeps it in the model's dtype).  Applied on its next load.
    "kv_cache_gb": optional_positive,
    "kv_bits": kv_bits,
    "kv_group_size": optional_positive_int,
    # The dtype of this model's KV pool: auto, float32, bfloat16, float16 (next load).
    "kv_dtype": kv_dtype,
    # With kv_bits: tokens each sequence keeps in the model's dtype before its KV is quantized.
    "quantized_kv_start": optional_non_negative_int,
    # Run a quantized / half-precision model in float32 (true), as stored (false); unset:
    # float32 on the CPU for small models (omlx.models.cpu_weights).  Applied on next load.
    "dequantize": typed(bool),
    # oMLX's: a cap on this model's context, a default thinking budget, sampling defaults
    # that win over the request's (temperature, top_p, top_k), and template kwargs that do.
    "max_context_window": optional_positive_int,
    "thinking_budget": optional_non_negative_int,
    # Speculative decoding for this model: on/off, the most draft tokens per step, and a
    # smaller model with the same tokenizer to draft with (default: prompt lookup).
    "speculative_decoding": typed(bool),
    "num_draft_tokens": optional_non_negative_int,
    "draft_model": typed(str),
    "force_sampling": typed(bool),
    "forced_ct_kwargs": string_list,
}


GLOBAL_KEYS: dict[str, Callable] = {
    "host": typed(str),
    "port": typed(int),
    "model_dirs": typed(list, str),
    "api_key": typed(str),
    "api_keys": typed(dict),
    "max_model_memory": optional_size,
    "kv_cache_gb": optional_positive,
    "sampling": optional_sampling,
    "max_tokens": optional_positive_int,
    "max_num_seqs": optional_positive_int,
    "max_num_batched_tokens": optional_positive_int,
    "max_vision_prompts_per_step": optional_positive_int,
    "state_snapshot_tokens": optional_positive_int,
    "block_size": optional_positive_int,
    "kv_bits": optional_positive_int,
    "kv_group_size": optional_positive_int,
    "kv_dtype": kv_dtype,
    "quantized_kv_start": optional_non_negative_int,
    "kv_cache_dir": typed(str),
    "kv_disk_gb": optional_positive,
    "kv_disk": typed(bool),
    "prefix_cache": typed(bool),
    "speculative_decoding": typed(bool),
    "num_draft_tokens": optional_non_negative_int,
    "draft_model": typed(str),
    "overlap_steps": typed(bool),
    "max_model_len": optional_positive_int,
    "ttl": optional_positive,
    "hf_cache": typed(bool),
    "trust_remote_code": typed(bool),
    "chat_template_kwargs": typed(dict),
    "log_level": typed(str),
    "mcp_config": typed(str),  # the MCP config file (oMLX's mcp.config_path)
    "mcp_expose_tools": typed(bool),  # offer MCP tools to models (oMLX's mcp.expose_tools)
    "hf_endpoint": typed(str),  # a Hugging Face mirror for `omlx pull` (oMLX's huggingface.endpoint)
}


def validate_model_settings(patch: Any) -> dict:
    """Check an update for one model's settings; raise SettingsError naming the bad field."""
    if not isinstance(patch, dict):
        raise SettingsError("model settings must be a JSON object")
    out = {}
    for key, value in patch.items():
        check = MODEL_KEYS.get(key)
        if check is None:
            raise SettingsError(f"'{key}' is not a model setting (known: {', '.join(MODEL_KEYS)})", key)
        out[key] = check(value, key)
    alias = out.get("alias")
    if alias is not None and not alias.strip():
        raise SettingsError("'alias' must not be empty", "alias")
    return out


def _lenient(raw: Any, checks: Mapping[str, Callable], where: str) -> dict:
    """The valid part of a hand-edited settings object; bad entries are logged and dropped, so
    one typo does not keep the server from starting."""
    if not isinstance(raw, dict):
        log.warning("%s: expected a JSON object; ignoring it", where)
        return {}
    out = {}
    for key, value in raw.items():
        check = checks.get(key)
        if check is None:
            log.warning("%s: unknown setting %r ignored", where, key)
            continue
        try:
            value = check(value, key)
        except SettingsError as exc:
            log.warning("%s: %s; ignoring it", where, exc)
            continue
        if value is not None:
            out[key] = value
    return out


# ---------------------------------------------------------------------------- files


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s: %s; using defaults", path, exc)
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        log.warning("%s is not valid JSON (%s); using defaults", path, exc)
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` so that readers see either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class _WatchedFile:
    """A JSON file re-read whenever its mtime (or size) changes."""

    def __init__(self, path: Path, parse: Callable[[Any], Any]):
        self.path = path
        self._parse = parse
        self._stamp: tuple | None = None
        self._value = parse(None)

    def value(self):
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._value = self._parse(_read_json(self.path) if stamp else None)
        return self._value


class SettingsStore:
    """Both settings files of one omlx home, read on demand, written atomically."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home is not None else omlx_home()
        self._lock = threading.Lock()
        self._global = _WatchedFile(self.home / GLOBAL_FILE, self._parse_global)
        self._models = _WatchedFile(self.home / MODELS_FILE, self._parse_models)
        # Overrides from the command line / environment for the global file's request-level
        # keys (e.g. `--max-tokens`); they win over the file.
        self.overrides: dict = {}

    @property
    def global_path(self) -> Path:
        return self._global.path

    @property
    def models_path(self) -> Path:
        return self._models.path

    def _parse_global(self, raw) -> GlobalSettings:
        if raw is None:
            return GlobalSettings()
        if is_omlx_global_file(raw):
            raw = global_from_omlx(raw)
        return GlobalSettings.from_dict(_lenient(raw, GLOBAL_KEYS, str(self.home / GLOBAL_FILE)))

    def _parse_models(self, raw) -> dict[str, ModelSettings]:
        if raw is None:
            return {}
        where = str(self.home / MODELS_FILE)
        if is_omlx_models_file(raw):
            raw = {model_id: model_from_omlx(entry, MODEL_KEYS) for model_id, entry in raw["models"].items()}
        if not isinstance(raw, dict):
            log.warning("%s: expected an object mapping model ids to settings; ignoring it", where)
            return {}
        return {model_id: ModelSettings.from_dict(_lenient(entry, MODEL_KEYS, f"{where} [{model_id}]"))
                for model_id, entry in raw.items() if isinstance(model_id, str)}

    # ------------------------------------------------------------------ reading, typed
    def globals(self) -> GlobalSettings:
        """settings.json with the command line's overrides of its request-level keys (a copy
        with those fields replaced: nothing is parsed again)."""
        parsed = self._global.value()
        return parsed.with_values(self.overrides) if self.overrides else parsed

    def models(self) -> dict[str, ModelSettings]:
        return dict(self._models.value())

    def of_model(self, model_id: str) -> ModelSettings:
        return self._models.value().get(model_id, NO_MODEL_SETTINGS)

    def defaults(self, model_id: str, family: RequestDefaults | None = None) -> RequestDefaults:
        """What a request for `model_id` gets for the fields it does not set itself: the
        model's settings > `family` (a model family's own defaults, e.g. an OCR family's) >
        the global settings."""
        return model_request_defaults(self.of_model(model_id), self.globals(), family)

    # ------------------------------------------------------------------ reading, as the files say
    def global_settings(self) -> dict:
        return self.globals().as_dict()

    def all_models(self) -> dict[str, dict]:
        return {k: v.as_dict() for k, v in self._models.value().items()}

    def model(self, model_id: str) -> dict:
        return self.of_model(model_id).as_dict()

    def alias_target(self, name: str) -> str | None:
        """The model id whose alias is `name`, if any."""
        for model_id, entry in self._models.value().items():
            if entry.alias == name:
                return model_id
        return None

    def ttl(self, model_id: str) -> float | None:
        """Seconds an idle model stays loaded; None means until evicted."""
        return first_set(self.of_model(model_id).ttl, self.globals().ttl)

    def pinned(self, model_id: str) -> bool:
        return bool(self.of_model(model_id).pinned)

    def trust_remote_code(self, model_id: str) -> bool:
        return bool(first_set(self.of_model(model_id).trust_remote_code, self.globals().trust_remote_code))

    def request_defaults(self, model_id: str) -> dict:
        """`defaults` in the request body's form: sampling keys, max_tokens,
        chat_template_kwargs, and the model's thinking_budget, force_sampling and
        forced_ct_kwargs."""
        return self.defaults(model_id).as_fields()

    # ------------------------------------------------------------------ writing
    def update_model(self, model_id: str, patch: dict) -> dict:
        """Merge a validated update into one model's settings (None removes a key) and persist
        both files' model part atomically.  Returns the model's new settings."""
        patch = validate_model_settings(patch)
        alias = patch.get("alias")
        with self._lock:
            models = self.all_models()
            if alias is not None:
                owner = next((m for m, e in models.items() if e.get("alias") == alias and m != model_id), None)
                if owner is not None:
                    raise SettingsError(f"alias {alias!r} is already used by {owner!r}", "alias")
            entry = models.get(model_id, {})
            for key, value in patch.items():
                if value is None:
                    entry.pop(key, None)
                else:
                    entry[key] = value
            if entry:
                models[model_id] = entry
            else:
                models.pop(model_id, None)
            write_json_atomic(self.models_path, self._file_form(models, model_id))
            return dict(entry)

    def _file_form(self, models: dict[str, dict], changed: str) -> dict:
        """What to write: omlx's flat form, or oMLX's when the file is in oMLX's form, with
        the keys omlx does not manage kept as the user wrote them."""
        raw = _read_json(self.models_path)
        if not is_omlx_models_file(raw):
            return models
        raw_models = raw["models"]
        out = dict(raw)
        out["models"] = {
            model_id: model_to_omlx(models.get(model_id, {}), raw_models.get(model_id), MODEL_KEYS)
            if model_id == changed else raw_models[model_id]
            for model_id in dict.fromkeys([*raw_models, changed])
        }
        if not out["models"][changed]:
            del out["models"][changed]
        return out


# ---------------------------------------------------------------------------- server options


@dataclass(frozen=True)
class Option:
    """One server option: its settings.json key, env names (first wins) and how to parse text."""

    key: str
    env: tuple[str, ...]
    parse: Callable[[str], Any]
    default: Any = None
    # Env names whose text means something else than `parse` reads (oMLX's names for the
    # same option, in its own units).
    env_parse: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)


SERVER_OPTIONS: tuple[Option, ...] = (
    Option("host", ("OMLX_HOST",), str, "127.0.0.1"),
    Option("port", ("OMLX_PORT",), int, 8000),
    Option("model_dirs", ("OMLX_MODEL_DIR", "OMLX_MODEL_DIRS"), dirs_text),
    Option("api_key", ("OMLX_API_KEY",), str),
    Option("max_model_memory", ("OMLX_MAX_MODEL_MEMORY",), parse_bytes),
    Option("kv_cache_gb", ("OMLX_KV_CACHE_GB",), float),
    Option("block_size", ("OMLX_BLOCK_SIZE",), int, 32),
    Option("max_num_seqs", ("OMLX_MAX_NUM_SEQS", "OMLX_MAX_CONCURRENT_REQUESTS"), int, 64),
    # PREFILL_STEP_SIZE is the mlx-vlm server's name for how many prompt tokens go per step.
    Option("max_num_batched_tokens", ("OMLX_MAX_NUM_BATCHED_TOKENS", "PREFILL_STEP_SIZE"), int, 512),
    Option("max_vision_prompts_per_step", ("OMLX_MAX_VISION_PROMPTS_PER_STEP",), int, 1),
    Option("state_snapshot_tokens", ("OMLX_STATE_SNAPSHOT_TOKENS",), int, 256),
    # MAX_KV_SIZE (mlx-vlm): the most tokens one sequence keeps in its KV cache.
    Option("max_model_len", ("OMLX_MAX_MODEL_LEN", "MAX_KV_SIZE"), int),
    # KV_BITS / KV_GROUP_SIZE (mlx-vlm): store KV blocks quantized.
    Option("kv_bits", ("OMLX_KV_BITS", "KV_BITS"), int),
    Option("kv_group_size", ("OMLX_KV_GROUP_SIZE", "KV_GROUP_SIZE"), int, 64),
    # The dtype KV pools store keys and values in (auto: bf16 where the matmuls run packed
    # bf16, else the model's own; see omlx.scheduler.kv_dtype).
    Option("kv_dtype", ("OMLX_KV_DTYPE",), kv_dtype_text, "auto"),
    # QUANTIZED_KV_START (mlx-vlm / mlx-lm's --quantized-kv-start): with kv_bits, a sequence's
    # KV stays in the model's dtype until it holds this many tokens (0: quantized from the first).
    Option("quantized_kv_start", ("OMLX_QUANTIZED_KV_START", "QUANTIZED_KV_START"), non_negative_int_text, 0),
    # The prefix cache's disk tier (default $OMLX_HOME/cache), its size cap, and its switch.
    # (oMLX: OMLX_SSD_CACHE_DIR, OMLX_SSD_CACHE_MAX_SIZE as a size, OMLX_HOT_CACHE_ONLY meaning
    # no disk tier, OMLX_CACHE_ENABLED.)
    Option("kv_cache_dir", ("OMLX_KV_CACHE_DIR", "OMLX_SSD_CACHE_DIR"), str),
    Option("kv_disk_gb", ("OMLX_KV_DISK_GB", "OMLX_SSD_CACHE_MAX_SIZE"), float, 10.0,
           {"OMLX_SSD_CACHE_MAX_SIZE": gib_from_size}),
    Option("kv_disk", ("OMLX_KV_DISK", "OMLX_HOT_CACHE_ONLY"), bool_text, True,
           {"OMLX_HOT_CACHE_ONLY": lambda text: not bool_text(text)}),
    Option("prefix_cache", ("OMLX_PREFIX_CACHE", "OMLX_CACHE_ENABLED"), bool_text, True),
    # Speculative decoding inside the batch (prompt lookup, or a draft model) and the most
    # draft tokens a sequence verifies per step (mlx-lm's --num-draft-tokens).
    Option("speculative_decoding", ("OMLX_SPECULATIVE_DECODING",), bool_text, True),
    Option("num_draft_tokens", ("OMLX_NUM_DRAFT_TOKENS",), non_negative_int_text, 8),
    # Overlapped decode steps (omlx.scheduler.lookahead): the next step is built and queued
    # while this one computes.  Off only to measure it.
    Option("overlap_steps", ("OMLX_OVERLAP_STEPS",), bool_text, True),
    Option("draft_model", ("OMLX_DRAFT_MODEL",), str),
    Option("max_tokens", ("OMLX_MAX_TOKENS",), int),
    Option("ttl", ("OMLX_TTL",), float),
    Option("hf_cache", ("OMLX_HF_CACHE", "OMLX_HF_CACHE_ENABLED"), bool_text, True),
    Option("hf_endpoint", ("OMLX_HF_ENDPOINT",), str),
    Option("trust_remote_code", ("OMLX_TRUST_REMOTE_CODE", "MLX_TRUST_REMOTE_CODE"), bool_text, False),
    Option("log_level", ("OMLX_LOG_LEVEL",), str, "info"),
    Option("preload", ("OMLX_PRELOAD_MODEL", "PRELOAD_MODEL"), lambda t: [m for m in t.split(",") if m]),
    Option("preload_adapter", ("OMLX_PRELOAD_ADAPTER", "PRELOAD_ADAPTER"), str),
    # Robustness bounds (omlx.serving_limits.ServingLimits); None where it means "no cap".
    Option("shutdown_grace", ("OMLX_SHUTDOWN_GRACE",), float, 30.0),
    Option("max_waiting_requests", ("OMLX_MAX_WAITING_REQUESTS",), int),
    Option("max_waiting_total", ("OMLX_MAX_WAITING_TOTAL",), int),
    Option("queue_timeout", ("OMLX_QUEUE_TIMEOUT",), float),
    Option("max_request_size", ("OMLX_MAX_REQUEST_SIZE",), parse_bytes, 64 << 20),
    Option("client_read_timeout", ("OMLX_CLIENT_READ_TIMEOUT",), float, 60.0),
    Option("client_write_timeout", ("OMLX_CLIENT_WRITE_TIMEOUT",), float, 300.0),
    Option("sse_keepalive", ("OMLX_SSE_KEEPALIVE",), float, 10.0),
    Option("memory_reserve", ("OMLX_MEMORY_RESERVE",), parse_bytes),
    # Images in requests (omlx.vision.images.ImageLimits).
    Option("image_max_bytes", ("OMLX_IMAGE_MAX_BYTES",), parse_bytes, 20 << 20),
    Option("image_max_pixels", ("OMLX_IMAGE_MAX_PIXELS",), int, 40_000_000),
    Option("image_fetch_timeout", ("OMLX_IMAGE_FETCH_TIMEOUT",), float, 10.0),
    Option("image_max_count", ("OMLX_IMAGE_MAX_COUNT",), int, 16),
    # Which image / audio URLs the server fetches (omlx.media_policy).
    Option("allowed_media_domains", ("OMLX_ALLOWED_MEDIA_DOMAINS",),
           lambda t: [d.strip() for d in t.split(",") if d.strip()]),
    Option("allow_local_media_urls", ("OMLX_ALLOW_LOCAL_MEDIA_URLS",),
           lambda t: t.strip().lower() in ("1", "true", "yes", "on"), False),
    Option("allowed_local_media_path", ("OMLX_ALLOWED_LOCAL_MEDIA_PATH",), str),
    # Audio clips in requests (omlx.audio.clips.AudioLimits).
    Option("audio_max_bytes", ("OMLX_AUDIO_MAX_BYTES",), parse_bytes, 25 << 20),
    Option("audio_max_seconds", ("OMLX_AUDIO_MAX_SECONDS",), float, 600.0),
    Option("audio_fetch_timeout", ("OMLX_AUDIO_FETCH_TIMEOUT",), float, 10.0),
    Option("audio_max_count", ("OMLX_AUDIO_MAX_COUNT",), int, 8),
    Option("mcp_config", ("OMLX_MCP_CONFIG",), str),
    Option("mcp_expose_tools", ("OMLX_MCP_EXPOSE_TOOLS",), bool_text, True),
)

def option_default(key: str):
    """The built-in default of a server option, declared once in SERVER_OPTIONS (the engine's
    config takes its defaults from here too)."""
    return next(option.default for option in SERVER_OPTIONS if option.key == key)


def resolve_server_options(cli: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]) -> dict:
    """CLI value (when given) > env var > settings.json > default, for every server option.

    A malformed env value is an error the user must fix (it was set on purpose); values from
    the file were already checked when it was read.
    """
    resolved: dict[str, Any] = {}
    for option in SERVER_OPTIONS:
        if cli.get(option.key) is not None:
            resolved[option.key] = cli[option.key]
            continue
        name = next((n for n in option.env if env.get(n) not in (None, "")), None)
        if name is not None:
            try:
                resolved[option.key] = option.env_parse.get(name, option.parse)(env[name])
            except (ValueError, SettingsError) as exc:
                raise SettingsError(f"environment variable {name}={env[name]!r}: {exc}", name) from None
            continue
        if file.get(option.key) is not None:
            resolved[option.key] = file[option.key]
            continue
        resolved[option.key] = option.default
    return resolved
