"""Per-request sampling over a batch of logits.

Every row carries its own settings; rows are processed together where the math allows
(one argmax for all greedy rows, one sort for all sampled rows) and every row's result
depends only on that row, so a request's tokens do not change with what it is batched with.

Randomness comes from one uniform number per row per step, drawn from the request's own
generator when it has a seed (otherwise from the engine's), and turned into a token by
inverse-CDF lookup in the filtered distribution: seeded requests replay exactly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .request import SamplingParams
from .sequence import Sequence


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
            seq.rng = np.random.default_rng(seed)
        return float(seq.rng.random())

    def __call__(self, logits: mx.array, seqs: list[Sequence]) -> list[int]:
        logits = _adjust_logits(logits, seqs)
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
        mx.eval([ids for _, ids in pending])
        for rows, ids in pending:
            for r, t in zip(rows, ids.tolist()):
                tokens[r] = t
        return tokens


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
