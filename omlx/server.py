"""The aiohttp application: routes, error handling, lifecycle."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web

from omlx import __version__
from omlx.api.errors import APIError
from omlx.api.openai import OpenAIRoutes
from omlx.blas import blas_info
from omlx.models.pool import ModelPool
from omlx.scheduler import EngineConfig

log = logging.getLogger("omlx.server")

MAX_BODY_BYTES = 64 << 20


@dataclass
class ServerConfig:
    model_dirs: list[Path]
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    demo_model_id: str | None = None


@web.middleware
async def api_errors(request: web.Request, handler):
    """Every failure leaves as an OpenAI-shaped JSON error; nothing escapes as an HTML page."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge as exc:
        return APIError(f"the request body is too large: {exc.text}", 413, "invalid_request_error").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        message = f"{exc.reason}: {request.method} {request.path}"
        return APIError(message, exc.status, kind, None, None).response()
    except (ConnectionResetError, ConnectionError):
        raise  # the client went away; nobody to answer
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return APIError("internal server error", 500, "server_error").response()


def create_app(config: ServerConfig) -> web.Application:
    app = web.Application(middlewares=[api_errors], client_max_size=MAX_BODY_BYTES)
    pool = ModelPool(config.model_dirs, config.engine, demo_model_id=config.demo_model_id)
    app["pool"] = pool
    app["started"] = time.time()
    OpenAIRoutes(pool).register(app)
    app.router.add_get("/health", health)

    async def shutdown(_app):
        pool.shutdown()

    app.on_cleanup.append(shutdown)
    return app


async def health(request: web.Request) -> web.Response:
    pool: ModelPool = request.app["pool"]
    models = {}
    for model_id, loaded in pool.loaded.items():
        engine = loaded.engine.engine
        models[model_id] = {
            "context_window": loaded.context_window,
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
            "preemptions": engine.scheduler.num_preemptions,
            "steps": engine.stats.steps,
            "prefill_tokens": engine.stats.prefill_tokens,
            "generated_tokens": engine.stats.generated_tokens,
            "kv_cache": {**engine.blocks.stats(), "bytes": engine.storage.nbytes},
        }
    body = {
        "status": "ok",
        "version": __version__,
        "uptime_s": round(time.time() - request.app["started"], 1),
        "compute": blas_info(),
        "models_available": [m.model_id for m in pool.servable()],
        "models_loaded": models,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def run(config: ServerConfig) -> None:
    app = create_app(config)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # sequence in the engine and frees its KV blocks at once.
    web.run_app(
        app, host=config.host, port=config.port, handler_cancellation=True, access_log=None, print=None
    )
