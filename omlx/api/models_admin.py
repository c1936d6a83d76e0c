"""Model management routes: status, load, unload and per-model settings.

    GET  /v1/models/status            oMLX's shape: {"models": [{"id", "model_type", "loaded",
                                      "max_context_window", "max_tokens", ...}]}, plus what
                                      omlx adds (memory, sizes, unavailable folders)
    POST /v1/models/{id}/load         load now (evicting idle models if needed)
    POST /v1/models/{id}/unload       unload now (409 while it serves requests)
    GET  /v1/models/{id}/settings     the model's settings from model_settings.json
    PUT  /v1/models/{id}/settings     update them (validated, persisted atomically, applied now)
    POST /unload                      the mlx-vlm server's: unload what is loaded and idle

Register these before the OpenAI routes: `GET /v1/models/{id}` would otherwise match
`/v1/models/status` and `/v1/models/{id}/settings`.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from omlx.models import facts
from omlx.models.discovery import DiscoveredModel
from omlx.models.pool import ModelPool, context_window_of
from omlx.scheduler.engine_config import EngineConfig
from omlx.settings import SettingsError

from .errors import APIError, invalid
from .wire import json_response
from .model_access import POOL_ERRORS, pool_error

log = logging.getLogger("omlx.api.models")


def context_window(pool: ModelPool, info: DiscoveredModel) -> int:
    """What a request to this model can use: the loaded engine's window, else the config's,
    capped as its engine will be (the server's max_model_len, the model's max_context_window)."""
    loaded = pool.loaded.get(info.model_id)
    if loaded is not None and loaded.generates:
        return loaded.context_window
    window = context_window_of(info.config)
    cap = EngineConfig.from_settings(pool.settings.of_model(info.settings_id), base=pool.engine_config).max_model_len
    return min(window, cap) if cap else window


def model_status(pool: ModelPool, info: DiscoveredModel) -> dict:
    resident = pool.resident(info.model_id)
    settings = pool.settings.of_model(info.settings_id)
    window = context_window(pool, info)
    # What a request that sets no limit gets: the settings' precedence, else the window.
    max_tokens = pool.settings.defaults(info.settings_id).max_tokens or window
    status = {
        "id": info.model_id,
        "object": "model.status",
        "model_type": info.model_type,
        "vision": info.model_type in ("vlm", "ocr"),  # takes images
        "audio": info.takes_audio,  # takes audio clips (omni models) or transcribes (stt)
        "alias": settings.alias,
        "loaded": resident is not None,
        "loading": pool.is_loading(info.model_id),
        "pinned": pool.is_pinned(info.model_id),
        "max_context_window": window,
        "max_tokens": min(max_tokens, window),
        "memory_bytes": resident.memory_bytes if resident else 0,
        "size_bytes": info.size_bytes,
        "format": facts.weights_format(info),
        "quantization": facts.quantization(info, facts.weight_stats(info))["name"],
        "active_requests": resident.leases if resident else 0,
        "idle_seconds": round(resident.idle_s, 1) if resident and not resident.leases else 0.0,
        "ttl": pool.settings.ttl(info.model_id),
        "path": str(info.path),
        "adapter_path": info.adapter_path,
    }
    # A loaded generative model: which engine serves it (paged, or the fallback) and its limits.
    serving = resident.model.serving_info() if resident else None
    if serving is not None:
        status["serving"] = serving
    return status


class ModelAdminRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def register(self, app: web.Application) -> None:
        app.router.add_get("/v1/models/status", self.status)
        app.router.add_post("/v1/models/{model_id:.+}/load", self.load)
        app.router.add_post("/v1/models/{model_id:.+}/unload", self.unload)
        app.router.add_get("/v1/models/{model_id:.+}/settings", self.get_settings)
        app.router.add_put("/v1/models/{model_id:.+}/settings", self.put_settings)
        app.router.add_post("/unload", self.unload_all)

    def _resolve(self, name: str) -> DiscoveredModel:
        try:
            return self.pool.resolve(name)
        except POOL_ERRORS as exc:
            raise pool_error(exc) from None

    async def status(self, request: web.Request) -> web.Response:
        self.pool.rescan()
        pool = self.pool
        # Adapter entries (a base model with a request's LoRA adapter) while they are resident.
        adapters = [info for info in pool.adapter_models if pool.resident(info.model_id) is not None]
        return json_response({
            "models": [model_status(pool, info) for info in pool.available + adapters],
            "unavailable": [{"path": str(s.path), "reason": s.reason} for s in pool.skipped],
            "memory": {"budget_bytes": pool.memory_budget, "used_bytes": pool.used_bytes,
                       "evictions": pool.evictions},
        })

    async def load(self, request: web.Request) -> web.Response:
        info = self._resolve(request.match_info["model_id"])
        try:
            await self.pool.load(info.model_id)
        except POOL_ERRORS as exc:
            raise pool_error(exc) from None
        return json_response(model_status(self.pool, info))

    async def unload(self, request: web.Request) -> web.Response:
        info = self._resolve(request.match_info["model_id"])
        try:
            was_loaded = await self.pool.unload(info.model_id)
        except POOL_ERRORS as exc:
            raise pool_error(exc) from None
        return json_response({**model_status(self.pool, info), "unloaded": was_loaded})

    async def unload_all(self, request: web.Request) -> web.Response:
        """mlx-vlm's POST /unload: it holds one model, so this frees "the" model.  Here every
        resident model that serves no request is unloaded; one that is busy stays (unloading
        it would fail its requests) and is named in the reply."""
        resident = [model_id for model_id in self.pool.loaded]
        if not resident:
            return json_response({"status": "no_model_loaded", "message": "No model is currently loaded"})
        unloaded, busy = [], []
        for model_id in resident:
            try:
                if await self.pool.unload(model_id):
                    unloaded.append(model_id)
            except POOL_ERRORS:
                busy.append(model_id)
        if not unloaded:
            raise APIError(f"every loaded model is serving requests: {', '.join(busy)}", 409,
                           "invalid_request_error", None, "model_busy")
        return json_response({"status": "success", "message": "Model unloaded successfully",
                              "unloaded": unloaded, "busy": busy})

    async def get_settings(self, request: web.Request) -> web.Response:
        info = self._resolve(request.match_info["model_id"])
        return json_response({"id": info.model_id, "settings": self.pool.settings.model(info.model_id)})

    async def put_settings(self, request: web.Request) -> web.Response:
        """Merge the body into the model's settings; `null` removes a key.  Applies at once:
        aliases and sampling defaults on the next request, a type override on the next scan,
        `pinned: true` loads the model now; load-time settings (adapter_path,
        trust_remote_code) on the next load."""
        info = self._resolve(request.match_info["model_id"])
        raw = await request.read()
        try:
            patch = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise invalid(f"the request body is not valid JSON: {exc}") from None
        try:
            settings = await asyncio.to_thread(self.pool.settings.update_model, info.model_id, patch)
        except SettingsError as exc:
            raise invalid(str(exc), exc.field, "invalid_value") from None
        except OSError as exc:
            log.error("cannot write %s: %s", self.pool.settings.models_path, exc)
            raise APIError(f"the settings could not be saved: {exc}", 500, "server_error") from None
        self.pool.rescan()
        body = {"id": info.model_id, "settings": settings}
        if settings.get("pinned") and self.pool.resident(info.model_id) is None:
            try:
                await self.pool.load(info.model_id)
            except POOL_ERRORS as exc:
                # The setting is saved either way; say why the model is not resident yet.
                body["load_error"] = pool_error(exc).message
        body["status"] = model_status(self.pool, self.pool.resolve(info.model_id))
        return json_response(body)
