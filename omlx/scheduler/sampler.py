"""Per-request sampling over a batch of logits.

Every row carries its own settings; rows are processed together where the math allows
(one argmax for all greedy rows, one sort for all sampled rows) and every row's result
depends only on that row, so a request's tokens do not change with what it is batched with.

Randomness comes from one uniform number per row per step, drawn from the request's own
generator when it has a seed (otherwise from the engine's), and turned into a token by
inverse-CDF lookup in the filtered distribution: seeded requests replay exactly.  The n
completions of one request draw from streams seeded with seed + index.

Two features cost nothing for rows that do not ask for them:
- token constraints (grammars, thinking budgets): the rows that have one get an allowed-token
  mask, applied to the whole batch with one `where`; free rows in the same batch are untouched;
- log-probabilities: computed only for the rows that ask, from the same adjusted logits.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np

from .request import SamplingParams
from .sequence import Sequence

log = logging.getLogger("omlx.sampler")


def _adjust_logits(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    """Apply logit_bias and repetition / presence / frequency penalties (rows that ask)."""
    rows = [r for r, s in enumerate(seqs) if s.request.sampling.has_penalties or s.request.sampling.logit_bias]
    if not rows:
        return logits
    vocab = logits.shape[1]
    add = np.zeros((len(seqs), vocab), dtype=np.float32)
    repeat_mask = np.zeros((len(seqs), vocab), dtype=bool)
    rep_penalty = np.ones((len(seqs), 1), dtype=np.float32)
    for r in rows:
        params: SamplingParams = seqs[r].request.sampling
        if params.logit_bias:
            ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
            vals = np.fromiter(params.logit_bias.values(), dtype=np.float32)
            keep = ids < vocab
            add[r, ids[keep]] += vals[keep]
        if params.presence_penalty or params.frequency_penalty:
            counts = np.bincount(np.asarray(seqs[r].output_token_ids, dtype=np.int64), minlength=vocab)[:vocab]
            add[r] -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
        if params.repetition_penalty != 1.0:
            seen = np.asarray(seqs[r].token_ids, dtype=np.int64)
            repeat_mask[r, seen[seen < vocab]] = True
            rep_penalty[r, 0] = params.repetition_penalty
    if repeat_mask.any():
        penalty = mx.array(rep_penalty)
        penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
        logits = mx.where(mx.array(repeat_mask), penalized, logits)
    return logits + mx.array(add)


class Sampler:
    def __init__(self, seed: int | None = None):
        self._rng = np.random.default_rng(seed)

    def _uniform(self, seq: Sequence) -> float:
        seed = seq.request.sampling.seed
        if seed is None:
            return float(self._rng.random())
        if seq.rng is None:
            seq.rng = np.random.default_rng(seed + seq.index)
        return float(seq.rng.random())

    def __call__(self, logits: mx.array, seqs: list[Sequence]) -> list[int]:
        logits = _adjust_logits(logits, seqs)
        constrained_rows = [r for r, s in enumerate(seqs) if s.constraint is not None]
        if constrained_rows:
            logits = _apply_constraints(logits, seqs, constrained_rows)
        greedy_rows = [r for r, s in enumerate(seqs) if s.request.sampling.greedy]
        random_rows = [r for r, s in enumerate(seqs) if not s.request.sampling.greedy]
        tokens = [0] * len(seqs)
        pending = []
        if greedy_rows:
            picked = logits if len(greedy_rows) == len(seqs) else logits[mx.array(greedy_rows)]
            pending.append((greedy_rows, mx.argmax(picked, axis=-1)))
        if random_rows:
            params = [seqs[r].request.sampling for r in random_rows]
            uniforms = [self._uniform(seqs[r]) for r in random_rows]
            picked = logits if len(random_rows) == len(seqs) else logits[mx.array(random_rows)]
            pending.append((random_rows, _sample_rows(picked, params, uniforms)))
        logprob_rows = [r for r, s in enumerate(seqs) if s.request.logprobs is not None]
        logprobs = _log_softmax_rows(logits, logprob_rows, len(seqs)) if logprob_rows else None
        mx.eval([ids for _, ids in pending] + ([logprobs] if logprobs is not None else []))
        for rows, ids in pending:
            for r, t in zip(rows, ids.tolist()):
                tokens[r] = t
        if logprobs is not None:
            _record_logprobs(np.asarray(logprobs), logprob_rows, seqs, tokens)
        for r in constrained_rows:
            seqs[r].constraint.accept(tokens[r])
        return tokens


def _apply_constraints(logits: mx.array, seqs: list[Sequence], rows: list[int]) -> mx.array:
    """Forbid, in the constrained rows, every token their constraint does not allow now."""
    from omlx.constrained import allowed_tokens

    vocab = logits.shape[1]
    active = [r for r in rows if seqs[r].constraint.active]
    if not active:  # e.g. a thinking budget not yet spent: nothing to forbid this step
        return logits
    allowed = np.ones((len(seqs), vocab), dtype=bool)
    allowed[active] = allowed_tokens([seqs[r].constraint for r in active], vocab)
    for r in active:
        if not allowed[r].any():
            # A constraint that allows nothing (a grammar in an error state) must not leave
            # the row without a token: let it end the request instead.
            log.warning("request %s: constraint allows no token; ending it", seqs[r].request_id)
            stop = [t for t in seqs[r].request.stop_token_ids if t < vocab]
            allowed[r, stop or [0]] = True
    return mx.where(mx.array(allowed), logits, -mx.inf)


def _log_softmax_rows(logits: mx.array, rows: list[int], num_rows: int) -> mx.array:
    """Log-probabilities of the rows that asked for them.

    They describe the distribution after logit_bias, penalties and any constraint mask (what
    the request's own settings made of the model's output; a forbidden token has
    probability 0) but before temperature and top-k / top-p / min-p truncation, so they are
    the model's log-probabilities whatever sampling settings are used, as OpenAI reports them.
    """
    picked = logits if len(rows) == num_rows else logits[mx.array(rows)]
    return picked - mx.logsumexp(picked, axis=-1, keepdims=True)


def _record_logprobs(logprobs: np.ndarray, rows: list[int], seqs: list[Sequence], tokens: list[int]) -> None:
    for i, r in enumerate(rows):
        row = logprobs[i]
        k = min(seqs[r].request.logprobs, row.shape[0])
        top: list[tuple[int, float]] = []
        if k > 0:
            ids = np.argpartition(-row, k - 1)[:k]
            # Most likely first; equal values by token id, so the order is deterministic.
            ids = ids[np.lexsort((ids, -row[ids]))]
            top = [(int(t), float(row[t])) for t in ids if np.isfinite(row[t])]
        seqs[r].step_logprobs = (float(row[tokens[r]]), top)


def _sample_rows(logits: mx.array, params: list[SamplingParams], uniforms: list[float]) -> mx.array:
    vocab = logits.shape[1]
    temps = mx.array([p.temperature for p in params], dtype=mx.float32)[:, None]
    top_k = mx.array([p.top_k if 0 < p.top_k < vocab else vocab for p in params])[:, None]
    top_p = mx.array([p.top_p for p in params], dtype=mx.float32)[:, None]
    min_p = mx.array([p.min_p for p in params], dtype=mx.float32)[:, None]

    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1) / temps
    probs = mx.softmax(sorted_logits, axis=-1, precise=True)
    rank = mx.arange(vocab)[None, :]
    # Mass strictly before each token: a token is kept while that is below top_p, so the
    # most likely token always survives.
    mass_before = mx.cumsum(probs, axis=-1) - probs
    keep = (rank < top_k) & (mass_before < top_p) & (probs >= min_p * probs[:, :1])
    kept = mx.where(keep, probs, 0.0)
    cdf = mx.cumsum(kept, axis=-1)
    target = mx.array(uniforms, dtype=mx.float32)[:, None] * cdf[:, -1:]
    index = mx.minimum(mx.sum(cdf <= target, axis=-1), keep.sum(axis=-1) - 1)
    return mx.take_along_axis(order, index[:, None], axis=-1)[:, 0]
