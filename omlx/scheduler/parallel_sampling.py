"""n > 1: several completions of one prompt that share its KV blocks.

A request with n > 1 runs as one sequence until its prompt has been computed.  At its first
sample it forks: n - 1 sibling sequences take references on the prompt's full KV blocks
(`BlockManager.fork`) and all n sample their first token from the same logits row, each
with its own random stream (seed + index).  A sibling recomputes only the prompt's last,
partial block (under block_size tokens) before decoding on its own: shared blocks are never
written again, so sharing needs no copy-on-write.  A model with recurrent-state layers cannot
recompute that tail (its state has moved past it): there the sibling gets a copy of the
parent's state and of the partial block instead (`Scheduler.fork_exact`).
"""

from __future__ import annotations

import mlx.core as mx

from .sequence import Sequence, SequenceStatus


def fork_siblings(scheduler, logits: mx.array, seqs: list[Sequence], counts: list[int]):
    """Create the siblings of every row of `seqs` (being sampled this step, after being fed
    `counts` tokens) that asks for n > 1 and is about to sample its first token.

    Returns `(logits, siblings)`: the logits with one extra row per sibling (a copy of its
    parent's row) and the siblings, which the caller samples after `seqs`.
    """
    siblings: list[Sequence] = []
    parent_rows: list[int] = []
    for row, (seq, fed) in enumerate(zip(seqs, counts)):
        request = seq.request
        if request.n <= 1 or seq.group is not None or seq.num_output_tokens:
            continue
        group = [seq]
        computed = seq.num_computed_tokens + fed  # the whole prompt, once this step is applied
        for index in range(1, request.n):
            sibling = Sequence(request, index=index)
            sibling.pool = seq.pool  # shares the pool its blocks are in
            scheduler.pool_of(seq).fork(seq, sibling, computed)
            if scheduler.layers.exact_fork:
                scheduler.fork_exact(seq, sibling, computed)
            sibling.status = SequenceStatus.RUNNING
            sibling.reported_cache_hit = True  # the prompt's cache hit is reported once, by index 0
            scheduler.running.append(sibling)
            group.append(sibling)
            siblings.append(sibling)
            parent_rows.append(row)
        for member in group:
            member.group = group
    if siblings:
        logits = logits[mx.array(list(range(len(seqs))) + parent_rows)]
    return logits, siblings


def request_finished(seq: Sequence) -> bool:
    """Whether every sequence of `seq`'s request has finished."""
    if seq.group is None:
        return seq.status is SequenceStatus.FINISHED
    return all(s.status is SequenceStatus.FINISHED for s in seq.group)


def request_sequences(seq: Sequence) -> list[Sequence]:
    """All sequences of `seq`'s request (just `seq` unless it forked)."""
    return list(seq.group) if seq.group is not None else [seq]
