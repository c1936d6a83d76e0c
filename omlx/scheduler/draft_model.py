"""Drafting with a smaller model: one batched pass of the draft model per draft token.

The draft model keeps its own paged KV pool and, for every sequence that drafts, a *shadow*
`Sequence` in it: the main sequence's verified tokens, followed by whatever the draft model
guessed last step.  Each step, for all drafting sequences together:

1. sync: a shadow keeps the KV of its leading tokens that the main sequence has since
   verified (the prefix both agree on); the rest is rolled back (blocks past it released);
2. catch up and draft: a ragged pass of the draft model feeds each shadow its tokens not yet
   in its KV (the prompt on the first step, in chunks under a token budget; then the tokens
   accepted last step plus the model's own) and takes the argmax as draft token 1; each
   further pass feeds the previous draft token and takes the next.

Drafts are greedy (deterministic), which the verifier's rejection rule accounts for, so
sampled requests keep their distribution.  Shadows publish only verified blocks in the
draft pool's prefix cache, so prompts that share a prefix share its draft KV too.
"""

from __future__ import annotations

import logging

import mlx.core as mx

from .kv_cache import KVLayout, PagedKVStorage
from .kv_pool import KVPool
from .runner import ModelRunner
from .sequence import Sequence

log = logging.getLogger("omlx.engine")

# Prompt tokens the draft model catches up on per step, over all sequences: a long new prompt
# is drafted for only once its KV is in, rather than stalling everyone's step on it.
CATCH_UP_TOKENS = 512


class DraftModelDrafter:
    name = "draft_model"
    immediate = False  # drafts need the draft model's batched passes (engine: `draft`)

    def __init__(self, model, block_size: int, kv_bytes: int, label: str = "draft", scope: bytes = b"draft",
                 layout: KVLayout | None = None):
        """`layout`: the draft pool's (its dtype chosen as the main pool's is); default: probed."""
        layout = layout or KVLayout.probe(model)
        blocks = max(8, PagedKVStorage.blocks_for_budget(layout, block_size, kv_bytes, None, 64))
        self.pool = KVPool(f"{label} draft", layout, block_size, blocks, blocks, scope=scope)
        self.runner = ModelRunner(model, self.pool.storage)
        if not self.runner.ragged:
            raise ValueError("the draft model's attention cannot be routed to a paged cache")
        self.label = label
        self.passes = 0

    @property
    def blocks(self):
        return self.pool.blocks

    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> None:
        shadows, budget = [], CATCH_UP_TOKENS
        for seq, limit in zip(seqs, limits):
            shadow = self._sync(seq)
            behind = shadow.num_pending_tokens
            if behind > 1 and behind > budget:
                # Still catching up on a long prompt: a chunk now, drafts on a later step.
                if budget > 0 and self.blocks.allocate(shadow, budget):
                    self._feed([shadow], [budget], want=[0])
                budget = 0
                continue
            if not self.blocks.allocate(shadow, behind + limit - 1):
                continue  # the draft pool is full: this sequence decodes plainly this step
            budget -= behind - 1
            shadows.append((seq, shadow, limit))
        active = shadows
        first = True
        while active:
            counts = [shadow.num_pending_tokens if first else 1 for _, shadow, _ in active]
            logits = self._feed([s for _, s, _ in active], counts, want=[1] * len(active))
            tokens = mx.argmax(logits, axis=-1).tolist()
            for (seq, shadow, _), token in zip(active, tokens):
                seq.draft.append(token)
                shadow.token_ids.append(token)
            first = False
            # A shadow's last draft token is never fed: the next step's sync decides whether
            # the main model kept it.
            active = [(seq, shadow, limit) for seq, shadow, limit in active if len(seq.draft) < limit]

    def _feed(self, shadows: list[Sequence], counts: list[int], want: list[int]):
        """One ragged pass of the draft model; each shadow's computed count advances."""
        logits = self.runner.forward(shadows, counts, want)
        for shadow, n in zip(shadows, counts):
            shadow.num_computed_tokens += n
        self.passes += 1
        return logits

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of `seq`, holding KV only for tokens the main sequence has verified."""
        spec = seq.speculation
        shadow = spec.draft_state
        if shadow is None:
            shadow = spec.draft_state = Sequence(seq.request)
            shadow.token_ids = list(seq.token_ids)
            self.blocks.match_prefix(shadow)
            return shadow
        agree = 0
        limit = min(shadow.num_computed_tokens, len(seq.token_ids))
        while agree < limit and shadow.token_ids[agree] == seq.token_ids[agree]:
            agree += 1
        shadow.token_ids = list(seq.token_ids)
        shadow.num_computed_tokens = agree
        # Blocks past the agreed prefix hold rejected drafts; they were never published
        # (only synced, verified blocks are), so they go straight back.
        self.blocks.trim(shadow)
        self.blocks.cache_full_blocks(shadow)
        return shadow

    def release(self, seq: Sequence) -> None:
        """The main sequence finished or was preempted: its shadow's blocks go back."""
        spec = seq.speculation
        if spec is not None and spec.draft_state is not None:
            self.blocks.free(spec.draft_state)
            spec.draft_state = None

    def stats(self) -> dict:
        return {"draft_passes": self.passes, "draft_kv": self.blocks.stats()}
