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
from dataclasses import dataclass

from omlx.models.pool import LoadedModel
from omlx.scheduler import FinishReason, GenerationRequest, RequestRejected, SamplingParams
from omlx.text_output import TextStream

from .errors import APIError, invalid

_ids = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}{next(_ids):x}"


class EngineFailure(Exception):
    pass


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

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
) -> GenerationRequest:
    """Check lengths against the model's context window and make the engine request."""
    window = loaded.context_window
    if max_tokens is not None and max_tokens > window:
        raise invalid(
            f"'{max_tokens_param}' is {max_tokens}, more than this model's context window of {window} tokens",
            max_tokens_param,
            "invalid_value",
        )
    if len(prompt_ids) >= window:
        raise invalid(
            f"This model's maximum context length is {window} tokens, but the prompt has "
            f"{len(prompt_ids)} tokens. Shorten the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    room = window - len(prompt_ids)
    request = GenerationRequest(
        request_id=new_request_id(prefix),
        prompt_token_ids=list(prompt_ids),
        max_tokens=min(max_tokens or room, room),
        sampling=sampling,
        stop_token_ids=loaded.stop_token_ids,
    )
    try:
        loaded.engine.engine.check(request)
    except RequestRejected as exc:
        raise invalid(str(exc), max_tokens_param, "context_length_exceeded") from None
    return request


class GenerationStream:
    """Async iterator of text deltas for one request; usage and finish_reason fill in as it goes."""

    def __init__(self, loaded: LoadedModel, request: GenerationRequest, stop: list[str]):
        self.loaded = loaded
        self.request = request
        self.text = TextStream(loaded.tokenizer, stop)
        self.usage = Usage(prompt_tokens=len(request.prompt_token_ids))
        self.finish_reason: str | None = None
        self.created = int(time.time())

    async def __aiter__(self):
        async with aclosing(self.loaded.engine.generate(self.request)) as events:
            async for event in events:
                if event.cached_prompt_tokens is not None:
                    self.usage.cached_tokens = event.cached_prompt_tokens
                if event.error is not None:
                    raise EngineFailure(event.error)
                delta = ""
                if event.token_id is not None:
                    self.usage.completion_tokens += 1
                    delta = self.text.add_token(event.token_id)
                elif event.finish_reason is FinishReason.STOP:
                    self.usage.completion_tokens += 1  # the end-of-sequence token
                if self.text.stopped:
                    self.finish_reason = "stop"
                elif event.finish_reason is not None:
                    delta += self.text.finish()
                    self.finish_reason = "length" if event.finish_reason is FinishReason.LENGTH else "stop"
                if delta:
                    yield delta
                if self.finish_reason is not None:
                    return


async def collect(stream: GenerationStream) -> str:
    try:
        return "".join([delta async for delta in stream])
    except EngineFailure as exc:
        raise APIError(str(exc), 500, "server_error", None, "engine_error") from None
