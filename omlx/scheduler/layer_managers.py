"""The managers of the layer kinds that keep more than the main pool's blocks, as one.

The main pool's `BlockManager` holds the blocks of full-attention layers and the block tables
every kind shares (the prefix cache's hashes are over them).  A kind with storage of its own
gets a manager here: sliding windows (`window_kv.WindowKV`: a window pool keyed by the main
pool's blocks), recurrent state (`state_manager.StateManager`: a slot per sequence, snapshots
for the prefix cache).  The scheduler and the engine speak to them only through this: what a
new sequence may resume from, a sequence letting go, an n > 1 sibling forking, the end of a
step, memory and statistics.  A new layer kind is one new manager in the list.
"""

from __future__ import annotations


class LayerManagers:
    def __init__(self, managers: list):
        # Admission asks them in this order, each cutting the prefix further: the window pool
        # first (a resume point needs its window), recurrent state last (a snapshot exactly
        # there).
        self.managers = managers

    def __bool__(self) -> bool:
        return bool(self.managers)

    @property
    def exact_fork(self) -> bool:
        """Whether n > 1 siblings must start exactly where their parent is (state cannot be
        recomputed from the shared blocks alone)."""
        return any(getattr(m, "exact_fork", False) for m in self.managers)

    def admit(self, seq, blocks, hit: int) -> int:
        """Of `hit` cached tokens matched for a new sequence, what it can resume from."""
        for manager in self.managers:
            hit = manager.admit(seq, blocks, hit)
        return hit

    def release(self, seq) -> None:
        for manager in self.managers:
            manager.release(seq)

    def fork(self, parent, child, copied: tuple[int, int] | None) -> None:
        """`child` starts where `parent` is; `copied`: (parent's block, child's block) when the
        parent's partial last block was copied for it."""
        for manager in self.managers:
            manager.fork(parent, child, copied)

    @property
    def copy_partial_blocks(self) -> bool:
        """Whether every kind can give a new sequence a copy of another block's storage for
        the tokens they share (partial_prefix); recurrent state cannot: it resumes only at
        its snapshots."""
        return all(hasattr(m, "copy_partial") for m in self.managers)

    def copy_partial(self, seq, src: int, dst: int) -> bool:
        """A new sequence's next block `dst` (a copy of the main pool's `src`) gets `src`'s
        storage in every kind that keeps its own; False when one no longer has it."""
        return all(m.copy_partial(seq, src, dst) for m in self.managers)

    def after_step(self, plan, seqs: list) -> None:
        for manager in self.managers:
            manager.after_step(plan, seqs)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.managers)

    @property
    def max_bytes(self) -> int:
        return sum(m.max_bytes for m in self.managers)

    def stats(self) -> dict:
        return {m.stats_key: m.stats() for m in self.managers}

    def close(self) -> None:
        for manager in self.managers:
            manager.close()
