"""One generation request's timeline, as its client saw it, for the metrics.

The API layer (omlx.api.generation.GenerationStream) starts a timer when it submits the
request to the engine, tells it about every token it takes and how the request ended, and
the timer hands a `FinishedRequest` to whoever records it (Prometheus, the panel's stats).
Token counts are the ones the response reports in its `usage`, so the counters built from
them move by exactly what clients were told.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class FinishedRequest:
    model_name: str
    finished_reason: str  # "stop", "length", "abort" (the client left) or "error"
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    e2e_s: float  # submission to the last token (or to the end, for an abort)
    queue_s: float | None  # submission to first scheduled; None if it never was
    ttft_s: float | None  # submission to the first token; None if none came
    itl_s: list[float] = field(default_factory=list)  # gaps between a choice's tokens
    # Time from the first token to the last: the decode phase, for decode tok/s.
    decode_s: float = 0.0


class RequestTimer:
    def __init__(self, model_name: str, prompt_tokens: int, choices: int,
                 record: Callable[[FinishedRequest], None]):
        self.model_name = model_name
        self.prompt_tokens = prompt_tokens
        self._record = record
        self._started = time.monotonic()
        self._first_token: float | None = None
        self._last_token: list[float | None] = [None] * choices
        self._itl: list[float] = []
        self._queue_s: float | None = None
        self._done = False

    def queued(self, seconds: float) -> None:
        """The engine's measure of how long the request waited to be scheduled."""
        if self._queue_s is None:
            self._queue_s = seconds

    def token(self, choice: int = 0) -> None:
        """A token (counted in the response's usage) reached the client's stream."""
        now = time.monotonic()
        if self._first_token is None:
            self._first_token = now
        last = self._last_token[choice]
        if last is not None:
            self._itl.append(now - last)
        self._last_token[choice] = now

    def finish(self, reason: str, generation_tokens: int, cached_tokens: int) -> None:
        """Record the request once; later calls (an error path after a stop) are ignored."""
        if self._done:
            return
        self._done = True
        now = time.monotonic()
        last = max((t for t in self._last_token if t is not None), default=None)
        end = last if reason in ("stop", "length") and last is not None else now
        self._record(FinishedRequest(
            model_name=self.model_name,
            finished_reason=reason,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=generation_tokens,
            cached_tokens=cached_tokens,
            e2e_s=end - self._started,
            queue_s=self._queue_s,
            ttft_s=None if self._first_token is None else self._first_token - self._started,
            itl_s=self._itl,
            decode_s=0.0 if self._first_token is None or last is None else last - self._first_token,
        ))
