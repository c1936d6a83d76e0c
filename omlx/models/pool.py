"""The model pool: what the rest of the server imports to find, lease, load and unload models.

A composition of three parts, each with one job:

    catalog    (omlx.models.catalog)    which models exist, by id, alias or adapter; their types
    loaders    (omlx.models.loaders)    one loader per model kind, each giving back a Resident
    residency  (omlx.models.residency)  leases, LRU eviction, TTL, pins, the memory ledger

A model loads on first use (in a worker thread, so the event loop keeps serving; concurrent
first requests share one load) and stays until it is evicted, unloaded, or idle past its TTL.
Before a load the pool reserves an estimate (file size + initial KV pool) and makes room; a
KV pool grows later only while the ledger has room (its engine preempts, or finally fails a
request, when it does not); without --kv-cache-gb its cap is what the budget leaves after the
weights, with a margin.

Leases: a request holds `async with pool.lease(model_id) as model:` for as long as it uses
the model (streaming included).  A leased model is never evicted and never unloaded by TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from omlx.allocator_caches import release_freed
from omlx.scheduler import EngineConfig
from omlx.settings import SettingsStore, default_model_memory_bytes

from .catalog import (  # noqa: F401 - the errors and type lists are imported from here
    GENERATIVE_TYPES,
    SERVABLE_TYPES,
    AdapterNotFound,
    ModelCatalog,
    ModelNotFound,
    ModelUnavailable,
)
from .discovery import DiscoveredModel, SkippedModel
from .facts import DEFAULT_CONTEXT_WINDOW, context_window_of  # noqa: F401
from .loaded import LoadedModel  # noqa: F401
from .loaders import (  # noqa: F401
    Loaders,
    engine_config_for,
    estimate_kv_bytes,
    load_estimate,
    paged_cannot_hold,
    runs_on_llm_engine,
)
from .resident import Resident
from .residency import InsufficientMemory, ModelBusy, Residence, Residency

log = logging.getLogger("omlx.pool")

TTL_CHECK_INTERVAL_S = 1.0


class ModelLoadFailed(Exception):
    pass


class ModelPool:
    def __init__(
        self,
        model_dirs: list[Path],
        engine_config: EngineConfig,
        demo_model_id: str | None = None,
        *,
        memory_budget: int | None = None,
        settings: SettingsStore | None = None,
        hf_cache_dirs: Iterable[Path] = (),
        extra_models: Iterable[DiscoveredModel] = (),
        pinned: Iterable[str] = (),
        preload: Iterable[str] = (),
        preload_adapter: str | None = None,
        metrics=None,
    ):
        """`metrics` (omlx.metrics.ServerMetrics) hears of loads, failed loads, evictions
        and unloads."""
        self.engine_config = engine_config
        self.demo_model_id = demo_model_id
        self.memory_budget = memory_budget or default_model_memory_bytes()
        self.settings = settings if settings is not None else SettingsStore()
        self.cli_pinned = set(pinned)
        self.preload = list(preload)
        self.preload_adapter = preload_adapter  # PRELOAD_ADAPTER: with each preloaded model
        self.metrics = metrics
        self.catalog = ModelCatalog(model_dirs, self.settings, hf_cache_dirs, extra_models)
        self.residency = Residency(self.memory_budget, self.is_pinned, self.settings.ttl, metrics)
        self.loaders = Loaders(self.settings, engine_config, self.memory_budget,
                               self.residency.kv_budget, self.resolve)
        self._loading: dict[str, asyncio.Task] = {}
        self._ttl_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ the catalog
    @property
    def model_dirs(self) -> list[Path]:
        return self.catalog.model_dirs

    @property
    def hf_cache_dirs(self) -> list[Path]:
        return self.catalog.hf_cache_dirs

    @property
    def available(self) -> list[DiscoveredModel]:
        return self.catalog.available

    @property
    def skipped(self) -> list[SkippedModel]:
        return self.catalog.skipped

    @property
    def adapter_models(self) -> list[DiscoveredModel]:
        return self.catalog.adapter_models

    def rescan(self) -> None:
        self.catalog.rescan()

    def servable(self, model_type: str | None = None) -> list[DiscoveredModel]:
        return self.catalog.servable(model_type)

    def resolve(self, name: str) -> DiscoveredModel:
        """A model by id, alias, or (for `org/name` ids) bare folder name; any type."""
        return self.catalog.resolve(name)

    def with_adapter(self, info: DiscoveredModel, adapter_path: str) -> DiscoveredModel:
        return self.catalog.with_adapter(info, adapter_path)

    def _entry(self, name: str, model_type: str | None, adapter_path: str | None) -> DiscoveredModel:
        info = self.resolve(name)
        self.catalog.check_type(info, model_type)
        return self.catalog.adapter_for(info, adapter_path) if adapter_path is not None else info

    # ------------------------------------------------------------------ the residency
    @property
    def loaded(self) -> dict[str, Resident]:
        """Resident models by id (LoadedModel for generating models, an encoder otherwise)."""
        return self.residency.models

    def resident(self, model_id: str) -> Residence | None:
        return self.residency.get(model_id)

    def is_loading(self, model_id: str) -> bool:
        return model_id in self._loading

    def is_pinned(self, model_id: str) -> bool:
        return model_id in self.cli_pinned or self.settings.pinned(model_id)

    @property
    def ledger(self):
        return self.residency.ledger

    @property
    def used_bytes(self) -> int:
        """Resident models' weights and KV pools, plus loads and unloads in progress."""
        return self.residency.used_bytes

    @property
    def evictions(self) -> int:
        return self.residency.evictions

    # ------------------------------------------------------------------ leases
    @contextlib.asynccontextmanager
    async def lease(self, name: str, model_type: str | None = "llm",
                    adapter_path: str | None = None) -> AsyncIterator[Resident]:
        """Hold a loaded model for the duration of a request; it cannot be evicted meanwhile.

        Raises ModelNotFound, ModelUnavailable (wrong or unsupported type),
        InsufficientMemory or ModelLoadFailed.
        """
        info = self._entry(name, model_type, adapter_path)
        while (residence := self.residency.take_lease(info.model_id)) is None:
            await asyncio.shield(self._load_task(info))
        try:
            yield residence.model
        finally:
            self.residency.end_lease(residence)

    # ------------------------------------------------------------------ load / unload
    async def load(self, name: str, adapter_path: str | None = None) -> Residence:
        """Load a model (if it is not resident yet) without holding a lease on it."""
        info = self._entry(name, None, adapter_path)
        while (residence := self.residency.get(info.model_id)) is None:
            await asyncio.shield(self._load_task(info))
        residence.mark_used()  # asking for it is a use: it is wanted now
        return residence

    def _load_task(self, info: DiscoveredModel) -> asyncio.Task:
        task = self._loading.get(info.model_id)
        if task is None:
            task = asyncio.ensure_future(self._load(info))
            self._loading[info.model_id] = task
            task.add_done_callback(lambda t: self._load_done(info.model_id, t))
        return task

    def _load_done(self, model_id: str, task: asyncio.Task) -> None:
        self._loading.pop(model_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody waits for any more is not "never retrieved"

    async def _load(self, info: DiscoveredModel) -> None:
        residency = self.residency
        async with residency.admission_lock():
            estimate = load_estimate(info, self.engine_config)
            await residency.make_room(estimate, info.model_id)
            key = residency.reserve(info.model_id, estimate)
        try:
            model = await asyncio.to_thread(self._load_sync, info)
        except (InsufficientMemory, ModelUnavailable):
            raise
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.model_load_failed(info.model_id)
            if info.adapter_path is not None:
                # The request's adapter folder is what failed: the client's input, not a fault.
                self.catalog.forget_adapter(info.model_id)
                log.warning("adapter %s on %s failed to load: %s", info.adapter_path, info.base_id, exc)
                raise AdapterNotFound(f"adapter_path {info.adapter_path!r} cannot be applied to "
                                      f"'{info.base_id}': {exc}") from exc
            log.exception("loading %s failed", info.model_id)
            raise ModelLoadFailed(f"loading '{info.model_id}' failed: {exc}") from exc
        finally:
            residency.ledger.release(key)
        residency.add(info.model_id, model)
        if self.metrics is not None:
            self.metrics.model_loaded(info.model_id)
        # The estimate can fall short of what was really allocated; settle the difference.
        async with residency.admission_lock():
            with contextlib.suppress(InsufficientMemory):
                await residency.make_room(0, info.model_id)

    def _load_sync(self, info: DiscoveredModel) -> Resident:
        model = self.loaders.load(info)
        # What loading read and dropped (float32 weights packed to bf16, file buffers) would
        # stay resident on malloc's free lists (50-150 MiB measured on bench/soak.py's 85M llama).
        release_freed()
        return model

    async def unload(self, name: str) -> bool:
        """Unload a resident model now; False if it was not loaded.  Raises ModelBusy while
        requests are using it."""
        return await self.residency.unload_idle(self.resolve(name).model_id)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load pinned and preloaded models, then watch TTLs."""
        wanted = list(dict.fromkeys(
            [*self.cli_pinned, *(m for m, s in self.settings.models().items() if s.pinned), *self.preload]
        ))
        for name in wanted:
            # PRELOAD_ADAPTER (mlx-vlm) goes with the preloaded models: that pair is the entry
            # loaded, as a request naming the model and the adapter would load it.
            adapter = self.preload_adapter if name in self.preload else None
            try:
                await self.load(name, adapter_path=adapter)
            except Exception as exc:  # the server still serves everything else
                log.error("could not load %s at startup: %s", name, exc)
        if self._ttl_task is None:
            self._ttl_task = asyncio.ensure_future(self._expire_idle_forever())

    async def expire_idle(self) -> list[str]:
        """Unload every idle, unpinned model whose TTL has passed; returns their ids."""
        return await self.residency.expire_idle()

    async def unload_vanished(self) -> list[str]:
        """Unload idle models whose folder was deleted while they were loaded."""
        return await self.residency.unload_vanished()

    async def _expire_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK_INTERVAL_S)
            try:
                await self.expire_idle()
                await self.unload_vanished()
            except Exception:
                log.exception("TTL check failed")

    async def close(self) -> None:
        if self._ttl_task is not None:
            self._ttl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ttl_task
            self._ttl_task = None
        await self.residency.unload_all()

    def shutdown(self) -> None:
        """Synchronous last resort at exit: stop every engine thread."""
        self.residency.shutdown()
