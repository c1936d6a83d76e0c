"""Admission control: a bounded queue in front of each model's engine.

A request arriving while the machine is short of memory (omlx.memory_watch), or one that
would queue behind `max_waiting_requests` others for its model (or
`max_waiting_total` over all models) is answered at once with an overload error (503, 529 on
Anthropic's routes, with Retry-After) instead of waiting without bound; one admitted gets a
queue deadline (`queue_timeout_s`) after which the engine ends it the same way.  The place is
reserved in the engine at admission, so concurrent handlers cannot all pass the check before
any of them submits, and given back when the handler ends, however it ends.
"""

from __future__ import annotations

import time

from aiohttp import web

from omlx.memory_watch import machine_memory
from omlx.models.loaded import LoadedModel
from omlx.models.pool import ModelPool
from omlx.serving_limits import limits_of

from .errors import overloaded
from .model_access import on_request_end


def check_memory(http: web.Request) -> None:
    """Refuse a generation request while the machine is short of memory: before its model is
    loaded or its KV grows, not after the OOM killer has taken the server."""
    limits = limits_of(http.app)
    memory = machine_memory(limits.memory_reserve_bytes)
    if memory["pressure"]:
        raise overloaded(
            f"the machine is low on memory ({memory['available_bytes'] >> 20} MiB available, below the "
            f"{memory['reserve_bytes'] >> 20} MiB reserve); retry later", limits.retry_after_s,
            code="insufficient_memory")


def admit(http: web.Request, pool: ModelPool, loaded: LoadedModel, request_id: str) -> None:
    """Reserve `request_id` a place in `loaded`'s queue, or raise the overload APIError."""
    limits = limits_of(http.app)
    if limits.max_waiting_requests is not None and loaded.queued_requests >= limits.max_waiting_requests:
        raise overloaded(
            f"'{loaded.model_id}' has {loaded.queued_requests} requests waiting, the most this server "
            f"queues per model (max_waiting_requests={limits.max_waiting_requests}); retry later",
            limits.retry_after_s,
        )
    if limits.max_waiting_total is not None:
        total = sum(m.queued_requests for m in pool.loaded.values())  # encoders queue none
        if total >= limits.max_waiting_total:
            raise overloaded(
                f"{total} requests are waiting, the most this server queues over all models "
                f"(max_waiting_total={limits.max_waiting_total}); retry later",
                limits.retry_after_s,
            )
    deadline = time.monotonic() + limits.queue_timeout_s if limits.queue_timeout_s else None
    loaded.reserve_queue_place(request_id, deadline)
    on_request_end(http, loaded.release_queue_place, request_id)
