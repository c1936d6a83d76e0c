"""LM Studio's REST model routes, for tools written against LM Studio:

    GET  /api/v1/models          every model with type, publisher, quantization, size, ...
    POST /api/v1/models/load     {"model": id}        -> {"instance_id", ...}
    POST /api/v1/models/unload   {"instance_id": id}  -> {"instance_id"}

Every field is computed from the model's files (omlx.models.facts).  omlx runs one instance
per model, so an instance id is the model id.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from omlx.models import facts
from omlx.models.discovery import DiscoveredModel
from omlx.models.pool import ModelPool, context_window_of

from .errors import invalid
from .model_access import POOL_ERRORS, pool_error
from .models_admin import context_window, json_response


def lmstudio_model(pool: ModelPool, info: DiscoveredModel) -> dict:
    stats = facts.weight_stats(info)
    window = context_window(pool, info)
    resident = pool.resident(info.model_id)
    instances = []
    if resident is not None:
        config = {"context_length": window}
        if resident.model.generates:  # an engine to describe (encoders have none)
            engine = resident.model.engine_settings()
            config.update({
                "eval_batch_size": engine["max_num_batched_tokens"],
                "max_concurrent_predictions": engine["max_num_seqs"],
                "kv_cache_bytes": resident.model.kv_bytes,
            })
        instances.append({"id": info.model_id, "config": config})
    return {
        "type": info.model_type,
        "publisher": facts.publisher(info),
        "key": info.model_id,
        "display_name": facts.display_name(info),
        "architecture": info.config.get("model_type") or info.architecture,
        "quantization": facts.quantization(info, stats),
        "size_bytes": info.size_bytes,
        "params_string": facts.params_string(stats.parameters),
        "loaded_instances": instances,
        "max_context_length": context_window_of(info.config),
        "format": facts.weights_format(info),
        "capabilities": facts.capabilities(info),
    }


class LMStudioRoutes:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def register(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/models", self.list_models)
        app.router.add_post("/api/v1/models/load", self.load)
        app.router.add_post("/api/v1/models/unload", self.unload)

    async def list_models(self, request: web.Request) -> web.Response:
        self.pool.rescan()
        return json_response({"models": [lmstudio_model(self.pool, m) for m in self.pool.available]})

    async def _field(self, request: web.Request, name: str) -> str:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise invalid(f"the request body is not valid JSON: {exc}") from None
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise invalid(f"'{name}' is required and must be a string", name, "missing_required_parameter")
        return value

    async def load(self, request: web.Request) -> web.Response:
        name = await self._field(request, "model")
        try:
            resident = await self.pool.load(name)
            info = self.pool.resolve(name)
        except POOL_ERRORS as exc:
            raise pool_error(exc) from None
        return json_response({"type": info.model_type, "instance_id": info.model_id, "status": "loaded",
                              "memory_bytes": resident.memory_bytes})

    async def unload(self, request: web.Request) -> web.Response:
        name = await self._field(request, "instance_id")
        try:
            info = self.pool.resolve(name)
            await self.pool.unload(info.model_id)
        except POOL_ERRORS as exc:
            raise pool_error(exc) from None
        return json_response({"instance_id": info.model_id})
