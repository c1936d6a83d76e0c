"""The models the server knows about, and the ones resident in memory under a budget.

A model loads on first use (in a worker thread, so the event loop keeps serving; concurrent
first requests share one load) and stays until it is evicted, unloaded, or idle past its TTL.

Memory: every resident model counts its weights plus its KV pool against `memory_budget`,
in a ledger shared with the engine threads (omlx.models.memory_ledger).  Before a load, the
pool reserves an estimate (file size + initial KV pool) and makes room by unloading the least
recently used model that is idle (no lease) and not pinned.  If nothing can go, the load fails
with InsufficientMemory rather than overcommitting the machine.  A KV pool grows later only
while the ledger has room (its engine preempts, or finally fails a request, when it does not);
without --kv-cache-gb its cap is what the budget leaves after the weights, with a margin.

Leases: a request holds `async with pool.lease(model_id) as model:` for as long as it uses
the model (streaming included).  A leased model is never evicted and never unloaded by TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from omlx.scheduler import AsyncEngine, EngineConfig, LLMEngine, default_kv_cache_bytes
from .facts import parameter_bytes
from omlx.scheduler.fallback_engine import FallbackEngine
from omlx.scheduler.layer_kinds import UnsupportedLayout
from omlx.settings import SettingsStore

from .discovery import DiscoveredModel, SkippedModel, discover_hf_cache, discover_models, find_model
from .loaded import LoadedModel
from .content_hash import folder_fingerprint
from .cpu_weights import should_dequantize, to_float32
from . import packed_weights
from omlx.kernels.linear import matmul_path
from .memory_ledger import MemoryLedger

log = logging.getLogger("omlx.pool")

_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx", "n_positions")
DEFAULT_CONTEXT_WINDOW = 4096
SERVABLE_TYPES = ("llm", "vlm", "ocr", "embedding", "reranker")
# Types that generate text: a request for an "llm" is served by any of them.
GENERATIVE_TYPES = ("llm", "vlm", "ocr")
TTL_CHECK_INTERVAL_S = 1.0


def runs_on_llm_engine(info: DiscoveredModel) -> bool:
    """Generative models, and LLM rerankers (causal LMs scored on their yes/no logits);
    cross-encoder rerankers and embedding models run on their own batchers instead."""
    if info.model_type in GENERATIVE_TYPES:
        return True
    return info.model_type == "reranker" and not str(info.architecture or "").endswith("ForSequenceClassification")


def paged_cannot_hold(exc: Exception) -> bool:
    """Whether LLMEngine refused a model because the paged KV pool cannot hold its caches
    (`UnsupportedLayout`; older engines said so with a plain ValueError)."""
    return isinstance(exc, UnsupportedLayout) or "paged KV serving supports" in str(exc)


def context_window_of(config: dict) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT_WINDOW


# ---------------------------------------------------------------------------- errors


class ModelNotFound(KeyError):
    pass


class ModelUnavailable(Exception):
    """The model exists but this server cannot serve it (its type, or for this route)."""


class InsufficientMemory(Exception):
    """The model does not fit in the memory budget and nothing idle can be evicted."""


class ModelBusy(Exception):
    """An explicit unload of a model that is serving requests."""


class ModelLoadFailed(Exception):
    pass


class AdapterNotFound(ValueError):
    """A request's adapter_path is not a LoRA adapter folder."""


# ---------------------------------------------------------------------------- residency


@dataclass
class Resident:
    """A loaded model and its bookkeeping: bytes counted against the budget, leases held."""

    model: object  # LoadedModel or omlx.embeddings.LoadedEmbedder
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    released_bytes: int = 0  # what it held when unloaded

    @property
    def memory_bytes(self) -> int:
        """Weights plus the KV pool as it is now (pools grow while serving)."""
        return self.model.memory_bytes if self.model is not None else self.released_bytes

    @property
    def idle_s(self) -> float:
        return time.monotonic() - self.last_used


def estimate_kv_bytes(config: dict, engine: EngineConfig) -> int:
    """The KV pool an engine will allocate at load for this model, from its config alone
    (a growable pool starts at its initial size; growing later is paid for then)."""
    if engine.num_blocks is None:
        return min(engine.kv_cache_bytes or engine.initial_kv_bytes, engine.initial_kv_bytes)
    source = config.get("text_config") or config
    heads = source.get("num_attention_heads") or 1
    kv_heads = source.get("num_key_value_heads") or heads
    head_dim = source.get("head_dim") or (source.get("hidden_size") or 0) // heads
    layers = source.get("num_hidden_layers") or 0
    dtype = str(config.get("torch_dtype") or source.get("torch_dtype") or "bfloat16")
    itemsize = 4 if "32" in dtype else 2
    return engine.num_blocks * engine.block_size * layers * kv_heads * head_dim * 2 * itemsize


def engine_config_for(base: EngineConfig, settings: dict) -> EngineConfig:
    """The server's engine settings with this model's own KV quantization (bits, group size,
    quantized_kv_start), KV cap and speculative decoding, where it sets them."""
    overrides = {}
    if settings.get("kv_bits") is not None:
        overrides["kv_bits"] = settings["kv_bits"] or None
    if settings.get("kv_group_size") is not None:
        overrides["kv_group_size"] = settings["kv_group_size"]
    if settings.get("quantized_kv_start") is not None:
        overrides["quantized_kv_start"] = settings["quantized_kv_start"]
    for key, field_name in (("speculative_decoding", "speculative"), ("num_draft_tokens", "num_draft_tokens"),
                            ("draft_model", "draft_model")):
        if settings.get(key) is not None:
            overrides[field_name] = settings[key]
    if settings.get("kv_cache_gb") is not None:
        overrides["kv_cache_bytes"] = int(settings["kv_cache_gb"] * 2**30)
    if settings.get("max_context_window") is not None:  # oMLX's per-model context limit
        cap = settings["max_context_window"]
        overrides["max_model_len"] = min(base.max_model_len or cap, cap)
    return dataclasses.replace(base, **overrides) if overrides else base


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
        from omlx.settings import default_model_memory_bytes

        self.model_dirs = list(model_dirs)
        self.engine_config = engine_config
        self.demo_model_id = demo_model_id
        self.memory_budget = memory_budget or default_model_memory_bytes()
        self.ledger = MemoryLedger(self.memory_budget)
        self.settings = settings if settings is not None else SettingsStore()
        self.hf_cache_dirs = list(hf_cache_dirs)
        self.extra_models = list(extra_models)  # e.g. the embedding model shipped in a package
        self.cli_pinned = set(pinned)
        self.preload = list(preload)
        self.preload_adapter = preload_adapter  # PRELOAD_ADAPTER: with each preloaded model
        # Base model + LoRA adapter pairs asked for by requests, each its own pool entry.
        self._adapter_models: dict[str, DiscoveredModel] = {}
        self.available: list[DiscoveredModel] = []
        self.skipped: list[SkippedModel] = []
        self._residents: dict[str, Resident] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._admission: asyncio.Lock | None = None
        self._ttl_task: asyncio.Task | None = None
        self.evictions = 0
        self.metrics = metrics
        self.rescan()

    # ------------------------------------------------------------------ discovery
    def rescan(self) -> None:
        models, skipped = discover_models(self.model_dirs)
        seen = {m.model_id for m in models}
        for extra in self._hf_cache_models(skipped) + self.extra_models:
            if extra.model_id not in seen:
                models.append(extra)
                seen.add(extra.model_id)
        overrides = self.settings.all_models()
        self.available = sorted(
            (self._with_type_override(m, overrides.get(m.model_id, {})) for m in models),
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

    @staticmethod
    def _with_type_override(info: DiscoveredModel, settings: dict) -> DiscoveredModel:
        override = settings.get("model_type")
        if override and override != info.model_type:
            return dataclasses.replace(info, model_type=override)
        return info

    def servable(self, model_type: str | None = None) -> list[DiscoveredModel]:
        types = SERVABLE_TYPES if model_type is None else (model_type,)
        return [m for m in self.available if m.model_type in types]

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

    @property
    def adapter_models(self) -> list[DiscoveredModel]:
        return list(self._adapter_models.values())

    # ------------------------------------------------------------------ state
    @property
    def loaded(self) -> dict[str, object]:
        """Resident models by id (LoadedModel for LLMs, LoadedEmbedder for embeddings)."""
        return {model_id: r.model for model_id, r in self._residents.items()}

    def resident(self, model_id: str) -> Resident | None:
        return self._residents.get(model_id)

    def is_loading(self, model_id: str) -> bool:
        return model_id in self._loading

    def is_pinned(self, model_id: str) -> bool:
        return model_id in self.cli_pinned or self.settings.pinned(model_id)

    @property
    def used_bytes(self) -> int:
        """Resident models' weights and KV pools, plus loads and unloads in progress."""
        return self.ledger.used

    # ------------------------------------------------------------------ leases
    @contextlib.asynccontextmanager
    async def lease(self, name: str, model_type: str | None = "llm",
                    adapter_path: str | None = None) -> AsyncIterator[object]:
        """Hold a loaded model for the duration of a request; it cannot be evicted meanwhile.

        Raises ModelNotFound, ModelUnavailable (wrong or unsupported type),
        InsufficientMemory or ModelLoadFailed.
        """
        resident = await self._acquire(name, model_type, adapter_path)
        try:
            yield resident.model
        finally:
            resident.leases -= 1
            resident.last_used = time.monotonic()

    async def _acquire(self, name: str, model_type: str | None, adapter_path: str | None = None) -> Resident:
        info = self.resolve(name)
        self._check_type(info, model_type)
        if adapter_path is not None:
            info = self._adapter_for(info, adapter_path)
        while True:
            resident = self._residents.get(info.model_id)
            if resident is not None:
                resident.leases += 1  # no await since the lookup: it cannot be evicted in between
                resident.last_used = time.monotonic()
                return resident
            await asyncio.shield(self._load_task(info))

    @staticmethod
    def _check_type(info: DiscoveredModel, wanted: str | None) -> None:
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

    # ------------------------------------------------------------------ load / unload
    def _adapter_for(self, info: DiscoveredModel, adapter_path: str) -> DiscoveredModel:
        if info.model_type != "llm":
            raise ModelUnavailable(f"'{info.model_id}' is a {info.model_type} model; LoRA adapters apply to LLMs")
        return self.with_adapter(info, adapter_path)

    async def load(self, name: str, adapter_path: str | None = None) -> Resident:
        """Load a model (if it is not resident yet) without holding a lease on it."""
        info = self.resolve(name)
        self._check_type(info, None)
        if adapter_path is not None:
            info = self._adapter_for(info, adapter_path)
        while info.model_id not in self._residents:
            await asyncio.shield(self._load_task(info))
        resident = self._residents[info.model_id]
        resident.last_used = time.monotonic()  # asking for it is a use: it is wanted now
        return resident

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
        estimate = info.size_bytes + (estimate_kv_bytes(info.config.get("text_config") or info.config, self.engine_config)
                                      if runs_on_llm_engine(info) else 0)
        key = f"load:{info.model_id}"
        async with self._admission_lock():
            await self._make_room(estimate, info.model_id)
            self.ledger.set(key, estimate)
        try:
            model = await asyncio.to_thread(self._load_sync, info)
        except (InsufficientMemory, ModelUnavailable):
            raise
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.model_load_failed(info.model_id)
            if info.adapter_path is not None:
                # The request's adapter folder is what failed: the client's input, not a fault.
                self._adapter_models.pop(info.model_id, None)
                log.warning("adapter %s on %s failed to load: %s", info.adapter_path, info.base_id, exc)
                raise AdapterNotFound(f"adapter_path {info.adapter_path!r} cannot be applied to "
                                      f"'{info.base_id}': {exc}") from exc
            log.exception("loading %s failed", info.model_id)
            raise ModelLoadFailed(f"loading '{info.model_id}' failed: {exc}") from exc
        finally:
            self.ledger.release(key)
        self.ledger.set(f"model:{info.model_id}", model.memory_bytes)
        self._residents[info.model_id] = Resident(model)
        if self.metrics is not None:
            self.metrics.model_loaded(info.model_id)
        log.info("%s resident: %.1f MiB (pool %.1f / %.1f MiB)", info.model_id,
                 model.memory_bytes / 2**20, self.used_bytes / 2**20, self.memory_budget / 2**20)
        # The estimate can fall short of what was really allocated; settle the difference.
        async with self._admission_lock():
            with contextlib.suppress(InsufficientMemory):
                await self._make_room(0, info.model_id)

    def _load_sync(self, info: DiscoveredModel):
        if info.model_type == "embedding":
            from omlx.embeddings import load_embedder

            return load_embedder(info)
        if info.model_type in ("vlm", "ocr"):
            return self._load_vlm(info)
        if not runs_on_llm_engine(info):  # a cross-encoder reranker
            from omlx.rerank.cross_encoder import UnsupportedReranker, load_cross_encoder

            try:
                return load_cross_encoder(info)
            except UnsupportedReranker as exc:
                raise ModelUnavailable(f"'{info.model_id}' cannot be served: {exc}") from None
        return self._load_llm(info)

    def _load_llm(self, info: DiscoveredModel) -> LoadedModel:
        from mlx_lm import load

        started = time.monotonic()
        settings = self.settings.model(info.settings_id)
        trust = self.settings.trust_remote_code(info.settings_id)
        adapter = info.adapter_path or settings.get("adapter_path")
        folder = info.path
        if info.weights_format == "gguf":
            from omlx.gguf.convert import converted_folder

            folder = converted_folder(info.path)  # once per file content; cached after
        model, tokenizer = load(
            str(folder),
            tokenizer_config={"trust_remote_code": True} if trust else None,
            adapter_path=adapter,
        )
        window = context_window_of(info.config)
        dequantized = should_dequantize(settings.get("dequantize"), model, self.memory_budget)
        packed = packed_weights.prepare(model, settings.get("dequantize"), dequantized)
        if packed:
            log.info("%s runs with bf16 weights packed for this CPU (%s)", info.model_id, matmul_path().isa)
        elif dequantized:
            to_float32(model)
            log.info("%s runs dequantized in float32 (faster on this CPU; model setting "
                     "'dequantize': false keeps the stored weights)", info.model_id)
        # The model's identity for the prefix cache and its disk tier is what it computes,
        # not where it lives: its files' content (weights, config, tokenizer, adapter) and
        # the form its weights run in.  A moved or renamed model keeps its cached blocks; one
        # overwritten in place never reads blocks computed for the old weights.
        scope = b"content:" + folder_fingerprint(folder, adapter) + (b":bf16-packed" if packed else b":float32" if dequantized else b"")
        loaded = self._serve(info, model, tokenizer, scope, window, settings)
        log.info("loaded %s in %.1fs (context %d)", info.model_id, time.monotonic() - started, window)
        return loaded

    def _serve(self, info: DiscoveredModel, model, tokenizer, scope: bytes, window: int, settings: dict,
               vision=None, weights: int | None = None) -> LoadedModel:
        """A loaded model's engine, sized under the memory budget."""
        config = engine_config_for(self.engine_config, settings)
        weights = parameter_bytes(model) if weights is None else weights
        if config.kv_cache_bytes is None and config.num_blocks is None:
            config = dataclasses.replace(config, kv_cache_bytes=default_kv_cache_bytes(weights, self.memory_budget))
        holder = f"model:{info.model_id}"
        draft = self._draft_model(info, config, tokenizer) if config.speculative and config.draft_model else None
        if draft is not None:
            weights += parameter_bytes(draft)
        def kv_budget(nbytes: int) -> bool:
            return self.ledger.try_add(holder, nbytes)

        label = f"{info.model_id} ({info.path})"
        engine = refused = None
        try:
            engine = LLMEngine(model, config, context_window=window, scope=scope, kv_budget=kv_budget,
                               label=label, vision=vision, draft_model=draft)
        except ValueError as exc:
            if not paged_cannot_hold(exc):
                raise
            refused = str(exc)  # (built outside this block: the refused engine's pools go first)
        if engine is None:
            # Every model mlx-lm loads serves: over its own caches, batched, if not paged.
            log.warning("%s: the paged engine cannot serve it (%s); serving it with the fallback engine",
                        info.model_id, refused)
            if draft is not None:
                log.warning("%s: draft model %r not used (the fallback engine does not speculate)",
                            info.model_id, config.draft_model)
                weights -= parameter_bytes(draft)
            engine = FallbackEngine(model, config, context_window=window, reason=refused, kv_budget=kv_budget,
                                    label=label, vision=vision)
        return LoadedModel(info, tokenizer, AsyncEngine(engine), engine.max_model_len, time.time(),
                           weights_bytes=weights)

    def _draft_model(self, info: DiscoveredModel, config: EngineConfig, tokenizer):
        """The draft model named by `draft_model` (a model in the model dirs), loaded for this
        model alone.  It must read and write the same tokens: same vocabulary as the tokenizer.
        A draft that cannot be used is logged and the model serves with prompt lookup."""
        from mlx_lm import load

        name = config.draft_model
        try:
            draft_info = self.resolve(name)
            if draft_info.model_id == info.model_id:
                raise ValueError("a model cannot draft for itself")
            if draft_info.model_type != "llm":
                raise ValueError(f"it is a {draft_info.model_type} model, not an llm")
            folder = draft_info.path
            if draft_info.weights_format == "gguf":
                from omlx.gguf.convert import converted_folder

                folder = converted_folder(draft_info.path)
            draft, draft_tokenizer = load(str(folder))
            # The draft's weights take the same form as a served model's (packed bf16 here).
            packed_weights.prepare(draft, None, should_dequantize(None, draft, self.memory_budget))
            if draft_tokenizer.vocab_size != tokenizer.vocab_size or (
                    draft_tokenizer.encode("speculative check: 12345 tokens") != tokenizer.encode("speculative check: 12345 tokens")):
                raise ValueError("its tokenizer differs from the model's")
        except Exception as exc:  # noqa: BLE001 - any failure means: serve without it
            log.warning("%s: draft model %r not used (%s); drafting with prompt lookup", info.model_id, name, exc)
            return None
        log.info("%s: drafting with %s", info.model_id, draft_info.model_id)
        return draft

    def _load_vlm(self, info: DiscoveredModel) -> LoadedModel:
        """A vision-language (or OCR) model through mlx-vlm: its language model runs in the
        same paged engine as any LLM, its vision tower at prefill (omlx.vision)."""
        from omlx.vision.loader import load_vision_model

        started = time.monotonic()
        settings = self.settings.model(info.settings_id)
        trust = self.settings.trust_remote_code(info.settings_id)
        language, inputs, tokenizer, side = load_vision_model(str(info.path), info.config, info.model_type, trust)
        if not hasattr(side.vlm, "vision_tower") or not hasattr(side.vlm, "language_model"):
            raise ModelUnavailable(
                f"'{info.model_id}' is a {info.model_type} model, but mlx-vlm builds no vision model from its "
                f"config (model_type {info.config.get('model_type')!r}); set its type to llm if it is text-only")
        scope = b"content:" + folder_fingerprint(info.path, None)
        window = context_window_of(info.config.get("text_config") or info.config)
        loaded = self._serve(info, language, tokenizer, scope, window, settings, vision=inputs,
                             weights=parameter_bytes(side.vlm))
        loaded.vision = side
        log.info("loaded %s (%s, vision) in %.1fs (context %d)", info.model_id, side.family,
                 time.monotonic() - started, window)
        return loaded

    async def _make_room(self, needed: int, for_model: str) -> None:
        """Unload idle, unpinned models, least recently used first, until `needed` more bytes
        fit in the budget.  Call with the admission lock held."""
        if needed > self.memory_budget:
            raise InsufficientMemory(
                f"'{for_model}' needs about {_gib(needed)} of memory, more than the whole model "
                f"memory budget of {_gib(self.memory_budget)} (--max-model-memory)"
            )
        while self.used_bytes + needed > self.memory_budget:
            if await self._shrink_an_idle_kv_pool(for_model):
                continue  # cached prefixes go before whole models do
            idle = [(r.last_used, model_id) for model_id, r in self._residents.items()
                    if r.leases == 0 and model_id != for_model and not self.is_pinned(model_id)]
            if not idle:
                busy = [f"{m} ({'pinned' if self.is_pinned(m) else f'{r.leases} request(s)'})"
                        for m, r in sorted(self._residents.items()) if m != for_model]
                raise InsufficientMemory(
                    f"'{for_model}' needs about {_gib(needed)} of memory but only "
                    f"{_gib(max(0, self.memory_budget - self.used_bytes))} of the "
                    f"{_gib(self.memory_budget)} budget is free, and every resident model is in "
                    f"use or pinned: {', '.join(busy) or 'none (other loads are in progress)'}. "
                    "Retry when a request finishes, or raise --max-model-memory."
                )
            _, victim = min(idle)
            log.info("evicting %s (least recently used, idle) to make room for %s", victim, for_model)
            self.evictions += 1
            if self.metrics is not None:
                self.metrics.model_evicted(victim)
            await self._unload(victim)

    async def _shrink_an_idle_kv_pool(self, for_model: str) -> bool:
        """Shrink the least recently used idle model's grown KV pool back to its initial size
        (its blocks hold only cached prefixes then); False if no pool could give anything."""
        candidates = sorted(
            (r.last_used, model_id) for model_id, r in self._residents.items()
            if r.leases == 0 and model_id != for_model and isinstance(r.model, LoadedModel)
            and r.model.kv_pool_grown
        )
        for _, model_id in candidates:
            resident = self._residents[model_id]
            try:
                freed = await asyncio.wait_for(asyncio.wrap_future(resident.model.shrink_kv_pool()), 60)
            except Exception as exc:  # a stopped engine, or one too busy to answer
                log.warning("could not shrink %s's KV pool: %s", model_id, exc)
                continue
            if freed:
                self.ledger.reduce(f"model:{model_id}", freed)
                log.info("shrank idle %s's KV pool by %s to make room for %s", model_id, _gib(freed), for_model)
                return True
        return False

    async def unload(self, name: str) -> bool:
        """Unload a resident model now; False if it was not loaded.  Raises ModelBusy while
        requests are using it."""
        info = self.resolve(name)
        resident = self._residents.get(info.model_id)
        if resident is None:
            return False
        if resident.leases:
            raise ModelBusy(f"'{info.model_id}' is serving {resident.leases} request(s); unload it when they finish")
        await self._unload(info.model_id)
        return True

    async def _unload(self, model_id: str) -> None:
        resident = self._residents.pop(model_id)
        if self.metrics is not None:
            self.metrics.model_unloading(model_id, resident.model)
        key = f"unload:{model_id}"
        # Its memory counts until the engine thread has stopped and the arrays are freed.
        resident.released_bytes = resident.memory_bytes
        self.ledger.set(key, max(resident.released_bytes, self.ledger.release(f"model:{model_id}")))
        try:
            await asyncio.to_thread(_release, resident)
        finally:
            self.ledger.release(key)
        log.info("unloaded %s", model_id)

    def _admission_lock(self) -> asyncio.Lock:
        if self._admission is None:
            self._admission = asyncio.Lock()
        return self._admission

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load pinned and preloaded models, then watch TTLs."""
        wanted = list(dict.fromkeys(
            [*self.cli_pinned, *(m for m, s in self.settings.all_models().items() if s.get("pinned")),
             *self.preload]
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
        expired = []
        for model_id, resident in list(self._residents.items()):
            ttl = self.settings.ttl(model_id)
            if (ttl is not None and resident.leases == 0 and resident.idle_s >= ttl
                    and not self.is_pinned(model_id) and self._residents.get(model_id) is resident):
                log.info("unloading %s: idle for %.0fs (ttl %gs)", model_id, resident.idle_s, ttl)
                async with self._admission_lock():
                    if self._residents.get(model_id) is resident and resident.leases == 0:
                        await self._unload(model_id)
                        expired.append(model_id)
        return expired

    async def unload_vanished(self) -> list[str]:
        """Unload idle models whose folder was deleted while they were loaded: requests
        naming them already get 404 (discovery no longer finds them), so the memory they hold
        would never be given back otherwise.  Requests in flight finish first (their lease)."""
        gone = []
        for model_id, resident in list(self._residents.items()):
            path = getattr(getattr(resident.model, "info", None), "path", None)
            if path is None or resident.leases or Path(path).exists():
                continue
            async with self._admission_lock():
                if self._residents.get(model_id) is resident and resident.leases == 0:
                    log.warning("the folder of %s (%s) was removed while it was loaded: unloading it",
                                model_id, path)
                    await self._unload(model_id)
                    gone.append(model_id)
        return gone

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
        for model_id in list(self._residents):
            await self._unload(model_id)

    def shutdown(self) -> None:
        """Synchronous last resort at exit: stop every engine thread."""
        for resident in self._residents.values():
            resident.model.shutdown()
        self._residents.clear()


def _release(resident: Resident) -> None:
    """Stop the model's engine thread and give its arrays back to the allocator."""
    resident.model.shutdown()
    resident.model = None
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:  # an allocator without a cache to clear
        pass


def _gib(n: int) -> str:
    """A byte count for people: GiB for model-sized numbers, MiB below that."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
