"""One loader per model kind, each giving back a `Resident` (omlx.models.resident).

    llm        mlx-lm (or a GGUF file converted once) on the paged engine, or the fallback
               engine where the paged KV pool cannot hold the model's caches
    vlm, ocr   mlx-vlm: the language model on the same engines, the vision tower at prefill
    embedding  mlx-embeddings, batched passes (omlx.embeddings)
    reranker   a causal LM scored on its yes / no logits (on the LLM engine), or a
               cross-encoder head (omlx.rerank.cross_encoder)

Loads run in a worker thread (the pool's `to_thread`); each reads the model's settings as
they are at load time, and sizes its engine under the shared memory budget.  A new model kind
is its Resident class, a loader method here and one line in `load`'s table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from omlx.scheduler import AsyncEngine, EngineConfig, LLMEngine, default_kv_cache_bytes
from omlx.scheduler.fallback_engine import FallbackEngine
from omlx.scheduler.layer_kinds import UnsupportedLayout
from omlx.settings import SettingsStore
from omlx.settings_typed import ModelSettings

from . import weight_form
from .catalog import GENERATIVE_TYPES, ModelUnavailable
from .content_hash import folder_fingerprint
from .discovery import DiscoveredModel
from .facts import context_window_of, parameter_bytes
from .loaded import LoadedModel
from .resident import Resident

log = logging.getLogger("omlx.pool")


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


def load_estimate(info: DiscoveredModel, engine: EngineConfig) -> int:
    """Bytes to make room for before loading: the files, plus the initial KV pool of a model
    that runs on the LLM engine."""
    kv = estimate_kv_bytes(info.config.get("text_config") or info.config, engine) if runs_on_llm_engine(info) else 0
    return info.size_bytes + kv


def engine_config_for(base: EngineConfig, settings: ModelSettings | dict) -> EngineConfig:
    """The server's engine settings with this model's own KV quantization, KV cap, context
    cap and speculative decoding, where it sets them (EngineConfig.from_settings)."""
    return EngineConfig.from_settings(settings, base=base)


class Loaders:
    def __init__(self, settings: SettingsStore, engine_config: EngineConfig, memory_budget: int,
                 kv_budget: Callable[[str], Callable[[int], bool]],
                 resolve: Callable[[str], DiscoveredModel]):
        """`kv_budget(model_id)` is what that model's engine asks before its KV pool grows;
        `resolve` finds a draft model by name."""
        self.settings = settings
        self.engine_config = engine_config
        self.memory_budget = memory_budget
        self.kv_budget = kv_budget
        self.resolve = resolve

    def load(self, info: DiscoveredModel) -> Resident:
        """Load `info` (blocking)."""
        kinds: dict[str, Callable[[DiscoveredModel], Resident]] = {
            "llm": self.llm,
            "vlm": self.vision,
            "ocr": self.vision,
            "embedding": self.embedder,
            "reranker": self.reranker,
            "stt": self.transcriber,
        }
        loader = kinds.get(info.model_type)
        if loader is None:
            raise ModelUnavailable(f"'{info.model_id}' is a {info.model_type} model, which this server cannot load")
        return loader(info)

    # ------------------------------------------------------------------ encoders
    @staticmethod
    def transcriber(info: DiscoveredModel) -> Resident:
        """Whisper through mlx-whisper (omlx.audio.transcription)."""
        from omlx.audio.transcription import load_transcriber

        return load_transcriber(info)

    @staticmethod
    def embedder(info: DiscoveredModel) -> Resident:
        from omlx.embeddings import load_embedder

        return load_embedder(info)

    def reranker(self, info: DiscoveredModel) -> Resident:
        if runs_on_llm_engine(info):  # a causal LM scored on its yes / no logits
            return self.llm(info)
        from omlx.rerank.cross_encoder import UnsupportedReranker, load_cross_encoder

        try:
            return load_cross_encoder(info)
        except UnsupportedReranker as exc:
            raise ModelUnavailable(f"'{info.model_id}' cannot be served: {exc}") from None

    # ------------------------------------------------------------------ generating models
    def llm(self, info: DiscoveredModel) -> LoadedModel:
        from mlx_lm import load

        started = time.monotonic()
        settings = self.settings.of_model(info.settings_id)
        trust = self.settings.trust_remote_code(info.settings_id)
        adapter = info.adapter_path or settings.adapter_path
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
        form = weight_form.apply(model, settings.dequantize, self.memory_budget)
        if form != weight_form.STORED:
            log.info("%s runs with %s", info.model_id, weight_form.describe(form))
        # The model's identity for the prefix cache and its disk tier is what it computes,
        # not where it lives: its files' content (weights, config, tokenizer, adapter) and
        # the form its weights run in.  A moved or renamed model keeps its cached blocks; one
        # overwritten in place never reads blocks computed for the old weights.
        scope = b"content:" + folder_fingerprint(folder, adapter) + (b"" if form == weight_form.STORED else b":" + form.encode())
        loaded = self._serve(info, model, tokenizer, scope, window, settings)
        log.info("loaded %s in %.1fs (context %d)", info.model_id, time.monotonic() - started, window)
        return loaded

    def vision(self, info: DiscoveredModel) -> LoadedModel:
        """A vision-language (or OCR) model through mlx-vlm: its language model runs in the
        same paged engine as any LLM, its vision tower at prefill (omlx.vision)."""
        from omlx.vision.loader import load_vision_model

        started = time.monotonic()
        settings = self.settings.of_model(info.settings_id)
        trust = self.settings.trust_remote_code(info.settings_id)
        language, inputs, tokenizer, side = load_vision_model(str(info.path), info.config, info.model_type, trust)
        if not hasattr(side.vlm, "vision_tower") or not hasattr(side.vlm, "language_model"):
            raise ModelUnavailable(
                f"'{info.model_id}' is a {info.model_type} model, but mlx-vlm builds no vision model from its "
                f"config (model_type {info.config.get('model_type')!r}); set its type to llm if it is text-only")
        from omlx.vision.encoder import PassInputs
        from omlx.vision.tower_weights import pack_tower

        # The language model takes the form an LLM's weights take here; the tower is packed
        # where that gains (omlx/vision/tower_weights.py).
        form = weight_form.apply(language, settings.dequantize, self.memory_budget)
        if form != weight_form.STORED:
            log.info("%s: language model runs with %s", info.model_id, weight_form.describe(form))
            inputs = PassInputs(side.vlm)  # it holds the embedding table, now in its new form
        tower_packed = pack_tower(side, settings.dequantize)
        if tower_packed:
            log.info("%s: vision tower runs with bf16 weights packed (%d layers)", info.model_id, tower_packed)
        # The prefix cache's identity includes what computes the blocks: the weights' form and
        # whether image features come from a packed tower.
        scope = b"content:" + folder_fingerprint(info.path, None) + (
            b"" if form == weight_form.STORED else b":" + form.encode()) + (b":tower-bf16" if tower_packed else b"")
        window = context_window_of(info.config.get("text_config") or info.config)
        loaded = self._serve(info, language, tokenizer, scope, window, settings, vision=inputs,
                             weights=parameter_bytes(side.vlm))
        loaded.vision = side
        log.info("loaded %s (%s, vision) in %.1fs (context %d)", info.model_id, side.family,
                 time.monotonic() - started, window)
        return loaded

    def _serve(self, info: DiscoveredModel, model, tokenizer, scope: bytes, window: int, settings: ModelSettings,
               vision=None, weights: int | None = None) -> LoadedModel:
        """A loaded model's engine, sized under the memory budget."""
        config = EngineConfig.from_settings(settings, base=self.engine_config)
        weights = parameter_bytes(model) if weights is None else weights
        if config.kv_cache_bytes is None and config.num_blocks is None:
            config = dataclasses.replace(config, kv_cache_bytes=default_kv_cache_bytes(weights, self.memory_budget))
        draft = self._draft_model(info, config, tokenizer) if config.speculative and config.draft_model else None
        if draft is not None:
            weights += parameter_bytes(draft)
        kv_budget = self.kv_budget(info.model_id)
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
            # The draft's weights take the same form as a served model's would.
            weight_form.apply(draft, None, self.memory_budget)
            if draft_tokenizer.vocab_size != tokenizer.vocab_size or (
                    draft_tokenizer.encode("speculative check: 12345 tokens") != tokenizer.encode("speculative check: 12345 tokens")):
                raise ValueError("its tokenizer differs from the model's")
        except Exception as exc:  # noqa: BLE001 - any failure means: serve without it
            log.warning("%s: draft model %r not used (%s); drafting with prompt lookup", info.model_id, name, exc)
            return None
        log.info("%s: drafting with %s", info.model_id, draft_info.model_id)
        return draft
