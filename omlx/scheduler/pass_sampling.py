"""From one forward pass's logits to the rows' tokens: sampling, draft verification, n > 1.

The logits rows come sequence after sequence (`ScheduledRow.want_logits` each): one to sample,
or a draft's rows to verify.  A row whose request forks (`fan_out` > 1) is sampled once per
completion, each with its own random stream (see parallel_sampling).  Everything lands in the
step's `RunnerOutput`; nothing is written onto the sequences but the sampler's own state
(random streams, grammar constraints).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .sampler import Sampler
from .sequence import Sequence
from .step import RunnerOutput, ScheduledRow
from .verification import verify_drafts


def sample_pass(
    sampler: Sampler, logits: mx.array, rows: list[ScheduledRow], part: list[int],
    resolve: Callable[[str, int], Sequence], result: RunnerOutput, profile=None,
    take_back: Callable[[int, Sequence, int], None] | None = None,
) -> None:
    """`part`: the indices (into `rows` and `result`) of the pass's rows, in pass order.
    `take_back(position in pass, sequence, rows kept)`: called for a verified draft that kept
    fewer rows than it fed (recurrent state must forget the rest)."""
    want = [rows[k].want_logits for k in part]
    first_row = np.cumsum([0] + want[:-1])
    verifying = [i for i, k in enumerate(part) if rows[k].draft]
    plain = [i for i, k in enumerate(part) if not rows[k].draft and want[i]]
    if verifying:
        picks = np.concatenate([np.arange(first_row[i], first_row[i] + want[i]) for i in verifying])
        seqs = [resolve(rows[part[i]].request_id, rows[part[i]].index) for i in verifying]
        with _phase(profile, "verify"):
            verified = verify_drafts(sampler, logits[mx.array(picks)], seqs, [rows[part[i]].draft for i in verifying])
        for i, seq, (tokens, entries) in zip(verifying, seqs, verified):
            k = part[i]
            result.sampled[k], result.logprobs[k], result.accepted[k] = tokens, entries, len(tokens) - 1
            if take_back is not None and len(tokens) - 1 < len(rows[k].draft):
                take_back(i, seq, len(tokens))
    if not plain:
        return
    row_logits = logits if not verifying else logits[mx.array(first_row[plain])]
    seqs = [resolve(rows[part[i]].request_id, rows[part[i]].index) for i in plain]
    # n > 1: the other completions sample from their parent's row, after every row.
    parents, extra = [], []
    for j, i in enumerate(plain):
        row = rows[part[i]]
        for index in range(1, row.fan_out):
            parents.append(j)
            extra.append(resolve(row.request_id, index))
    if extra:
        row_logits = row_logits[mx.array(list(range(len(plain))) + parents)]
    with _phase(profile, "sample"):
        tokens, entries = sampler.sample(row_logits, seqs + extra)
    for j, entry in enumerate(entries):
        k = part[plain[j if j < len(plain) else parents[j - len(plain)]]]
        result.sampled[k].append(tokens[j])
        if entry is not None:
            result.logprobs[k] = (result.logprobs[k] or []) + [entry]


class _NoPhase:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _phase(profile, name: str):
    return profile.phase(name) if profile is not None else _NoPhase()
