"""Run one request through a model's engine and follow it as text, independent of API format.

Every API family builds a GenerationRequest, then iterates a GenerationStream for text
deltas; the stream tracks the finish reason and token usage the response needs.  Leaving
the iteration early (a client gone, a stop string found) aborts the request in the engine.
"""

from __future__ import annotations

import itertools
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from omlx.models.pool import LoadedModel
from omlx.scheduler import FinishReason, GenerationRequest, RequestRejected, SamplingParams
from omlx.text_output import TextStream

from .errors import APIError, invalid, overloaded, shutting_down

_ids = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}{next(_ids):x}"


class EngineFailure(Exception):
    """The engine ended a request with an error (see TokenEvent.error / error_code)."""

    def __init__(self, message: str, code: str | None = None, retry_after_s: float = 2.0):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s

    def api_error(self) -> APIError:
        if self.code == "kv_cache_exhausted":  # capacity, not a bug: retry later
            return APIError(str(self), 503, "server_error", None, self.code)
        if self.code == "queue_timeout":  # waited its turn too long: an overload
            return overloaded(str(self), self.retry_after_s)
        if self.code == "server_shutting_down":
            return shutting_down(str(self))
        if self.code == "out_of_memory":  # 507 as for a model that does not fit
            return APIError(str(self), 507, "server_error", None, "insufficient_memory",
                            headers={"Retry-After": str(round(self.retry_after_s))}, anthropic_status=529)
        if self.code == "tokenizer_error":
            return APIError(str(self), 500, "server_error", None, self.code)
        return APIError(str(self), 500, "server_error", None, "engine_error")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Speculative decoding: draft tokens the model accepted / rejected (OpenAI reports a
    # `prediction`'s tokens under these names in completion_tokens_details).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def build_request(
    loaded: LoadedModel,
    prompt_ids: list[int],
    max_tokens: int | None,
    sampling: SamplingParams,
    prefix: str,
    max_tokens_param: str = "max_tokens",
    prompt_param: str = "messages",
    *,
    logprobs: int | None = None,
    constraint=None,
    n: int = 1,
    speculative: bool = True,
    predicted_token_ids=(),
    multimodal=None,
) -> GenerationRequest:
    """Make the engine request, checked once, here: its own fields where it is constructed
    (GenerationRequest), its fit in the model's context and KV pool by the engine
    (LoadedModel.check), which then takes it as checked.  Whatever they refuse is this API's
    400, named by the client's parameter."""
    window = loaded.context_window
    if max_tokens is not None and max_tokens > window:
        # The client's own limit is refused rather than cut to fit: a rule of the API, not
        # of the engine (which gets the limit below, cut to the room the prompt leaves).
        raise invalid(
            f"'{max_tokens_param}' is {max_tokens}, more than this model's context window of {window} tokens",
            max_tokens_param,
            "invalid_value",
        )
    room = window - len(prompt_ids)  # none: the engine's check refuses the prompt
    params = {"prompt": prompt_param, "max_tokens": max_tokens_param}
    try:
        request = GenerationRequest(
            request_id=new_request_id(prefix),
            prompt_token_ids=list(prompt_ids),
            max_tokens=max(1, min(max_tokens or room, room)),
            sampling=sampling,
            stop_token_ids=loaded.stop_token_ids,
            logprobs=logprobs,
            constraint=constraint,
            n=n,
            speculative=speculative,
            predicted_token_ids=tuple(predicted_token_ids),
            multimodal=multimodal,
        )
        loaded.check(request)
    except RequestRejected as exc:
        raise invalid(str(exc), params.get(exc.field, exc.field), exc.code) from None
    return request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Choice:
    """One of a request's `n` completions as it streams: its text, finish reason, logprobs."""

    index: int
    text: TextStream
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    _logprobs_sent: int = 0

    def take_logprobs(self) -> list[TokenLogprob]:
        """Logprobs of the tokens not yet handed out (for the next streamed chunk)."""
        new = self.logprobs[self._logprobs_sent :]
        self._logprobs_sent = len(self.logprobs)
        return new


class GenerationStream:
    """Async iterator of text deltas for one request; usage and finish_reason fill in as it goes.

    Iterating it gives choice 0's text deltas (the common n=1 case); `choice_deltas()` gives
    `(choice, delta)` for every choice of an n > 1 request, in the order tokens arrive.
    """

    def __init__(self, loaded: LoadedModel, request: GenerationRequest, stop: list[str], metrics=None):
        """`metrics` (omlx.metrics.ServerMetrics) gets the request's timings and usage when
        it ends, however it ends."""
        self.loaded = loaded
        self.request = request
        self.choices = [Choice(i, TextStream(loaded.tokenizer, stop)) for i in range(request.n)]
        self.usage = Usage(prompt_tokens=len(request.prompt_token_ids))
        self.created = int(time.time())
        self.metrics = metrics
        self._failed = False

    @property
    def text(self) -> TextStream:
        return self.choices[0].text

    def prompt_progress(self) -> tuple[int, int]:
        """(prompt tokens prefilled, prompt tokens): 0 done while it waits in the queue."""
        total = self.usage.prompt_tokens
        return self.loaded.prompt_progress(self.request.request_id) or (0, total)

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    async def __aiter__(self):
        async for _, delta in self.choice_deltas():
            if delta:
                yield delta

    async def choice_deltas(self):
        """Yield `(choice, delta)`: new text of a choice, and once more (possibly with "") when
        that choice finishes.  Ends when every choice has finished."""
        timer = None
        if self.metrics is not None:
            timer = self.metrics.request_timer(self.loaded.model_id, self.usage.prompt_tokens, len(self.choices))
        try:
            # Closed at once when our consumer leaves: that aborts the request in the engine.
            async with aclosing(self._choice_deltas(timer)) as deltas:
                async for item in deltas:
                    yield item
        finally:
            if timer is not None:
                timer.finish(self._finished_reason(), self.usage.completion_tokens, self.usage.cached_tokens)

    def _finished_reason(self) -> str:
        """How the request ended, for the metrics: "length" if a choice ran out of room."""
        reasons = [c.finish_reason for c in self.choices]
        if self._failed:
            return "error"
        if None in reasons:
            return "abort"  # the client left (or a stop string's consumer closed us) early
        return "length" if "length" in reasons else "stop"

    async def _choice_deltas(self, timer):
        unfinished = len(self.choices)
        async with aclosing(self.loaded.generate(self.request)) as events:
            async for event in events:
                if event.cached_prompt_tokens is not None:
                    self.usage.cached_tokens = event.cached_prompt_tokens
                if event.drafted_tokens:
                    self.usage.accepted_prediction_tokens += event.accepted_tokens
                    self.usage.rejected_prediction_tokens += event.drafted_tokens - event.accepted_tokens
                if timer is not None and event.queue_s is not None:
                    timer.queued(event.queue_s)
                if event.error is not None:
                    self._failed = True
                    raise EngineFailure(event.error, event.error_code)
                choice = self.choices[event.index]
                if choice.finish_reason is not None:
                    continue  # a stop string ended this choice; its later tokens are dropped
                delta = ""
                if event.token_id is not None:
                    self.usage.completion_tokens += 1
                    if timer is not None:
                        timer.token(event.index)
                    if event.logprob is not None:
                        choice.logprobs.append(TokenLogprob(event.token_id, event.logprob, event.top_logprobs or []))
                    delta = self._decoded(choice.text.add_token, event.token_id)
                elif event.finish_reason is FinishReason.STOP:
                    self.usage.completion_tokens += 1  # the end-of-sequence token
                    if timer is not None:
                        timer.token(event.index)
                if choice.text.stopped:
                    choice.finish_reason = "stop"
                elif event.finish_reason is not None:
                    delta += self._decoded(choice.text.finish)
                    choice.finish_reason = "length" if event.finish_reason is FinishReason.LENGTH else "stop"
                if delta or choice.finish_reason is not None:
                    yield choice, delta
                if choice.finish_reason is not None:
                    unfinished -= 1
                    if unfinished == 0:
                        return


    def _decoded(self, step, *token_id) -> str:
        """A detokenizer step; a tokenizer that fails on a token (a broken vocabulary file,
        bytes it cannot handle) ends this request with a clear error (leaving the iteration
        aborts it in the engine) instead of breaking the reply or the server."""
        try:
            return step(*token_id)
        except Exception as exc:
            self._failed = True
            where = f" on token {token_id[0]}" if token_id else ""
            raise EngineFailure(f"the model's tokenizer failed to decode its output{where}: {exc!r}",
                                "tokenizer_error") from exc


async def collect_choices(stream: GenerationStream) -> None:
    """Run the request to the end; each choice's text and finish reason are then complete."""
    try:
        async for _ in stream.choice_deltas():
            pass
    except EngineFailure as exc:
        raise exc.api_error() from None
