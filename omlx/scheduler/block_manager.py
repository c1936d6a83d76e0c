"""Which KV blocks belong to whom: allocation, ref counts and hash-chained prefix reuse.

The KV pool is cut into fixed-size blocks; each sequence owns a block table.  A block that
is full gets a hash chained over the whole prefix up to its end (and scoped to the model),
so two requests that start with the same tokens map their leading blocks to the same
physical blocks.  When a block's last user leaves, it stays in the pool with its hash as a
cached prefix, in LRU order, until allocation needs the space.

Block 0 is never handed out: padded positions in a batch read and write it harmlessly.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from .multimodal import block_key
from .partial_prefix import PartialBlockIndex, partial_tail
from .sequence import Sequence

SCRATCH_BLOCK = 0


def hash_block(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    """`extra`: what else the block's KV depends on (the images whose tokens start in it)."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra:
        digest.update(extra)
    return digest.digest()


def prefix_hashes(seq: Sequence, scope: bytes, bs: int, n: int) -> list[bytes]:
    """The chained hashes of `seq`'s first `n` full blocks under `scope`, each computed once
    per sequence: admission after a preemption, the disk tier's read-ahead and a move between
    pools ask again for hashes already made.  (A sequence's tokens only grow, so a full
    block's hash never changes; a draft model's shadow sequence gets a new token list when it
    resyncs, and its hashes are made anew.)"""
    memo = seq.hash_memo
    if memo is None or memo[0] is not seq.token_ids:
        memo = seq.hash_memo = (seq.token_ids, {})
    chain = memo[1].setdefault((scope, bs), [])
    while len(chain) < n:
        chain.append(hash_seq_block(chain[-1] if chain else scope, seq, len(chain), bs))
    return chain if len(chain) == n else chain[:n]


def _remember_hash(seq: Sequence, scope: bytes, bs: int, i: int, h: bytes) -> None:
    """Keep a hash `cache_full_blocks` made for block `i`, when the chain reaches it."""
    memo = seq.hash_memo
    if memo is None or memo[0] is not seq.token_ids:
        memo = seq.hash_memo = (seq.token_ids, {})
    chain = memo[1].setdefault((scope, bs), [])
    if len(chain) == i:
        chain.append(h)


def hash_seq_block(parent: bytes, seq: Sequence, i: int, bs: int) -> bytes:
    """The hash of a sequence's block `i`, chained on `parent`."""
    return hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], block_key(seq.request, i * bs, (i + 1) * bs))


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, scope: bytes = b"omlx", prefix_cache: bool = True,
        max_blocks: int | None = None,
    ):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks")
        self.num_blocks = num_blocks
        # The pool may grow up to `max_blocks` (see `grower`); a fixed pool when equal.
        self.max_blocks = max(max_blocks or num_blocks, num_blocks)
        # Set by the engine for a growable pool: grower(n) tries to add at least n blocks to
        # the KV storage (memory permitting) and calls `add_blocks`; returns whether it did.
        self.grower: Callable[[int], bool] | None = None
        self.block_size = block_size
        # The root of every hash chain: blocks of different models never collide.
        self.scope = hashlib.blake2b(scope, digest_size=16).digest()
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Unreferenced blocks, the next to be reused first.  Blocks holding a cached prefix
        # join at the back (most recently used); blocks with nothing worth keeping at the front.
        self.free_blocks: OrderedDict[int, None] = OrderedDict(
            (b, None) for b in range(1, num_blocks)
        )
        self.prefix_cache = prefix_cache  # off: nothing is looked up, so nothing is reused
        # Published blocks by parent hash, with their tokens: the sources of a partial block's
        # KV for a sequence that shares part of it (omlx.scheduler.partial_prefix).
        self.partial_blocks = PartialBlockIndex()
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens served from it
        # The disk tier (omlx.scheduler.disk.DiskKVCache), when the engine has one:
        # published blocks are written behind, and prefixes continue from it past memory.
        self.disk = None
        self._disk_loads: list[tuple[int, bytes]] = []  # see take_disk_loads
        # Layers whose KV lives in a pool of their own, keyed by this pool's blocks (sliding
        # windows: omlx.scheduler.window_kv), hear when a block is published in the prefix
        # cache and when it is taken for other tokens.
        self.on_publish: Callable[[bytes, int], None] | None = None
        self.on_evict: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        """Blocks that allocation may take (truly free or holding an evictable prefix)."""
        return len(self.free_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    @property
    def usable_blocks(self) -> int:
        """Blocks in the pool now (the scratch block aside)."""
        return self.num_blocks - 1

    @property
    def max_usable_blocks(self) -> int:
        """Blocks the pool could ever hold: what decides whether a request can ever fit."""
        return self.max_blocks - 1

    def add_blocks(self, n: int) -> None:
        """New, empty blocks at the end of the pool (the storage has grown)."""
        start = self.num_blocks
        self.num_blocks += n
        self.max_blocks = max(self.max_blocks, self.num_blocks)
        self.ref_counts += [0] * n
        self.block_hash += [None] * n
        for block in range(self.num_blocks - 1, start - 1, -1):
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)  # empty: handed out first

    def truncate(self, num_blocks: int) -> None:
        """Drop the blocks from `num_blocks` on (the pool shrinks): none may be in use; the
        prefixes they cached are forgotten (the disk tier may still have them)."""
        dropped = range(num_blocks, self.num_blocks)
        assert all(self.ref_counts[b] == 0 for b in dropped), "truncating blocks in use"
        for block in dropped:
            del self.free_blocks[block]
            self._evict(block)
        del self.ref_counts[num_blocks:], self.block_hash[num_blocks:]
        self.num_blocks = num_blocks

    def _make_free(self, needed: int) -> None:
        """Grow the pool, if it can, rather than hand out fewer than `needed` blocks or evict
        cached prefixes: memory the budget allows is better spent keeping them."""
        if self.grower is None or self.num_blocks >= self.max_blocks or needed <= 0:
            return
        front = itertools.islice(self.free_blocks, needed)
        if len(self.free_blocks) >= needed and all(self.block_hash[b] is None for b in front):
            return  # enough empty blocks
        self.grower(needed)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, seq: Sequence) -> int:
        """Give a fresh sequence the cached blocks its tokens start with; returns tokens reused.

        At least one token is always left to compute, because the model must see the last
        prompt token to produce the first output token.
        """
        assert not seq.block_table
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs if self.prefix_cache else 0
        hits = 0
        hashes: list[bytes] = []
        for h in prefix_hashes(seq, self.scope, bs, max_blocks):
            block = self.hash_to_block.get(h)
            if block is not None:
                self._acquire(block)
            else:
                # Past memory, the chain may go on in the disk tier.
                block = self._load_from_disk(h)
                if block is None:
                    break
            seq.block_table.append(block)
            hashes.append(h)
            hits += 1
        seq.block_hashes = hashes
        seq.num_hashed_blocks = hits
        seq.num_computed_tokens = hits * bs
        if self.disk is not None:
            self.disk.release(seq.arrival)  # what it read ahead and this did not take is dead
        return hits * bs

    def keep_prefix(self, seq: Sequence, num_blocks: int) -> None:
        """Cut a freshly matched prefix back to its first `num_blocks` blocks (a model with
        recurrent state can resume only where a state snapshot was taken); the rest are
        released and stay cached."""
        for block in reversed(seq.block_table[num_blocks:]):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, "block freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        del seq.block_table[num_blocks:]
        del seq.block_hashes[num_blocks:]
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, num_blocks)
        seq.num_computed_tokens = num_blocks * self.block_size

    def prefetch(self, seq: Sequence) -> None:
        """Have the disk tier read ahead (off the engine thread) the blocks `match_prefix`
        will load from it for this new sequence: its chain past what memory holds."""
        if self.disk is None or not self.prefix_cache or not self.disk.prefetch_enabled:
            return
        bs = self.block_size
        wanted: list[bytes] = []
        for h in prefix_hashes(seq, self.scope, bs, (seq.num_tokens - 1) // bs):
            if h not in self.hash_to_block:
                if h not in self.disk:
                    break
                wanted.append(h)
        if wanted:
            self.disk.prefetch(wanted, seq.arrival)

    def prefetching(self, seq: Sequence) -> bool:
        """Whether the disk tier is still reading ahead for this waiting sequence."""
        return self.disk is not None and self.disk.prefetching(seq.arrival)

    def _load_from_disk(self, h: bytes) -> int | None:
        """A free pool block holding the disk tier's copy of block `h`, registered in the
        prefix cache and held once; None if the disk has no good copy (or no block is free)."""
        if self.disk is None or h not in self.disk:
            return None
        self._make_free(1)
        if not self.free_blocks:
            return None
        block, _ = self.free_blocks.popitem(last=False)
        self._evict(block)
        if not self.disk.load(h, block):
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)
            return None
        self.ref_counts[block] = 1
        self.hash_to_block[h] = block
        self.block_hash[block] = h
        self._disk_loads.append((block, h))
        return block

    def take_disk_loads(self) -> list[tuple[int, bytes]]:
        """The (block, hash) pairs read back from the disk tier since the last call: the step
        contract's KV operations (another rank loads the same blocks from its own tier)."""
        loads, self._disk_loads = self._disk_loads, []
        return loads

    def record_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += prompt_tokens
        self.prefix_hits += hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed blocks in the prefix cache."""
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else self.scope
        for i in range(seq.num_hashed_blocks, num_full):
            h = hash_seq_block(parent, seq, i, bs)
            _remember_hash(seq, self.scope, bs, i, h)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            # Another sequence may have computed the same prefix concurrently; the first
            # copy stays the canonical one and this block is simply not shared.
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                if not block_key(seq.request, i * bs, (i + 1) * bs):
                    self.partial_blocks.add(parent, block, seq.token_ids[i * bs : (i + 1) * bs])
                if self.disk is not None:
                    self.disk.publish(h, block)
                if self.on_publish is not None:
                    self.on_publish(h, block)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    # ------------------------------------------------------------------ allocation
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens; False if out of blocks."""
        needed = self.blocks_needed(seq, num_new_tokens)
        self._make_free(needed)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def take_copy_target(self, seq: Sequence, source: int) -> int | None:
        """A fresh block at the end of the sequence's table, to receive a copy of `source`
        (omlx.scheduler.partial_prefix); None, taking nothing, if no block is free.  The
        source is held meanwhile: a cached block in the free list must not be the one handed
        out.  Released, it goes back to the free list as most recently used."""
        self._acquire(source)
        taken = self.allocate(seq, 1) and seq.block_table[-1]
        self.ref_counts[source] -= 1
        if self.ref_counts[source] == 0:
            self.free_blocks[source] = None
        return taken or None

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past those holding the sequence's computed tokens (a rejected
        speculative draft's rows).  They were allocated for it alone and never hashed."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.ref_counts[block] == 1 and self.block_hash[block] is None, "trimming a shared block"
            self.ref_counts[block] = 0
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)  # empty: handed out first

    def adopt(self, token_ids: list[int], num_tokens: int, request=None,
              seq: Sequence | None = None) -> tuple[list[int], list[bytes], list[int]] | None:
        """Blocks in this pool for the first `num_tokens` tokens of a sequence whose KV another
        pool holds (`--quantized-kv-start`: a float sequence moving to the quantized pool).

        Leading full blocks this pool already caches under the same prefix are shared; the
        rest are fresh, for the caller to fill.  Returns (block table, hashes of the shared
        blocks, indices in the table of the fresh blocks), or None - taking nothing - when the
        pool cannot hold them.
        """
        bs = self.block_size
        total = -(-num_tokens // bs)
        shared: list[int] = []
        hashes: list[bytes] = []
        count = num_tokens // bs if self.prefix_cache else 0
        if seq is not None:
            chain = prefix_hashes(seq, self.scope, bs, count)
        else:
            chain, parent = [], self.scope
            for i in range(count):
                parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], block_key(request, i * bs, (i + 1) * bs))
                chain.append(parent)
        for h in chain:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            shared.append(block)
            hashes.append(h)
        fresh = total - len(shared)
        # Shared blocks nobody references sit in the free list: taking them uses it up too.
        needed = fresh + sum(1 for b in shared if self.ref_counts[b] == 0)
        self._make_free(needed)
        if needed > len(self.free_blocks):
            return None
        for block in shared:
            self._acquire(block)
        table = list(shared)
        for _ in range(fresh):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            table.append(block)
        return table, hashes, list(range(len(shared), total))

    def fork(self, parent: Sequence, child: Sequence, num_computed: int) -> None:
        """Give a fresh `child` the parent's full blocks among its first `num_computed` tokens
        (n > 1 completions of one prompt).  Only full blocks are shared: the partial last one
        is where each child writes its own tokens, so the child recomputes that tail.
        """
        assert not child.block_table
        n = min(num_computed // self.block_size, len(parent.block_table))
        for block in parent.block_table[:n]:
            self._acquire(block)
        child.block_table = parent.block_table[:n]
        child.block_hashes = parent.block_hashes[:n]
        child.num_hashed_blocks = min(parent.num_hashed_blocks, n)
        child.num_computed_tokens = n * self.block_size

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; its full blocks stay cached for later reuse, and so
        does its partial last block, as a source of token-granular reuse (partial_prefix)."""
        tail = partial_tail(seq, self.block_size, self.scope) if self.prefix_cache else None
        # Tail blocks are released first so that they are also evicted first: a prefix is
        # only useful from its beginning.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, "block freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_hash[block] is None and (tail is None or block != tail.block):
                    self.free_blocks.move_to_end(block, last=False)
        if tail is not None and self.ref_counts[tail.block] == 0 and self.block_hash[tail.block] is None:
            self.partial_blocks.add(tail.parent, tail.block, tail.tokens)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        if self.disk is not None:
            self.disk.release(seq.arrival)  # ended before admission: its read-ahead too

    def _acquire(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        """`block` is taken for other tokens (or dropped): it no longer holds its prefix."""
        if self.on_evict is not None:
            self.on_evict(block)
        self.partial_blocks.discard(block)
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None

    # ------------------------------------------------------------------ checks
    def leaked_blocks(self) -> list[int]:
        """Blocks still referenced; empty once every sequence has been freed."""
        return [b for b in range(1, self.num_blocks) if self.ref_counts[b] != 0]

    def stats(self) -> dict:
        out = {
            "block_size": self.block_size,
            "total_blocks": self.usable_blocks,
            "max_blocks": self.max_usable_blocks,
            "free_blocks": self.num_free_blocks,
            "used_blocks": self.usable_blocks - self.num_free_blocks,
            "cached_blocks": self.num_cached_blocks,
            "prefix_cache_query_tokens": self.prefix_queries,
            "prefix_cache_hit_tokens": self.prefix_hits,
            "prefix_cache_hit_rate": (
                self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
            ),
        }
        if self.disk is not None:
            out["disk"] = self.disk.stats()
        return out
