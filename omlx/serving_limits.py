"""The bounds a long-running server keeps on its clients: how long a stop waits for streams,
how many requests may queue, how long they may queue, how big and how slow a request may be,
and how often an idle stream shows it is alive.

One frozen value set once at start-up (CLI flags > OMLX_* env > settings.json > defaults) and
read by the server, the admission check and the stream writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from omlx.audio.clips import AudioLimits
from omlx.settings import option_default
from omlx.vision.images import ImageLimits


@dataclass(frozen=True)
class ServingLimits:
    # (Defaults: the server options' own, omlx.settings.SERVER_OPTIONS.)
    # SIGTERM / SIGINT: streams in flight get this long to finish before they are ended
    # with their API's error event.
    shutdown_grace_s: float = option_default("shutdown_grace")
    # Requests queued (submitted, not yet scheduled) per model, and over all models; past
    # either, a new request is answered 503 (529 on Anthropic's routes) at once.  None: no cap.
    max_waiting_requests: int | None = None
    max_waiting_total: int | None = None
    # A request still queued after this long ends the same way.  None: it waits its turn.
    queue_timeout_s: float | None = None
    # What the Retry-After header of an overload answer says.
    retry_after_s: float = 2.0
    # Request bodies over this size get 413.
    max_request_bytes: int = option_default("max_request_size")
    # A client that sends headers and then stalls its body is answered 408 after this long,
    # before any model or engine slot is taken.
    client_read_timeout_s: float = option_default("client_read_timeout")
    # A streaming client that stops reading for this long is dropped (its request aborted).
    client_write_timeout_s: float = option_default("client_write_timeout")
    # An SSE stream with nothing to say (a long prefill, a long wait in the queue) sends its
    # API's own no-op event this often, so that clients with an idle timeout (Codex CLI
    # counts events, not bytes) keep the connection.
    sse_keepalive_s: float = option_default("sse_keepalive")
    # Available machine memory below which new generation requests get 503 (None: 5% of the
    # machine's memory, at most 1 GiB; see omlx.memory_watch).
    memory_reserve_bytes: int | None = None
    # How large, how many and how slow to fetch the images of a request may be.
    images: ImageLimits = field(default_factory=ImageLimits)
    # How large, how long, how many and how slow to fetch the audio clips of a request may be.
    audio: AudioLimits = field(default_factory=AudioLimits)


LIMITS = web.AppKey("limits", ServingLimits)


def limits_of(app) -> ServingLimits:
    """The app's limits (the defaults for an app built without any, as some tests do)."""
    return app.get(LIMITS) or ServingLimits()

