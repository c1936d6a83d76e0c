"""A request's state as the scheduler sees it."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto

from .request import FinishReason, GenerationRequest

_arrival_counter = itertools.count()

# The engine's KV pools, by index: every sequence's blocks live in exactly one of them.
MAIN_POOL = 0
FLOAT_POOL = 1  # with --quantized-kv-start: sequences under the threshold


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt + output so far), how many of them have KV in the cache, and the
    blocks that hold that KV.

    `num_computed_tokens` counts tokens whose keys/values are stored; a step feeds the model
    `token_ids[num_computed_tokens:]` (a prefill chunk, or the one newly sampled token).
    """

    __slots__ = (
        "request",
        "token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "block_table",
        "num_hashed_blocks",
        "block_hashes",
        "hash_memo",
        "status",
        "finish_reason",
        "cached_prompt_tokens",
        "arrival",
        "rng",
        "reported_cache_hit",
        "index",
        "constraint",
        "group",
        "pool",
        "draft",
        "speculation",
        "arrived_at",
        "scheduled_at",
    )

    def __init__(self, request: GenerationRequest, index: int = 0, constraint=None):
        self.request = request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Prefix hashes of this sequence's full blocks, in order (chain of the whole prefix).
        self.block_hashes: list[bytes] = []
        self.num_hashed_blocks = 0
        # Every prefix hash made for it, per pool scope (block_manager.prefix_hashes).
        self.hash_memo: tuple[list[int], dict] | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.cached_prompt_tokens = 0
        self.reported_cache_hit = False
        self.arrival = next(_arrival_counter)
        self.rng = None  # numpy Generator for seeded sampling, set by the sampler
        self.index = index  # which of the request's n completions this is
        # This sequence's own state of the request's token constraint (grammar, thinking
        # budget), advanced by the sampler with every token it picks.
        if constraint is None and request.constraint is not None:
            constraint = request.constraint.new_state(request.max_tokens)
        self.constraint = constraint
        # The n sequences of an n > 1 request (a list they share), once they have forked.
        self.group: list[Sequence] | None = None
        # Which of the engine's KV pools holds its blocks (FLOAT_POOL while under
        # `--quantized-kv-start`, then MAIN_POOL); never both.
        self.pool = MAIN_POOL
        # Speculative decoding: the tokens guessed to follow the pending one, fed this step
        # after it (never part of `token_ids` until verified), and the sequence's drafting
        # state (omlx.scheduler.speculation.SequenceSpeculation), made when it first drafts.
        self.draft: list[int] = []
        self.speculation = None
        # When it was queued and first admitted (time.monotonic()): its queue time.
        self.arrived_at = time.monotonic()
        self.scheduled_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def in_float_pool(self) -> bool:
        return self.pool == FLOAT_POOL

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to be fed to the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    def tokens_to_feed(self, start: int, n: int) -> list[int]:
        """The `n` tokens from position `start` a step feeds: computed-to-be tokens, then the
        draft being verified."""
        tokens = self.token_ids[start : start + n]
        if len(tokens) < n:
            tokens = tokens + self.draft[: n - len(tokens)]
        return tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending_tokens > 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, "
            f"{self.status.name})"
        )
