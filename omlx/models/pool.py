"""Models the server knows about, loaded on first use, each with its own engine.

Loading runs in a worker thread so the event loop keeps serving; concurrent first requests
for the same model share one load.  (Memory-budgeted eviction is not here yet: a model
stays resident once loaded.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omlx.scheduler import AsyncEngine, EngineConfig, LLMEngine

from .discovery import DiscoveredModel, SkippedModel, discover_models, find_model

log = logging.getLogger("omlx.pool")

_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx", "n_positions")
DEFAULT_CONTEXT_WINDOW = 4096


def context_window_of(config: dict) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT_WINDOW


@dataclass
class LoadedModel:
    info: DiscoveredModel
    tokenizer: object  # mlx_lm TokenizerWrapper
    engine: AsyncEngine
    context_window: int
    loaded_at: float

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)


class ModelNotFound(KeyError):
    pass


class ModelPool:
    def __init__(
        self,
        model_dirs: list[Path],
        engine_config: EngineConfig,
        demo_model_id: str | None = None,
    ):
        self.model_dirs = model_dirs
        self.engine_config = engine_config
        self.demo_model_id = demo_model_id
        self.available: list[DiscoveredModel] = []
        self.skipped: list[SkippedModel] = []
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self.rescan()

    def rescan(self) -> None:
        self.available, self.skipped = discover_models(self.model_dirs)
        llms = [m for m in self.available if m.model_type == "llm"]
        log.debug("found %d model(s): %s", len(llms), ", ".join(m.model_id for m in llms) or "none")

    def servable(self) -> list[DiscoveredModel]:
        return [m for m in self.available if m.model_type == "llm"]

    def resolve(self, model_id: str) -> DiscoveredModel:
        info = find_model(self.servable(), model_id)
        if info is None:
            self.rescan()  # a folder may have been dropped in since start
            info = find_model(self.servable(), model_id)
        if info is None:
            raise ModelNotFound(model_id)
        return info

    async def get(self, model_id: str) -> LoadedModel:
        info = self.resolve(model_id)
        loaded = self.loaded.get(info.model_id)
        if loaded is not None:
            return loaded
        task = self._loading.get(info.model_id)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._load, info))
            self._loading[info.model_id] = task
            task.add_done_callback(lambda _: self._loading.pop(info.model_id, None))
        loaded = await asyncio.shield(task)
        self.loaded[info.model_id] = loaded
        return loaded

    def _load(self, info: DiscoveredModel) -> LoadedModel:
        from mlx_lm import load

        started = time.monotonic()
        model, tokenizer = load(str(info.path))
        window = context_window_of(info.config)
        scope = f"{info.model_id}:{info.path}:{info.size_bytes}".encode()
        engine = LLMEngine(model, self.engine_config, context_window=window, scope=scope)
        log.info("loaded %s in %.1fs (context %d)", info.model_id, time.monotonic() - started, window)
        return LoadedModel(info, tokenizer, AsyncEngine(engine), engine.max_model_len, time.time())

    def shutdown(self) -> None:
        for loaded in self.loaded.values():
            loaded.engine.shutdown()
        self.loaded.clear()
