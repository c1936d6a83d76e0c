"""The settings files as typed values, and the one precedence every reader applies.

`GlobalSettings` (settings.json) and `ModelSettings` (one model's entry in
model_settings.json) are built once from a file's validated content, when it is read and
again when it changes (omlx.settings.SettingsStore); nothing downstream re-parses a dict.

What a request gets for a field it leaves unset is decided in one place,
`request_defaults`: the model's settings > a model family's own defaults (an OCR family's
prompt stops and greedy sampling) > the global settings > built-in (unset here; the request
parser's own defaults).  The request itself sits above all of them (omlx.api.turn_request).
The serving path, the admin API's status and the OCR defaults all go through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# oMLX's force_sampling pins these sampling fields over the request's.
FORCED_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k"})


def first_set(*values):
    """The first value that is not None (the precedence of one scalar setting)."""
    return next((v for v in values if v is not None), None)


# ---------------------------------------------------------------------------- request defaults


@dataclass(frozen=True)
class RequestDefaults:
    """One layer of defaults for a request's unset fields, or the layers merged.  None (and an
    empty object) means "this layer says nothing" and lets the next one speak."""

    sampling: Mapping[str, Any] = field(default_factory=dict)  # temperature ... seed, no stop
    stop: tuple[str, ...] | None = None
    max_tokens: int | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    thinking_budget: int | None = None
    force_sampling: bool | None = None
    forced_template_keys: tuple[str, ...] | None = None

    @classmethod
    def from_sampling(cls, sampling: Mapping | None, **fields) -> "RequestDefaults":
        """A layer from a settings `sampling` object, whose `stop` is a string or a list."""
        values = {k: v for k, v in (sampling or {}).items() if v is not None}
        stop = values.pop("stop", None)
        return cls(sampling=values, stop=(stop,) if isinstance(stop, str) else
                   tuple(stop) if stop is not None else None, **fields)

    @property
    def forced_sampling(self) -> frozenset:
        return FORCED_SAMPLING_FIELDS if self.force_sampling else frozenset()

    @property
    def forced_template_kwargs(self) -> dict:
        """Template kwargs that win over the request's own (oMLX's forced_ct_kwargs)."""
        return {k: self.template_kwargs[k] for k in self.forced_template_keys or () if k in self.template_kwargs}

    def as_fields(self) -> dict:
        """The request-body form: sampling keys and `stop` at the top level, plus max_tokens,
        chat_template_kwargs, thinking_budget, force_sampling and forced_ct_kwargs, each
        only where set (what SettingsStore.request_defaults has always returned)."""
        out: dict = dict(self.sampling)
        if self.stop is not None:
            out["stop"] = list(self.stop)
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.template_kwargs:
            out["chat_template_kwargs"] = dict(self.template_kwargs)
        if self.thinking_budget is not None:
            out["thinking_budget"] = self.thinking_budget
        if self.force_sampling is not None:
            out["force_sampling"] = self.force_sampling
        if self.forced_template_keys is not None:
            out["forced_ct_kwargs"] = list(self.forced_template_keys)
        return out


def request_defaults(*layers: RequestDefaults | None) -> RequestDefaults:
    """Layers from the highest precedence to the lowest (None: an absent layer): each scalar
    from the first layer that sets it, sampling and template kwargs key by key."""
    present = [layer for layer in layers if layer is not None]
    sampling: dict = {}
    template: dict = {}
    for layer in reversed(present):  # lower layers first, so higher ones overwrite
        sampling.update(layer.sampling)
        template.update(layer.template_kwargs)
    return RequestDefaults(
        sampling=sampling,
        stop=first_set(*(layer.stop for layer in present)),
        max_tokens=first_set(*(layer.max_tokens for layer in present)),
        template_kwargs=template,
        thinking_budget=first_set(*(layer.thinking_budget for layer in present)),
        force_sampling=first_set(*(layer.force_sampling for layer in present)),
        forced_template_keys=first_set(*(layer.forced_template_keys for layer in present)),
    )


# ---------------------------------------------------------------------------- the files


class _Settings:
    """Shared by both files' types: built from a validated object (unknown keys were dropped
    with a warning by then; a key of the schema tables without a field here is kept in
    `extra`), and turned back into the object the API and the file show."""

    extra: Mapping[str, Any]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})

    def with_values(self, values: Mapping[str, Any]):
        """A copy with `values` (already checked) in place of its own."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        extra = {k: v for k, v in values.items() if k not in names}
        return dataclasses.replace(self, **{k: v for k, v in values.items() if k in names},
                                   extra={**self.extra, **extra})

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, list) else v
               for k, v in out.items() if v is not None}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class GlobalSettings(_Settings):
    """settings.json (either format), validated; None: not set in the file."""

    host: str | None = None
    port: int | None = None
    model_dirs: list | str | None = None
    api_key: str | None = None
    api_keys: dict | None = None
    max_model_memory: int | None = None  # bytes (the file may say "8GB")
    kv_cache_gb: float | None = None
    sampling: dict | None = None
    max_tokens: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_vision_prompts_per_step: int | None = None
    state_snapshot_tokens: int | None = None
    block_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int | None = None
    kv_dtype: str | None = None
    quantized_kv_start: int | None = None
    kv_cache_dir: str | None = None
    kv_disk_gb: float | None = None
    kv_disk: bool | None = None
    prefix_cache: bool | None = None
    speculative_decoding: bool | None = None
    num_draft_tokens: int | None = None
    draft_model: str | None = None
    overlap_steps: bool | None = None
    max_model_len: int | None = None
    ttl: float | None = None
    hf_cache: bool | None = None
    trust_remote_code: bool | None = None
    chat_template_kwargs: dict | None = None
    log_level: str | None = None
    mcp_config: str | None = None
    mcp_expose_tools: bool | None = None
    hf_endpoint: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def request_layer(self) -> RequestDefaults:
        return RequestDefaults.from_sampling(self.sampling, max_tokens=self.max_tokens,
                                             template_kwargs=self.chat_template_kwargs or {})


@dataclass(frozen=True)
class ModelSettings(_Settings):
    """One model's settings (either format), validated; None: not set."""

    alias: str | None = None
    model_type: str | None = None
    sampling: dict | None = None
    max_tokens: int | None = None
    ttl: float | None = None
    pinned: bool | None = None
    trust_remote_code: bool | None = None
    chat_template_kwargs: dict | None = None
    tool_parser: str | None = None
    adapter_path: str | None = None
    kv_cache_gb: float | None = None
    kv_bits: int | None = None
    kv_group_size: int | None = None
    kv_dtype: str | None = None
    quantized_kv_start: int | None = None
    dequantize: bool | None = None
    max_context_window: int | None = None
    thinking_budget: int | None = None
    speculative_decoding: bool | None = None
    num_draft_tokens: int | None = None
    draft_model: str | None = None
    force_sampling: bool | None = None
    forced_ct_kwargs: list | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def request_layer(self) -> RequestDefaults:
        return RequestDefaults.from_sampling(
            self.sampling, max_tokens=self.max_tokens, template_kwargs=self.chat_template_kwargs or {},
            thinking_budget=self.thinking_budget, force_sampling=self.force_sampling,
            forced_template_keys=tuple(self.forced_ct_kwargs) if self.forced_ct_kwargs is not None else None,
        )


NO_MODEL_SETTINGS = ModelSettings()


def model_request_defaults(model: ModelSettings, glob: GlobalSettings,
                           family: RequestDefaults | None = None) -> RequestDefaults:
    """What a request to this model gets for what it leaves unset: model > family > global."""
    return request_defaults(model.request_layer(), family, glob.request_layer())
