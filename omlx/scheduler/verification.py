"""Accepting drafted tokens: the model's own choice, made row by row, decides.

A sequence that carried a draft `d_1..d_k` was fed its pending token and the draft, so the
pass returned k + 1 rows of logits: row j is the model's next-token distribution after the
pending token and `d_1..d_j`.  Its tokens are then chosen as if decoded one step at a time:

- greedy: row j's argmax is the token; while it equals `d_{j+1}` the draft is right and the
  next row is valid too; the first disagreement (or the last row) gives the final token.  The
  output is the same token sequence as without speculation.
- sampled: drafts are deterministic (a point mass q on `d_{j+1}`), so the standard rejection
  rule reads: accept `d_{j+1}` with probability p_j(d_{j+1}); on rejection sample from p_j
  with `d_{j+1}` removed and renormalised, and stop.  Every emitted token is distributed
  exactly as the non-speculative sampler's (p_j is the same filtered, temperature-scaled
  distribution it samples from), and seeded requests replay (uniforms come from the request's
  own stream, one per row checked and one per token sampled).

Log-probabilities are read per row, as the sampler reports them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .request import SamplingParams
from .sampler import Sampler, _adjust_logits, kept_in_rank_order, logprob_entry
from .sequence import Sequence


def verify_drafts(sampler: Sampler, logits: mx.array, seqs: list[Sequence], drafts: list[list[int]] | None = None):
    """`logits`: for each sequence in turn, 1 + len(draft) rows, where `drafts` are the
    drafts fed (the step's rows; default: each sequence's own).  Returns, per sequence,
    the tokens it emits this step (accepted drafts, then the model's own token) and, where
    the request asks for them, their (logprob, top alternatives)."""
    drafts = drafts if drafts is not None else [seq.draft for seq in seqs]
    row_seqs = [seq for seq, draft in zip(seqs, drafts) for _ in range(1 + len(draft))]
    logits = _adjust_logits(logits, row_seqs)  # logit_bias (penalised requests never draft)
    greedy_rows = [r for r, s in enumerate(row_seqs) if s.request.sampling.greedy]
    sampled_rows = [r for r, s in enumerate(row_seqs) if not s.request.sampling.greedy]
    logprob_rows = [r for r, s in enumerate(row_seqs) if s.request.logprobs is not None]
    pending = {}
    if greedy_rows:
        pending["argmax"] = mx.argmax(_rows(logits, greedy_rows), axis=-1)
    if sampled_rows:
        pending["probs"] = filtered_probs(_rows(logits, sampled_rows), [row_seqs[r].request.sampling for r in sampled_rows])
    if logprob_rows:
        picked = _rows(logits, logprob_rows)
        pending["logprobs"] = picked - mx.logsumexp(picked, axis=-1, keepdims=True)
    mx.eval(list(pending.values()))
    argmax = dict(zip(greedy_rows, pending["argmax"].tolist())) if greedy_rows else {}
    probs = np.asarray(pending["probs"]) if sampled_rows else None
    prob_row = {r: i for i, r in enumerate(sampled_rows)}
    logprobs = np.asarray(pending["logprobs"]) if logprob_rows else None
    logprob_row = {r: i for i, r in enumerate(logprob_rows)}

    results = []
    row = 0
    for seq, draft in zip(seqs, drafts):
        k = len(draft)
        if seq.request.sampling.greedy:
            tokens = _accept_greedy(draft, [argmax[row + j] for j in range(k + 1)])
        else:
            tokens = _accept_sampled(sampler, seq, draft, [probs[prob_row[row + j]] for j in range(k + 1)])
        entries = None
        if seq.request.logprobs is not None:
            entries = [logprob_entry(logprobs[logprob_row[row + j]], seq.request.logprobs, t) for j, t in enumerate(tokens)]
        results.append((tokens, entries))
        row += k + 1
    return results


def _rows(x: mx.array, rows: list[int]) -> mx.array:
    return x if len(rows) == x.shape[0] else x[mx.array(rows)]


def _accept_greedy(draft: list[int], choices: list[int]) -> list[int]:
    tokens = []
    for proposed, chosen in zip(draft, choices):
        tokens.append(chosen)
        if chosen != proposed:
            return tokens
    tokens.append(choices[len(draft)])
    return tokens


def _accept_sampled(sampler: Sampler, seq: Sequence, draft: list[int], rows: list[np.ndarray]) -> list[int]:
    tokens = []
    for proposed, p in zip(draft, rows):
        if sampler._uniform(seq) < p[proposed]:
            tokens.append(proposed)
            continue
        residual = p.copy()
        residual[proposed] = 0.0
        tokens.append(_inverse_cdf(residual, sampler._uniform(seq)))
        return tokens
    tokens.append(_inverse_cdf(rows[len(draft)], sampler._uniform(seq)))
    return tokens


def _inverse_cdf(p: np.ndarray, u: float) -> int:
    cdf = np.cumsum(p, dtype=np.float64)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    # Never past the last token with any probability (rounding at the top of the CDF).
    return min(index, int(np.flatnonzero(p > 0)[-1]))


def filtered_probs(logits: mx.array, params: list[SamplingParams]) -> mx.array:
    """Each row's sampling distribution over the whole vocabulary: temperature, then top-k,
    top-p and min-p as the sampler keeps tokens (`kept_in_rank_order`), renormalised."""
    vocab = logits.shape[1]
    temps = mx.array([p.temperature for p in params], dtype=mx.float32)[:, None]
    scaled = logits / temps
    probs = mx.softmax(scaled, axis=-1, precise=True)
    order = mx.argsort(-scaled, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    kept_sorted = mx.where(kept_in_rank_order(sorted_probs, params, vocab), sorted_probs, 0.0)
    # Back to vocabulary order: scatter through the inverse permutation.
    inverse = mx.argsort(order, axis=-1)
    kept = mx.take_along_axis(kept_sorted, inverse, axis=-1)
    return kept / kept.sum(axis=-1, keepdims=True)
