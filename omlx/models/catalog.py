"""The models this server knows about: discovery over the model dirs, the Hugging Face cache
and packaged models, type overrides, aliases, LoRA adapter entries, and which can serve what.

Nothing here loads a model; the catalog only answers "which model is this name, and may it
serve this request" (omlx.models.pool composes it with the loaders and the residency).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from omlx.settings import SettingsStore

from .discovery import DiscoveredModel, SkippedModel, discover_hf_cache, discover_models, find_model

log = logging.getLogger("omlx.pool")

SERVABLE_TYPES = ("llm", "vlm", "ocr", "embedding", "reranker", "stt")
# Types that generate text: a request for an "llm" is served by any of them.
GENERATIVE_TYPES = ("llm", "vlm", "ocr")


class ModelNotFound(KeyError):
    pass


class ModelUnavailable(Exception):
    """The model exists but this server cannot serve it (its type, or for this route)."""


class AdapterNotFound(ValueError):
    """A request's adapter_path is not a LoRA adapter folder."""


class ModelCatalog:
    def __init__(self, model_dirs: list[Path], settings: SettingsStore, hf_cache_dirs: Iterable[Path] = (),
                 extra_models: Iterable[DiscoveredModel] = ()):
        self.model_dirs = list(model_dirs)
        self.settings = settings
        self.hf_cache_dirs = list(hf_cache_dirs)
        self.extra_models = list(extra_models)  # e.g. the embedding model shipped in a package
        # Base model + LoRA adapter pairs asked for by requests, each its own pool entry.
        self._adapter_models: dict[str, DiscoveredModel] = {}
        self.available: list[DiscoveredModel] = []
        self.skipped: list[SkippedModel] = []
        self.rescan()

    # ------------------------------------------------------------------ discovery
    def rescan(self) -> None:
        models, skipped = discover_models(self.model_dirs)
        seen = {m.model_id for m in models}
        for extra in self._hf_cache_models(skipped) + self.extra_models:
            if extra.model_id not in seen:
                models.append(extra)
                seen.add(extra.model_id)
        overrides = self.settings.models()
        self.available = sorted(
            (_with_type_override(m, overrides.get(m.model_id)) for m in models),
            key=lambda m: m.model_id,
        )
        self.skipped = skipped
        log.debug("found %d model(s): %s", len(self.available),
                  ", ".join(m.model_id for m in self.available) or "none")

    def _hf_cache_models(self, skipped: list[SkippedModel]) -> list[DiscoveredModel]:
        found: list[DiscoveredModel] = []
        for cache in self.hf_cache_dirs:
            models, bad = discover_hf_cache(cache)
            found += models
            skipped += bad
        return found

    def servable(self, model_type: str | None = None) -> list[DiscoveredModel]:
        types = SERVABLE_TYPES if model_type is None else (model_type,)
        return [m for m in self.available if m.model_type in types]

    # ------------------------------------------------------------------ names
    def resolve(self, name: str) -> DiscoveredModel:
        """A model by id, alias, or (for `org/name` ids) bare folder name; any type."""
        info = self._lookup(name)
        if info is None or not info.path.exists():
            # A folder may have been dropped in, or an alias set, since; or this one deleted.
            self.rescan()
            info = self._lookup(name)
        if info is None:
            raise ModelNotFound(name)
        return info

    def _lookup(self, name: str) -> DiscoveredModel | None:
        if name in self._adapter_models:
            return self._adapter_models[name]
        info = find_model(self.available, name)
        if info is None:
            target = self.settings.alias_target(name)
            info = find_model(self.available, target) if target else None
        if info is None and "/" not in name:
            matches = [m for m in self.available if m.model_id.rsplit("/", 1)[-1] == name]
            info = matches[0] if len(matches) == 1 else None
        return info

    @staticmethod
    def check_type(info: DiscoveredModel, wanted: str | None) -> None:
        """Raise ModelUnavailable unless `info` can serve a request for a `wanted` model
        (None: any servable type)."""
        if info.model_type not in SERVABLE_TYPES:
            raise ModelUnavailable(
                f"'{info.model_id}' is a {info.model_type} model; this server serves "
                f"{' and '.join(SERVABLE_TYPES)} models only so far"
            )
        if wanted == "llm" and info.model_type in GENERATIVE_TYPES:
            return
        if wanted is not None and info.model_type != wanted:
            raise ModelUnavailable(
                f"'{info.model_id}' is a{'n' if info.model_type[0] in 'aeiou' else ''} "
                f"{info.model_type} model and cannot serve this {wanted} request"
            )

    # ------------------------------------------------------------------ adapters
    def adapter_for(self, info: DiscoveredModel, adapter_path: str) -> DiscoveredModel:
        if info.model_type != "llm":
            raise ModelUnavailable(f"'{info.model_id}' is a {info.model_type} model; LoRA adapters apply to LLMs")
        return self.with_adapter(info, adapter_path)

    def with_adapter(self, info: DiscoveredModel, adapter_path: str) -> DiscoveredModel:
        """The pool entry serving `info` with the LoRA adapter at `adapter_path` (the mlx-vlm
        server's per-request `adapter_path`): loaded, leased and evicted like any model."""
        if info.base_id is not None:
            info = self.resolve(info.base_id)
        try:
            path = Path(adapter_path).expanduser()
            found = (path / "adapter_config.json").is_file()
            path = path.resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, ~nobody
            raise AdapterNotFound(f"adapter_path {adapter_path!r} is not a usable path: {exc}") from None
        if not found:
            raise AdapterNotFound(f"adapter_path {adapter_path!r} is not a LoRA adapter folder "
                                  "(no adapter_config.json in it)")
        model_id = f"{info.model_id}+{path.name}"
        taken = self._adapter_models.get(model_id)
        if taken is not None and taken.adapter_path != str(path):  # same folder name elsewhere
            model_id += "-" + hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()
        entry = self._adapter_models.get(model_id)
        if entry is None:
            entry = dataclasses.replace(info, model_id=model_id, adapter_path=str(path), base_id=info.model_id)
            self._adapter_models[model_id] = entry
        return entry

    def forget_adapter(self, model_id: str) -> None:
        """An adapter entry whose load failed: the request's folder was the problem."""
        self._adapter_models.pop(model_id, None)

    @property
    def adapter_models(self) -> list[DiscoveredModel]:
        return list(self._adapter_models.values())


def _with_type_override(info: DiscoveredModel, settings) -> DiscoveredModel:
    override = settings.model_type if settings is not None else None
    if override and override != info.model_type:
        return dataclasses.replace(info, model_type=override)
    return info
