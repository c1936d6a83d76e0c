"""What the API layer hands the engine, and what the engine hands back."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; the defaults mean plain greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Token ids that end generation (the model's EOS set); the token itself is not output.
    stop_token_ids: frozenset[int] = frozenset()
    # None: no log-probabilities. k >= 0: every token event carries the sampled token's
    # log-probability and the k most likely alternatives.
    logprobs: int | None = None
    # Restricts which tokens may be sampled (a grammar, a thinking budget): a factory with
    # `new_state(max_tokens)` returning an omlx.constrained.TokenConstraint, made once per sequence.
    # Built (and validated) by the API layer, so grammar compilation never runs on the
    # engine thread.
    constraint: object | None = None
    # Independent completions of the same prompt; they share its KV blocks (see
    # BlockManager.fork) and each samples with its own stream (seed + index).
    n: int = 1
    # Speculative decoding (omlx.scheduler.speculation): False opts this request out.
    speculative: bool = True
    # Tokens the client predicts the output will contain (OpenAI `prediction`): prompt lookup
    # drafts from them too.  They never change what is generated, only how fast.
    predicted_token_ids: tuple[int, ...] = ()
    # A prompt with images (omlx.scheduler.multimodal.MultimodalInput); None for text.
    multimodal: object | None = None
    # The engine that found this request fits it (a weak reference; see
    # EngineRequests.check_once): the API layer checks when it builds the request, and the
    # engine's add_request does not check it a second time.
    checked_by: weakref.ref | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """A request that could never run is refused where it is made, by whoever makes it
        (an API route, the distributed rank loop, a bench): the engine takes it as it is."""
        if not self.prompt_token_ids:
            raise RequestRejected("the prompt is empty", "prompt", "invalid_value")
        if self.max_tokens < 1:
            raise RequestRejected(f"max_tokens is {self.max_tokens}; at least 1 token must be generated",
                                  "max_tokens", "invalid_value")
        if self.n < 1:
            raise RequestRejected(f"n is {self.n}; a request has at least one completion", "n", "invalid_value")
        if self.logprobs is not None and self.logprobs < 0:
            raise RequestRejected(f"logprobs is {self.logprobs}; it counts alternatives, 0 or more",
                                  "logprobs", "invalid_value")


class FinishReason(str, Enum):
    STOP = "stop"  # an EOS / stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"


@dataclass(slots=True)
class TokenEvent:
    """One step's result for one request: a new token and/or the end of the request."""

    token_id: int | None
    finish_reason: FinishReason | None = None
    # Set on the first event: how many prompt tokens were served from the prefix cache.
    cached_prompt_tokens: int | None = None
    # Set on the first event too: seconds the request waited before it was first scheduled
    # (its queue time, for the metrics).
    queue_s: float | None = None
    error: str | None = None
    # With `error`: "kv_cache_exhausted" when the request could not get KV memory (a
    # capacity problem, worth retrying later), else None (an internal failure).
    error_code: str | None = None
    # With `logprobs`: the sampled token's log-probability and the top alternatives
    # as (token_id, logprob), most likely first.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # Which of the request's `n` completions this event belongs to.
    index: int = 0
    # Speculative decoding, on the first event of a step that verified a draft: how many
    # tokens were drafted for this completion and how many of them were accepted.
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class RequestRejected(ValueError):
    """A request that can never run (too long for the context or the KV pool, or a field no
    engine runs).  `field` names what is wrong: "prompt", "max_tokens" (the room the request
    needs in the KV pool), "n" or "logprobs"; `code` is "context_length_exceeded" for what
    does not fit, "invalid_value" for a value no request may have.  The API layer turns it
    into its 400, with the parameter's name in its wire format."""

    def __init__(self, message: str, field: str = "max_tokens", code: str = "context_length_exceeded"):
        super().__init__(message)
        self.field = field
        self.code = code


def check_prompt_length(request: GenerationRequest, max_model_len: int) -> int:
    """The prompt's token count; RequestRejected when it leaves no room in the context window
    for a single generated token (the message is the one OpenAI clients know)."""
    n = len(request.prompt_token_ids)
    if n >= max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{n} tokens (its context window must leave room for at least one generated token). "
            "Shorten the prompt.", field="prompt")
    return n
