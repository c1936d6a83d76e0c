"""How API handlers get a model: a lease held until the handler returns, and the pool's
failures turned into API-shaped errors.

`await lease_for_request(request, pool, name)` returns the loaded model and registers its
lease on the request; the `release_leases` middleware gives every lease back when the handler
finishes, whether it returned, raised or was cancelled by a disconnect.  A streaming handler
writes its whole stream before returning, so the model stays leased (and unevictable) until
the last token is sent.
"""

from __future__ import annotations

import contextlib

from aiohttp import web

from omlx.models.pool import (
    AdapterNotFound,
    InsufficientMemory,
    ModelBusy,
    ModelLoadFailed,
    ModelNotFound,
    ModelPool,
    ModelUnavailable,
)

from .errors import APIError, model_not_found

# Typed request keys where aiohttp has them (3.12+); plain strings work everywhere.
_LEASES = web.RequestKey("omlx.leases", contextlib.AsyncExitStack) if hasattr(web, "RequestKey") else "omlx.leases"


def pool_error(exc: Exception) -> APIError:
    """The OpenAI-shaped error for a pool failure."""
    if isinstance(exc, AdapterNotFound):
        return APIError(str(exc), 400, "invalid_request_error", "adapter_path", "adapter_not_found")
    if isinstance(exc, ModelNotFound):
        return model_not_found(exc.args[0] if exc.args else "")
    if isinstance(exc, ModelUnavailable):
        return APIError(str(exc), 400, "invalid_request_error", "model", "model_not_supported")
    if isinstance(exc, InsufficientMemory):
        # 507 Insufficient Storage: the server cannot hold what this request needs right now.
        return APIError(str(exc), 507, "server_error", "model", "insufficient_memory")
    if isinstance(exc, ModelBusy):
        return APIError(str(exc), 409, "invalid_request_error", "model", "model_busy")
    if isinstance(exc, ModelLoadFailed):
        return APIError(str(exc), 500, "server_error", "model", "model_load_failed")
    raise TypeError(f"not a pool error: {exc!r}")


POOL_ERRORS = (AdapterNotFound, ModelNotFound, ModelUnavailable, InsufficientMemory, ModelBusy, ModelLoadFailed)


async def lease_for_request(request: web.Request, pool: ModelPool, name: str, model_type: str | None = "llm",
                            adapter_path: str | None = None):
    """The model `name` (with the LoRA adapter at `adapter_path`, if given), leased until
    this request's handler finishes."""
    stack: contextlib.AsyncExitStack | None = request.get(_LEASES)
    if stack is None:
        raise RuntimeError("the release_leases middleware is not installed")
    try:
        return await stack.enter_async_context(pool.lease(name, model_type, adapter_path))
    except POOL_ERRORS as exc:
        raise pool_error(exc) from None


@web.middleware
async def release_leases(request: web.Request, handler):
    async with contextlib.AsyncExitStack() as stack:
        request[_LEASES] = stack
        return await handler(request)


def on_request_end(request: web.Request, callback, *args) -> None:
    """Call `callback(*args)` when this request's handler finishes, however it finishes."""
    stack: contextlib.AsyncExitStack | None = request.get(_LEASES)
    if stack is None:
        raise RuntimeError("the release_leases middleware is not installed")
    stack.callback(callback, *args)
