"""Grammar constraints (JSON schema, any JSON object, Lark) through llguidance.

Why llguidance.  Measured with `python bench/constrained_overhead.py masks` on this project's
machines (x86_64, 2 cores), a 32000-token byte-level BPE vocabulary and a 7-property JSON
schema (nested object, array, enum), along a 134-token valid document:

    engine               compile    mask + advance per token (mean / p50 / p99)
    llguidance 1.9.1     1.1 ms     15 us / 6 us / 76 us
    xgrammar 0.2.8       7.4 ms      2.7 us / 2.1 us / 8 us
    outlines-core 0.2.14 40-77 ms   199 us / 324 us / 552 us

xgrammar computes a mask faster, but for both the mask is a fraction of a percent of a decode
step of the 200M benchmark model, even at 16 constrained clients (16 x 15 us = 0.24 ms of a
~116 ms step).  What differs per request
is compilation, paid before the first token: llguidance compiles 6.5x faster, so it costs
less in total for any output shorter than ~500 tokens, which is most structured output.
xgrammar also requires torch (pip pulls the CUDA build, gigabytes, on Linux), which nothing
else in omlx needs.  outlines-core builds a full regex index per schema and is 13x slower
per token.  llguidance also takes Lark grammars with embedded JSON schemas, which the
tool-call grammar needs (`omlx.constrained.tool_calls`), and fills a batch's masks in parallel.
(xgrammar was measured in a separate environment with the CPU build of torch.)

Through the engine (`python bench/constrained_overhead.py engine`: the 200M benchmark model,
32000-token vocabulary, temperature 1) the whole cost is in the sampler: with 16 greedy rows
it takes 1.32 ms per step constrained vs 0.52 ms free (0.10 vs 0.05 ms with one row; the
mask alone, 16 rows: 0.8-1.1 ms), against decode steps of ~56 ms (1 client) and ~116 ms
(16 clients), where constrained and free steps measure the same within noise (p50 56.7 vs
56.3 ms; 112.7 vs 116.0 ms): under 1% even when all 16 rows are constrained.

Structured output must also parse when `max_tokens` runs out first: near the end of its
budget a state plans a short way to finish its grammar and forces it in time, and holds back
any token after which no ending would fit in what is left (a key whose value is a required
object, say: one token can lengthen the way out by dozens; see GrammarState), so the output
is complete whenever max_tokens leaves room for the shortest document
(`GrammarConstraint.skeleton` tokens, plus a margin).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np

from .base import TokenConstraint

log = logging.getLogger("omlx.constrained")

# Compact but conventional separators (what json.dumps writes): models have seen them most,
# and a fixed layout keeps a weak model from spending its tokens on whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled (the request's fault: a 400)."""


@functools.lru_cache(maxsize=16)
def grammar_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (~0.3 s for 32k tokens: built once per model).

    `tokenizer` is mlx-lm's TokenizerWrapper; its Hugging Face tokenizer is what llguidance
    reads.  The vocabulary is the model's logits width when that is larger (padded
    embeddings), so masks line up with the logits.
    """
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    n_vocab = max(vocab_size, len(hf))
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
    return llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=eos)


class GrammarConstraint:
    """A compiled grammar for one request: `new_state()` gives each sequence its own matcher.

    Built in the API layer (off the event loop and off the engine thread) so that bad
    grammars fail the request with a 400 before it reaches the engine, and compilation
    never stalls the batch.
    """

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        self.tokenizer = grammar_tokenizer(tokenizer, vocab_size)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(error)
        self._template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self._template.is_error():
            raise GrammarError(self._template.get_error())
        self.num_words = (self.tokenizer.vocab_size + 31) // 32
        # How long the shortest document is (as the closing planner finds it): states start
        # planning their ending early enough for it.
        # None when the planner finds no ending (an unsatisfiable or exotic grammar): its
        # states then never plan, rather than search in vain on the engine thread.
        plan = GrammarState(self._template.deep_copy(), self.num_words, self.tokenizer, None)._plan_closing(limit=MAX_SKELETON)
        self.skeleton: int | None = len(plan) if plan is not None else None

    def new_state(self, max_tokens: int | None = None) -> "GrammarState":
        return GrammarState(self._template.deep_copy(), self.num_words, self.tokenizer, max_tokens, self.skeleton)


# Structured output must parse even when `max_tokens` runs out: near the end of the budget
# the state plans the shortest way to finish the grammar and, when that plan needs about
# all the tokens left, forces it.  Planning starts this many tokens before the end ...
CLOSING_WINDOW = 96
# ... forcing starts when the plan plus this margin fills what is left.  Until then every
# token the model may pick must leave a way out that fits: tokens that can lengthen it
# (closing a string, choosing a key, opening an object, array or item) are each checked by
# planning after them, and held back when that plan does not fit.
CLOSING_MARGIN = 12
# Tokens that are not checked (free text without a quote; digits and non-ASCII pieces
# among many candidates) lengthen the way out by at most this much (an unfinished escape
# like `\u12` or UTF-8 character, a number's dangling sign).
_INERT_GROWTH = 5
_UNKNOWN = 1 << 30
# At most this many tokens are checked per step (each may cost a plan); beyond it the
# unchecked ones are held back, except the plan's own next token.
MAX_CHECKS = 48
# Grammars whose shortest document is longer than this are planned from this far out only.
MAX_SKELETON = 512
# Bytes tried first when planning.  Inside free text (a string, a thinking block: any odd
# byte like `~` is allowed there) the way out is the closing quote; elsewhere it is closing
# what is open, then the shortest values.  Whitespace comes last: a repeated whitespace rule
# would otherwise take it forever.
_TEXT_PRIORITY = b'"a'
_STRUCT_PRIORITY = b']}",0tfn{[1:a'
_PRINTABLE = bytes(range(33, 127))
_WHITESPACE_AND_REST = b" \n" + bytes(range(256))


@dataclass(frozen=True)
class _ClosingTokens:
    text_order: list[int]  # candidates inside free text
    struct_order: list[int]  # candidates elsewhere
    probe: int  # a token allowed only inside free text (`~`)
    markers: frozenset[int]  # special tokens that close nothing (<think>, <tool_call>)
    inert_text: np.ndarray  # per token: inside free text, it stays there (no quote, no marker)
    bulk: np.ndarray  # per token: only decimal digits, or only non-ASCII bytes


@functools.lru_cache(maxsize=16)
def _closing_tokens(tokenizer: llguidance.LLTokenizer) -> _ClosingTokens:
    """The single-byte tokens the planner tries, in order, and the end-of-budget safe set."""
    special = [t for t in range(tokenizer.vocab_size) if tokenizer.is_special_token(t)]
    # Closing markers first: where one is allowed it ends free text (the think-end token
    # closing a thinking block), which bytes would never reach.  Other markers (an optional
    # opening <think>) last: they only lengthen the way out.
    closing = [t for t in special if tokenizer.decode_bytes([t]).lstrip(b"\xff").startswith(b"</")]

    def single(data: bytes, seen: set[int]) -> list[int]:
        out = []
        for byte in data:
            ids = tokenizer.tokenize_bytes(bytes([byte]))
            if len(ids) == 1 and ids[0] not in seen:
                seen.add(ids[0])
                out.append(ids[0])
        return out

    def order(first: bytes) -> list[int]:
        # Other markers (the one a forced tool call starts with) before whitespace, which a
        # whitespace rule in front of them would otherwise take forever.
        seen = set(special)
        others = [t for t in special if t not in closing]
        return closing + single(first + _PRINTABLE, seen) + others + single(_WHITESPACE_AND_REST, seen)

    inert_text = np.zeros(tokenizer.vocab_size, dtype=bool)
    bulk = np.zeros(tokenizer.vocab_size, dtype=bool)
    for token in range(tokenizer.vocab_size):
        if tokenizer.is_special_token(token):
            continue
        raw = tokenizer.decode_bytes([token])
        inert_text[token] = bool(raw) and b'"' not in raw
        bulk[token] = bool(raw) and (raw.isdigit() or min(raw) >= 0x80)
    probe = tokenizer.tokenize_bytes(b"~")
    return _ClosingTokens(
        order(_TEXT_PRIORITY), order(_STRUCT_PRIORITY), probe[0] if len(probe) == 1 else -1,
        frozenset(t for t in special if t not in closing), inert_text, bulk,
    )


class GrammarState(TokenConstraint):
    """One sequence's matcher, and its way out when the budget runs low.

    Within `window` tokens of the end the state keeps an upper bound on how long its way out
    (a plan from `_plan_closing`) is, and the invariant that some way out fits in what is
    left: it forces its plan once the plan plus `CLOSING_MARGIN` fills the budget, and until
    then allows only tokens after which a way out still fits (see `_hold_back`).  The
    invariant holds at the start whenever max_tokens >= skeleton + CLOSING_MARGIN.
    """

    __slots__ = ("matcher", "num_words", "tokenizer", "max_tokens", "generated", "closing", "window", "plan", "hint",
                 "bound", "checked")

    _executor: llguidance.LLExecutor | None = None
    _executor_lock = threading.Lock()

    def __init__(self, matcher: llguidance.LLMatcher, num_words: int, tokenizer, max_tokens: int | None, skeleton: int | None = 0):
        self.matcher = matcher
        self.num_words = num_words
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens if skeleton is not None else None  # None: never plan
        self.generated = 0
        self.closing: list[int] | None = None  # the forced plan, once it has started
        # Planning starts this close to the end: later for small grammars, earlier for
        # ones whose shortest document (`skeleton` tokens) is long.
        self.window = max(CLOSING_WINDOW, (skeleton or 0) + 4 * CLOSING_MARGIN)
        # A way out from the current state when one is known (None: plan again when needed),
        # the latest one known (often still a way out after free text: tried first), and an
        # upper bound on the length of the shortest way out.
        self.plan: list[int] | None = None
        self.hint: list[int] | None = None
        self.bound = skeleton or 0
        # This step's checked tokens and the way out after each (see `_hold_back`); None
        # when this step's tokens were not checked (far from the end, or forced).
        self.checked: dict[int, list[int]] | None = None

    @property
    def finished(self) -> bool:
        if self.matcher.is_stopped():
            return True
        # A forced plan ends as soon as the grammar may end.
        return self.closing is not None and not self.closing and self.matcher.is_accepting()

    @property
    def remaining(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens - self.generated

    def fill_bitmask(self, row: np.ndarray) -> None:
        remaining = self.remaining
        near_end = self.closing is None and remaining is not None and remaining <= self.window
        if near_end:
            if self.plan is None and self.hint is not None and self._still_ends(self.matcher.deep_copy(), self.hint):
                self.plan = self.hint
                self.bound = min(self.bound, len(self.plan))
            if self.plan is None and self.bound + CLOSING_MARGIN >= remaining:
                self.plan = self._plan_closing(limit=remaining)
                if self.plan is None:
                    # No way out fits (only a grammar the planner cannot finish gets here):
                    # stop planning rather than search in vain at every step.
                    log.warning("grammar: no ending fits the %d tokens left", remaining)
                    self.max_tokens = None
                    near_end = False
                else:
                    self.bound = len(self.plan)
                    self.hint = self.plan
            if near_end and self.plan is not None and len(self.plan) + CLOSING_MARGIN >= remaining:
                # Every token allowed so far left a way out that fits; an older one (the
                # hint) may be longer than the shortest.
                if len(self.plan) > remaining:
                    self.plan = self._plan_closing(limit=remaining) or self.plan
                self.closing = list(self.plan)
        if self.closing:
            self.checked = None
            token = self.closing[0]
            row.view(np.uint32)[token // 32] |= np.uint32(1 << (token % 32))
            return
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, self.num_words * 4)
        self.checked = None
        if near_end:
            self.checked = {}
            self._hold_back(row, remaining)

    def _hold_back(self, row: np.ndarray, remaining: int) -> None:
        """Clear from `row` the tokens after which no way out fits in `remaining - 1`.

        Here the plan is not forced yet: `bound + CLOSING_MARGIN < remaining`.  Free text
        without a quote stays free text, whose way out grows by at most `_INERT_GROWTH`;
        every other allowed token (closing the text, a key's letters that choose a property
        whose value is a whole required object, `{`, `[`, `,`, a marker) is checked, by
        trying the current way out after it or else planning, and the way out kept for
        `accept`.
        """
        closing = _closing_tokens(self.tokenizer)
        vocab = closing.inert_text.shape[0]
        bits = np.unpackbits(row[: (vocab + 31) // 32].view(np.uint8), bitorder="little").view(bool)
        allowed = np.zeros(vocab, dtype=bool)
        allowed[: min(vocab, len(bits))] = bits[:vocab]
        probe = closing.probe
        if probe >= 0 and allowed[probe]:  # inside free text
            candidates = np.flatnonzero(allowed & ~closing.inert_text)
        else:
            candidates = np.flatnonzero(allowed)
            if len(candidates) == 1:  # the grammar's only way: it is on every way out
                token = int(candidates[0])
                self.checked[token] = self.plan[1:] if self.plan and self.plan[0] == token else None
                return
            if len(candidates) > MAX_CHECKS:  # e.g. a number's digits, the rest of a UTF-8 character
                candidates = candidates[~closing.bulk[candidates]]
        head = self.plan[0] if self.plan else None
        rejected = []
        for i, token in enumerate(candidates.tolist()):
            if token == head:
                self.checked[token] = self.plan[1:]
                continue
            plan = None
            if i < MAX_CHECKS:
                matcher = self.matcher.deep_copy()
                if matcher.consume_token(token):
                    # Often the current way out still ends it (a digit in a number); else plan.
                    if self.plan is not None and self._still_ends(matcher, self.plan):
                        plan = self.plan
                    else:
                        plan = self._plan_from(matcher, limit=remaining - 1)
            if plan is None:
                rejected.append(token)
            else:
                self.checked[token] = plan
        if not rejected:
            return
        view = row.view(np.uint32)
        for token in rejected:
            view[token // 32] &= ~np.uint32(1 << (token % 32))
        if not view.any():  # only tokens that needed checking, and none fits: take the plan's way
            self.plan = self.plan if self.plan is not None else self._plan_closing(limit=remaining)
            if self.plan:
                token = self.plan[0]
                view[token // 32] |= np.uint32(1 << (token % 32))
                self.checked[token] = self.plan[1:]

    @property
    def planning(self) -> bool:
        """Near the end of the budget: this state's mask is more than the matcher's."""
        remaining = self.remaining
        return self.closing is not None or (remaining is not None and remaining <= self.window)

    @staticmethod
    def _still_ends(matcher: llguidance.LLMatcher, plan: list[int]) -> bool:
        """Whether `plan` finishes the grammar from `matcher`'s state (which this leaves as
        it found it)."""
        done = matcher.try_consume_tokens(plan)
        ends = done == len(plan) and matcher.is_accepting()
        matcher.rollback(done)
        return ends

    def _plan_closing(self, limit: int) -> list[int] | None:
        """The tokens of a short way to finish the grammar from here, or None if none
        within `limit`."""
        return self._plan_from(self.matcher.deep_copy(), limit)

    def _plan_from(self, matcher: llguidance.LLMatcher, limit: int) -> list[int] | None:
        """A short way to finish the grammar from `matcher`'s state, which this advances
        (greedy over single-byte tokens in closing-first order), or None if none within
        `limit` tokens."""
        closing = _closing_tokens(self.tokenizer)
        plan: list[int] = []
        while not matcher.is_accepting():
            if len(plan) >= limit or matcher.is_error():
                return None
            # Where the grammar allows only one continuation (a key's remaining letters,
            # `": `), take it in its usual tokens: far fewer than byte by byte.
            forced = matcher.compute_ff_tokens()
            if forced and matcher.consume_tokens(forced):
                plan += forced
                continue
            mask = matcher.compute_bitmask()
            probe = closing.probe
            in_text = probe >= 0 and mask[probe >> 3] >> (probe & 7) & 1
            order = closing.text_order if in_text else closing.struct_order
            token = next((t for t in order if mask[t >> 3] >> (t & 7) & 1), None)
            if token in closing.markers:
                allowed = [t for t in closing.markers if mask[t >> 3] >> (t & 7) & 1]
                if len(allowed) > 1:
                    token = self._least_opening(matcher, sorted(allowed), closing)
            if token is None:  # only longer tokens fit here (e.g. "se" to end "false")
                allowed = np.flatnonzero(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little"))
                token = int(allowed[0]) if len(allowed) else None
            if token is None or not matcher.consume_token(token):
                return None
            plan.append(token)
        return plan

    @staticmethod
    def _least_opening(matcher, candidates: list[int], closing: "_ClosingTokens") -> int:
        """Among allowed markers, one that does not open free text (an optional <think>
        before a forced tool call only lengthens the way out)."""
        markers = candidates
        for token in markers:
            probe = matcher.deep_copy()
            probe.consume_token(token)
            mask = probe.compute_bitmask()
            if not (closing.probe >= 0 and mask[closing.probe >> 3] >> (closing.probe & 7) & 1):
                return token
        return markers[0]

    def accept(self, token: int) -> None:
        self.generated += 1
        if self.closing:
            if token == self.closing[0]:
                self.closing.pop(0)
            else:  # a stop token ended it; nothing more to force
                self.closing = []
        if not self.matcher.consume_token(token):
            # Only a token outside the mask gets here (an engine bug): the matcher is now in
            # its error state and allows nothing, which ends the sequence.
            log.error("grammar rejected token %d: %s", token, self.matcher.get_error())
        # The way out from here: known when the token was checked (or was the plan's own),
        # else at most a little longer than before (free text, digits), or unknown (a token
        # not checked at all: plan again as soon as it matters).
        checked, self.checked = self.checked, None
        plan = checked.get(token) if checked is not None else None
        self.plan = list(plan) if plan is not None else None
        if plan is not None:
            self.bound = len(plan)
            self.hint = self.plan
        elif checked is not None and token in checked:  # the grammar's only way
            self.bound -= 1
        else:
            self.bound = self.bound + _INERT_GROWTH if checked is not None else _UNKNOWN

    @classmethod
    def fill_bitmasks(cls, states, bitmask: np.ndarray, rows: list[int]) -> None:
        # Rows near the end of their budget take the per-row path (planning); the rest are
        # filled in one parallel call.
        free = [(s, r) for s, r in zip(states, rows) if not s.planning]
        if len(free) < 2:
            for state, row in zip(states, rows):
                state.fill_bitmask(bitmask[row])
            return
        for state, row in zip(states, rows):
            if state.planning:
                state.fill_bitmask(bitmask[row])
        words = bitmask.shape[1]
        assert all(s.num_words <= words for s, _ in free) and bitmask.flags["C_CONTIGUOUS"]
        executor = cls._shared_executor()
        executor.unsafe_compute_mask_ptr(
            [(s.matcher, r) for s, r in free], bitmask.ctypes.data, words * 4, bitmask.shape[0]
        )

    @classmethod
    def _shared_executor(cls) -> llguidance.LLExecutor:
        with cls._executor_lock:
            if cls._executor is None:
                cls._executor = llguidance.LLExecutor()
            return cls._executor


def json_schema_constraint(tokenizer, schema: dict, vocab_size: int) -> GrammarConstraint:
    """Output is one JSON value valid against `schema`."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    return GrammarConstraint(tokenizer, grammar, vocab_size)


def json_object_constraint(tokenizer, vocab_size: int) -> GrammarConstraint:
    """Output is one JSON object (OpenAI's `json_object` mode)."""
    return json_schema_constraint(tokenizer, {"type": "object"}, vocab_size)


def lark_constraint(tokenizer, lark: str, vocab_size: int) -> GrammarConstraint:
    return GrammarConstraint(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), vocab_size)
