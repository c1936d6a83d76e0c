"""Speculative decoding inside the continuous batch: who drafts, how much, and when to stop.

A decoding sequence may carry a *draft*: up to k tokens guessed to follow its pending token.
The step then feeds it 1 + k rows (the pending token and the draft) in the same ragged pass
as everything else, gets logits at every one of them, and `verification` accepts the longest
prefix of the draft the model agrees with plus one token of its own.  Verifying costs a few
extra rows in a pass that reads the weights anyway, so every accepted token is a decode step
saved.  Rejected rows' KV is simply not counted (see `Scheduler.apply_verified`).

Drafts come from a `Drafter`:
- `PromptLookupDrafter` (default): the continuation of the most recent earlier occurrence of
  the sequence's last few tokens in its own context (prompt, OpenAI `prediction` content, output
  so far).  No model, no state outside the sequence; agents re-typing code, JSON and paths from
  their context accept most of it.
- `omlx.scheduler.draft_model.DraftModelDrafter`: a smaller model with the same tokenizer.

How many tokens to draft is each sequence's own `DraftPolicy`: it grows after full acceptance,
shrinks to what was accepted, and after drafts keep failing it pauses drafting for that
sequence for longer and longer, so a workload that never repeats pays (almost) nothing.

Drafting is skipped for sequences whose tokens depend on their own history in a way the
verifier does not replay per row (grammar constraints, repetition / presence / frequency
penalties): those decode one token per step exactly as without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class SpeculationConfig:
    enabled: bool = True  # prompt lookup for every request that does not opt out
    max_draft_tokens: int = 8  # the most draft rows one sequence gets in a step
    initial_draft_tokens: int = 4
    # n-gram sizes prompt lookup matches, longest first: longer is more specific, shorter
    # finds more.  One-token matches are too ambiguous to pay.
    max_ngram: int = 4
    min_ngram: int = 2
    # After this many drafts in a row with nothing accepted, a sequence pauses drafting for
    # `pause` steps, doubling with each further failure up to `max_pause`.
    misses_before_pause: int = 2
    max_pause: int = 64


class DraftPolicy:
    """One sequence's draft length, adapted to its recent acceptance."""

    __slots__ = ("config", "length", "misses", "pause", "resume_at", "steps", "drafted", "accepted")

    def __init__(self, config: SpeculationConfig):
        self.config = config
        self.length = config.initial_draft_tokens
        self.misses = 0  # drafts in a row with nothing accepted
        self.pause = 0  # steps the current pause lasts (0: not paused yet)
        self.resume_at = 0  # no drafting before this step of the sequence
        self.steps = 0
        self.drafted = 0
        self.accepted = 0

    def wanted(self) -> int:
        """Draft tokens to ask for this step (0 while paused)."""
        self.steps += 1
        return 0 if self.steps < self.resume_at else self.length

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        config = self.config
        if accepted == drafted:
            self.length = min(config.max_draft_tokens, self.length + 2)
        else:
            self.length = max(1, accepted + 1)
        if accepted:
            self.misses = 0
            self.pause = 0
            return
        self.misses += 1
        if self.misses >= config.misses_before_pause:
            self.pause = min(config.max_pause, max(2, self.pause * 2))
            self.resume_at = self.steps + self.pause + 1  # `pause` steps without drafting


class NgramIndex:
    """Where each short n-gram of a token list last occurred with a token after it.

    Kept up to date incrementally as the list grows (output tokens append), so a lookup is a
    dict probe per n-gram size, not a scan of a context that may hold thousands of tokens.
    """

    __slots__ = ("sizes", "last", "indexed")

    def __init__(self, sizes: range):
        self.sizes = sizes
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.indexed = 0  # n-grams ending before this index are in `last`

    def extend(self, tokens: list[int]) -> None:
        """Index the n-grams whose following token now exists (all but the list's tail)."""
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in self.sizes:
                if end >= n:
                    self.last[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens))

    def continuation(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the most recent earlier occurrence of the
        longest matching tail n-gram of `tokens` (lookup context: `tokens` itself)."""
        self.extend(tokens)
        for n in self.sizes:  # longest first
            if len(tokens) <= n:
                continue
            start = self.last.get(tuple(tokens[-n:]))
            if start is not None and start < len(tokens):
                return tokens[start : start + limit]
        return []


class PromptLookupDrafter:
    """Drafts from the sequence's own context; needs no model and no batched pass."""

    name = "prompt_lookup"
    immediate = True  # drafts are known as soon as asked (the scheduler sizes blocks on them)

    def __init__(self, config: SpeculationConfig):
        self.config = config
        self.sizes = range(config.max_ngram, config.min_ngram - 1, -1)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        spec = seq.speculation
        if spec.index is None:
            spec.index = NgramIndex(self.sizes)
            # Predicted output the client sent (OpenAI `prediction`) goes first in the
            # lookup context, so the prompt's and output's own occurrences win over it.
            context = list(seq.request.predicted_token_ids) + seq.token_ids
            spec.context_offset = len(seq.request.predicted_token_ids)
            spec.context = context
        else:
            context = spec.context
            context.extend(seq.token_ids[len(context) - spec.context_offset :])
        return spec.index.continuation(context, limit)

    def can_propose(self, seq: Sequence) -> bool:
        """Whether `propose` would draft anything now (the lookup is deterministic)."""
        return bool(self.propose(seq, 1))


class SequenceSpeculation:
    """A sequence's speculative-decoding state (on `Sequence.speculation`)."""

    __slots__ = ("policy", "index", "context", "context_offset", "draft_state")

    def __init__(self, config: SpeculationConfig):
        self.policy = DraftPolicy(config)
        self.index: NgramIndex | None = None
        self.context: list[int] = []
        self.context_offset = 0
        self.draft_state = None  # the draft model's own view of the sequence, if one drafts


def can_speculate(seq: Sequence) -> bool:
    """Whether the verifier replays this sequence's sampling exactly, row by row."""
    request = seq.request
    if not request.speculative or seq.constraint is not None:
        return False
    return not request.sampling.has_penalties


class Speculator:
    """The engine's speculative decoding: which sequences draft, how much, and the counts."""

    def __init__(self, config: SpeculationConfig, drafter=None):
        self.config = config
        self.drafter = drafter if drafter is not None else PromptLookupDrafter(config)
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0
        self.active = True  # False: no sequence drafts (the engine's runner cannot verify)

    def plan(self, seq: Sequence, cap: int) -> int:
        """How many draft rows to reserve for `seq` this step (at most `cap`); an immediate
        drafter also fills `seq.draft` now."""
        seq.draft = []
        if cap <= 0 or not self.active or not can_speculate(seq):
            return 0
        if seq.speculation is None:
            seq.speculation = SequenceSpeculation(self.config)
        want = min(cap, seq.speculation.policy.wanted())
        if want <= 0:
            return 0
        if not self.drafter.immediate:
            return want
        seq.draft = self.drafter.propose(seq, want)
        return len(seq.draft)

    def pays_past_cheap_rows(self, seq: Sequence) -> bool:
        """Whether the sequence's drafts are accepted often enough to pay for a step in the
        model's expensive form (a dual-form model's packed bf16: ~1.5x the step): with
        acceptance a, a draft of k yields (1 - a^(k+1)) / (1 - a) tokens, so a long draft beats
        a one-token one in the cheap form from a ~ 0.6.  Judged on at least 8 drafted tokens."""
        policy = seq.speculation.policy if seq.speculation is not None else None
        return policy is not None and policy.drafted >= 8 and policy.accepted >= 0.6 * policy.drafted

    def would_draft(self, seq: Sequence) -> bool:
        """Whether `plan` would draft for `seq` now (an immediate drafter; nothing reserved)."""
        if not self.active or not self.drafter.immediate or not can_speculate(seq):
            return False
        if seq.speculation is None:
            seq.speculation = SequenceSpeculation(self.config)
        # The step built ahead is a step of the sequence that `plan` never saw: counted here,
        # so pauses run out in steps, pipelined or not.
        if seq.speculation.policy.wanted() <= 0:
            return False
        # A drafter that can say so without side effects (prompt lookup) is asked; any other
        # (one with its own random stream, say) is taken to draft whenever the policy wants.
        probe = getattr(self.drafter, "can_propose", None)
        return probe(seq) if probe is not None else True

    def draft(self, seqs: list[Sequence], limits: list[int]) -> None:
        """Fill the drafts of a drafter that needs a batched pass (a draft model)."""
        if not self.drafter.immediate and seqs:
            self.drafter.propose_batch(seqs, limits)

    def release(self, seq: Sequence) -> None:
        """A sequence finished or was preempted: what the drafter holds for it goes."""
        release = getattr(self.drafter, "release", None)
        if release is not None:
            release(seq)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        if drafted:
            seq.speculation.policy.record(drafted, accepted)
            self.drafted_tokens += drafted
            self.accepted_tokens += accepted
            self.verify_steps += 1

    def stats(self) -> dict:
        extra = self.drafter.stats() if hasattr(self.drafter, "stats") else {}
        return {
            **extra,
            "enabled": True,
            "drafter": self.drafter.name,
            "max_draft_tokens": self.config.max_draft_tokens,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0,
        }
