"""Token-granular prefix reuse: the block right after a new sequence's cached full blocks.

The prefix cache shares whole blocks: a block's hash covers all of its tokens, so a request
that shares a prefix with a cached one up to the middle of a block recomputes that block's
shared tokens.  Eight agents with one long system prompt and their own messages each
recompute the same 16-odd tokens of the block where the system prompt ends - on a 32-token
block about as many tokens as their own messages.

The keys and values at a position depend only on the tokens up to it, so any block that
follows the same chain of full blocks (the same parent hash) holds valid KV for the tokens it
has in common with the new sequence's next block, at the same positions.  At admission the
sequence gets a fresh block with a copy of the best such block (the longest run of common
tokens) and starts computing after the common tokens; the copy's rows past them are
overwritten by its own prefill.  Sources are blocks published in the prefix cache and the
partial last blocks of released sequences (both indexed here by parent hash, with their
tokens; a released tail stays in the free list's LRU order until a block is needed), and the
blocks of running sequences (up to the tokens they have computed).  A conversation re-sent
with a new message thus resumes inside the block where its last turn ended.  SGLang's radix
cache does the same at token granularity throughout; here full blocks stay the unit of
sharing and only the boundary block is copied.

A sliding-window pool (window_kv) copies its part of the block too, when it still holds the
source's.  Where it does not apply, the sequence starts at its full blocks as before:
recurrent state (a state can only resume at its snapshots), a block where an image starts
(its tokens are placeholders, the pixels may differ), the prefix cache off; a float sequence
under `--quantized-kv-start` copies no further than the token before its threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from .multimodal import block_key
from .sequence import Sequence


class PartialBlockIndex:
    """Cached blocks by parent hash, with their tokens: which blocks can continue a given
    chain of full blocks.  Kept by the BlockManager as it publishes full blocks, releases
    sequences' partial last blocks and hands blocks out for other tokens."""

    def __init__(self) -> None:
        self._children: dict[bytes, dict[int, np.ndarray]] = {}
        self._parent_of: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._parent_of)

    def add(self, parent: bytes, block: int, tokens: list[int]) -> None:
        self.discard(block)
        self._children.setdefault(parent, {})[block] = np.asarray(tokens, dtype=np.int64)
        self._parent_of[block] = parent

    def discard(self, block: int) -> None:
        parent = self._parent_of.pop(block, None)
        if parent is None:
            return
        siblings = self._children[parent]
        del siblings[block]
        if not siblings:
            del self._children[parent]

    def children(self, parent: bytes) -> Iterable[tuple[int, np.ndarray]]:
        return self._children.get(parent, {}).items()


class Tail(NamedTuple):
    block: int
    parent: bytes
    tokens: list[int]


def partial_tail(seq: Sequence, block_size: int, scope: bytes) -> Tail | None:
    """The sequence's partial last block as a source for others once it is released: the
    block, the hash of the full blocks before it and its computed tokens.  None when it has
    none (its computed tokens end on a block boundary), its full blocks are not all hashed,
    or an image starts in it."""
    index, valid = divmod(seq.num_computed_tokens, block_size)
    if not valid or len(seq.block_table) <= index or seq.num_hashed_blocks != index or len(seq.block_hashes) < index:
        return None
    start = index * block_size
    if block_key(seq.request, start, start + block_size):
        return None
    parent = seq.block_hashes[index - 1] if index else scope
    return Tail(seq.block_table[index], parent, seq.token_ids[start : seq.num_computed_tokens])


def common_length(tokens: np.ndarray, wanted: np.ndarray) -> int:
    """How many leading tokens the two arrays have in common."""
    n = min(len(tokens), len(wanted))
    differ = np.flatnonzero(tokens[:n] != wanted[:n])
    return int(differ[0]) if len(differ) else n


def computes_shared_blocks(seq: Sequence, running: list[Sequence], block_size: int) -> bool:
    """Whether a running sequence part-way through its prompt has yet to compute a whole
    block that waiting `seq` shares with it.  Admitting `seq` now would compute those tokens a
    second time in the same steps (requests arriving together with one new system prompt);
    waiting, it takes them from the prefix cache once computed, then the rest of the boundary
    block by copy: the shared part is computed once."""
    if getattr(seq.request, "multimodal", None) is not None:
        return False  # equal placeholder tokens say nothing about the images
    wanted = np.asarray(seq.token_ids[: seq.num_tokens - 1], dtype=np.int64)  # what a cache hit can cover
    for other in running:
        if not other.is_prefilling or getattr(other.request, "multimodal", None) is not None:
            continue
        next_block_end = (other.num_computed_tokens // block_size + 1) * block_size
        if next_block_end > len(wanted) or next_block_end > other.num_prompt_tokens:
            continue
        head = np.asarray(other.token_ids[:next_block_end], dtype=np.int64)
        if common_length(head, wanted) >= next_block_end:
            return True
    return False


class PartialPrefix:
    """The scheduler's side: at admission, extend a sequence's cached prefix into its next
    block by copying another block's KV for the tokens they share."""

    def __init__(self) -> None:
        self.reused_tokens = 0  # tokens not computed thanks to a copied partial block
        self.copies = 0

    def extend(
        self, seq: Sequence, pool, running: list[Sequence], copy: Callable[[int, int], bool],
        limit: int,
    ) -> int:
        """Give a freshly matched `seq` (its computed tokens are its full cached blocks) the
        KV of up to `limit` more tokens from the best source block; returns the tokens added.
        `pool` is the sequence's BlockManager; `copy(src, dst)` copies a block within it (and
        in the layer kinds' own storage), False when it could not."""
        bs = pool.block_size
        index = len(seq.block_table)
        start = index * bs
        if not pool.prefix_cache or seq.num_computed_tokens != start or limit <= 0:
            return 0
        if block_key(seq.request, start, start + bs):
            return 0  # an image starts in this block: equal tokens, maybe other pixels
        if index and len(seq.block_hashes) != index:
            return 0
        parent = seq.block_hashes[index - 1] if index else pool.scope
        wanted = np.asarray(seq.token_ids[start : start + min(bs, limit)], dtype=np.int64)
        best_block, best = 0, 0
        for block, tokens in self._sources(seq, pool, running, index, parent):
            n = common_length(tokens, wanted)
            if n > best:
                best_block, best = block, n
                if best == len(wanted):
                    break
        if best == 0:
            return 0
        target = pool.take_copy_target(seq, best_block)
        if target is None:
            return 0  # no free block now: it computes the tokens itself
        if not copy(best_block, target):
            return 0  # the block stays the sequence's next one, computed by its prefill
        seq.num_computed_tokens = start + best
        self.reused_tokens += best
        self.copies += 1
        return best

    @staticmethod
    def _sources(seq: Sequence, pool, running: list[Sequence], index: int, parent: bytes):
        """(block, its valid tokens) of every block that continues `seq`'s chain of `index`
        full blocks: cached blocks under that parent, then running sequences' blocks (a
        partial last block is valid up to the tokens its sequence has computed)."""
        yield from pool.partial_blocks.children(parent)
        bs = pool.block_size
        start = index * bs
        for other in running:
            if other is seq or other.pool != seq.pool or len(other.block_table) <= index:
                continue
            valid = min(bs, other.num_computed_tokens - start)
            if valid <= 0:
                continue
            if index and (len(other.block_hashes) < index or other.block_hashes[index - 1] != parent):
                continue
            if block_key(other.request, start, start + bs):
                continue
            yield other.block_table[index], np.asarray(other.token_ids[start : start + valid], dtype=np.int64)
