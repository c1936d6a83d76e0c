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

from .sequence import Sequence, SequenceStatus


def request_finished(seq: Sequence) -> bool:
    """Whether every sequence of `seq`'s request has finished."""
    if seq.group is None:
        return seq.status is SequenceStatus.FINISHED
    return all(s.status is SequenceStatus.FINISHED for s in seq.group)


def request_sequences(seq: Sequence) -> list[Sequence]:
    """All sequences of `seq`'s request (just `seq` unless it forked)."""
    return list(seq.group) if seq.group is not None else [seq]
