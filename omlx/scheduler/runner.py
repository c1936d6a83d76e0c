"""Arrays in, logits out: one batched forward pass of an mlx-lm model over the paged cache."""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .block_manager import SCRATCH_BLOCK
from omlx.kernels.backend import attention_backend
from omlx.kernels.paged_attention import RaggedPlan

from .kv_cache import BatchLayout, PagedKVStorage, PagedLayerCache, TwoPoolLayerCache, install_attention_hook
from .sequence import Sequence

log = logging.getLogger("omlx.runner")


def _split_head(model):
    """Return (body, head) when `model(x) == head(body(x))`, else None.

    Running the body alone lets a prefill chunk skip the vocabulary projection for every
    position but the last, which matters: for a 200M model with a 32k vocabulary the head
    is a fifth of the prefill FLOPs.  The split is checked numerically, not assumed.
    """
    body = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if body is None or args is None:
        return None
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        embed = getattr(body, "embed_tokens", None)
        if embed is None or not hasattr(embed, "as_linear"):
            return None
        head = embed.as_linear
    else:
        head = model.lm_head
    try:
        tokens = mx.array([[1, 2, 3, 4]])
        full = model(tokens, cache=make_prompt_cache(model))
        split = head(body(tokens, cache=make_prompt_cache(model)))
        if full.shape != split.shape or not mx.allclose(full, split, atol=1e-4).item():
            return None
    except Exception as exc:  # any model that does not fit the pattern runs whole
        log.debug("model head split not available: %s", exc)
        return None
    return body, head


class ModelRunner:
    def __init__(self, model, storage: PagedKVStorage):
        self.model = model
        self.storage = storage
        self.block_size = storage.block_size
        self.split = _split_head(model)
        self.hooked = install_attention_hook(model)
        self.profile = None  # a StepProfile the engine sets: prepare / compute time per pass

    @property
    def ragged(self) -> bool:
        """Whether a step's sequences, whatever their chunk lengths, share one pass."""
        return self.hooked

    def forward(
        self, seqs: list[Sequence], num_new_tokens: list[int], want_logits: list[bool],
        storage: PagedKVStorage | None = None, float_storage: PagedKVStorage | None = None,
        float_rows: int = 0,
    ) -> mx.array | None:
        """Feed each sequence its next `num_new_tokens` tokens, store their KV in the pool,
        and return logits `(n, vocab)` at the last new token of the rows in `want_logits`.

        With `float_rows` (`--quantized-kv-start`, a hooked model), the first `float_rows`
        rows keep their KV in `float_storage`, the rest in `storage`: one pass, two pools.
        """
        if storage is None:  # else the engine's float pool, for its float rows
            storage = self.storage
        started = time.perf_counter()
        forward = self._forward_ragged if self.ragged else self._forward_padded
        logits, written = forward(seqs, num_new_tokens, want_logits, storage, float_storage, float_rows)
        built = time.perf_counter()
        # Evaluating the logits evaluates every layer's pool write too (each feeds its
        # layer's attention); a pass without logits evaluates the writes alone.
        mx.eval(logits if logits is not None else written)
        if self.profile is not None:
            self.profile.add("prepare", built - started)
            self.profile.add("compute", time.perf_counter() - built)
        return logits

    def _forward_ragged(self, seqs, num_new_tokens, want_logits, storage, float_storage, float_rows):
        """Every new token is a batch row of length one, with its own RoPE offset: the
        model's matmuls see `(tokens, 1, hidden)` whatever mix of decodes and prefill chunks
        the step holds, so nothing is padded and the weights are read once per step.  The
        attention hook regroups tokens by sequence (`RaggedPlan`)."""
        bs = self.block_size
        batch = len(seqs)
        fused = attention_backend().fused
        heads = storage.layout.num_kv_heads
        parts = [(0, float_rows), (float_rows, batch)] if 0 < float_rows < batch else [(0, batch)]
        order: list[int] = []  # pass position -> index in `seqs`
        plans: list[RaggedPlan] = []
        for lo, hi in parts:
            members = list(range(lo, hi))
            local, plan = RaggedPlan.for_sequences(
                [seqs[i].block_table for i in members], [num_new_tokens[i] for i in members],
                [seqs[i].num_computed_tokens for i in members], heads, bs, fused,
            )
            plans.append(plan)
            order += [members[r] for r in local]

        total = sum(num_new_tokens)
        tokens = np.empty(total, dtype=np.int32)
        positions = np.empty(total, dtype=np.int32)
        token_blocks = np.empty(total, dtype=np.int32)
        last_row = np.empty(batch, dtype=np.int64)  # each sequence's last token row
        row = 0
        for i in order:
            seq, n = seqs[i], num_new_tokens[i]
            start = seq.num_computed_tokens
            span = np.arange(start, start + n)
            tokens[row : row + n] = seq.token_ids[start : start + n]
            positions[row : row + n] = span
            token_blocks[row : row + n] = np.asarray(seq.block_table, dtype=np.int32)[span // bs]
            last_row[i] = row + n - 1
            row += n
        token_offsets = positions % bs

        num_layers = storage.layout.num_layers
        if len(parts) == 2:
            split = int(sum(num_new_tokens[:float_rows]))
            layouts = [
                BatchLayout.build_ragged(positions[a:b], token_blocks[a:b], token_offsets[a:b], plan, heads, bs)
                for (a, b), plan in zip(((0, split), (split, total)), plans)
            ]
            all_positions = mx.array(positions, dtype=mx.int32)
            caches = [
                TwoPoolLayerCache(PagedLayerCache(float_storage, i, layouts[0]), PagedLayerCache(storage, i, layouts[1]),
                                  split, all_positions)
                for i in range(num_layers)
            ]
            written = float_storage.arrays() + storage.arrays()
        else:
            layout = BatchLayout.build_ragged(positions, token_blocks, token_offsets, plans[0], heads, bs)
            caches = [PagedLayerCache(storage, i, layout) for i in range(num_layers)]
            written = storage.arrays()

        inputs = mx.array(tokens)[:, None]
        wanted = [r for r, want in enumerate(want_logits) if want]
        picks = mx.array(last_row[wanted]) if wanted else None
        if self.split is not None:
            body, head = self.split
            hidden = body(inputs, cache=caches)
            logits = head(hidden[picks, 0, :]) if wanted else None
        else:
            out = self.model(inputs, cache=caches)
            logits = out[picks, 0, :] if wanted else None
        if logits is not None:
            logits = logits.astype(mx.float32)
        return logits, written

    def _forward_padded(self, seqs, num_new_tokens, want_logits, storage, float_storage, float_rows):
        """Rows right-padded to the longest chunk (models whose attention is not routed to
        the cache); padded tokens write to the scratch block."""
        bs = self.block_size
        batch = len(seqs)
        length = max(num_new_tokens)
        tokens = np.zeros((batch, length), dtype=np.int32)
        # Padded positions write to the scratch block.
        token_blocks = np.full((batch, length), SCRATCH_BLOCK, dtype=np.int32)
        token_offsets = np.zeros((batch, length), dtype=np.int32)
        offsets = np.zeros(batch, dtype=np.int32)
        num_table_blocks = max(len(s.block_table) for s in seqs)
        tables = np.full((batch, num_table_blocks), SCRATCH_BLOCK, dtype=np.int32)
        for row, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
            start = seq.num_computed_tokens
            tokens[row, :n] = seq.token_ids[start : start + n]
            offsets[row] = start
            table = seq.block_table
            tables[row, : len(table)] = table
            positions = np.arange(start, start + n)
            token_blocks[row, :n] = tables[row, positions // bs]
            token_offsets[row, :n] = positions % bs

        heads = storage.layout.num_kv_heads
        num_layers = storage.layout.num_layers
        if 0 < float_rows < batch:
            assert self.hooked, "rows of two pools share a pass only when attention is routed to the cache"
            parts = []
            for rows_of in (slice(0, float_rows), slice(float_rows, batch)):
                width = max(len(s.block_table) for s in seqs[rows_of])  # trim the other part's padding
                parts.append(BatchLayout.build(offsets[rows_of], token_blocks[rows_of], token_offsets[rows_of],
                                               tables[rows_of, :width], heads, bs, True))
            all_offsets = mx.array(offsets, dtype=mx.int32)
            caches = [
                TwoPoolLayerCache(PagedLayerCache(float_storage, i, parts[0]), PagedLayerCache(storage, i, parts[1]),
                                  float_rows, all_offsets)
                for i in range(num_layers)
            ]
            written = float_storage.arrays() + storage.arrays()
        else:
            layout = BatchLayout.build(offsets, token_blocks, token_offsets, tables, heads, bs, self.hooked)
            caches = [PagedLayerCache(storage, i, layout) for i in range(num_layers)]
            written = storage.arrays()
        inputs = mx.array(tokens)
        rows = [r for r, want in enumerate(want_logits) if want]
        if self.split is not None:
            body, head = self.split
            hidden = body(inputs, cache=caches)
            logits = head(self._last_positions(hidden, rows, num_new_tokens)) if rows else None
        else:
            out = self.model(inputs, cache=caches)
            logits = self._last_positions(out, rows, num_new_tokens) if rows else None
        if logits is not None:
            logits = logits.astype(mx.float32)
        return logits, written

    @staticmethod
    def _last_positions(x: mx.array, rows: list[int], num_new_tokens: list[int]) -> mx.array:
        if x.shape[1] == 1:
            picked = x[:, 0, :]
            return picked if len(rows) == x.shape[0] else picked[mx.array(rows)]
        cols = [num_new_tokens[r] - 1 for r in rows]
        return x[mx.array(rows), mx.array(cols)]

