"""A step in, its tokens out: the forward passes of an mlx-lm model over the paged cache.

`execute(SchedulerOutput) -> RunnerOutput` runs a step's rows - in one ragged pass when the
model's attention is routed to the cache, else in padded passes of similar lengths - and
samples or verifies their logits (pass_sampling).  `forward()` is one pass: arrays in, logits
out.  The rows are plain data: a runner that does not own the scheduler (another rank, with its
own pool) runs the same step from them alone.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from omlx.kernels.backend import attention_backend
from omlx.kernels.paged_attention import RaggedPlan, padded_tables

from .block_manager import SCRATCH_BLOCK
from .kv_cache import BatchLayout, MultiPoolLayerCache, PagedKVStorage, PagedLayerCache, install_attention_hook
from .layer_kinds import Kind, LayerKind
from .pass_sampling import sample_pass
from .sequence import FLOAT_POOL, Sequence
from .state_cache import StateLayerCache, StatePlan
from .step import KVOps, RunnerOutput, ScheduledRow, SchedulerOutput

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
    def __init__(self, model, storage: PagedKVStorage, kinds: list[LayerKind] | None = None, state=None,
                 window=None):
        """`kinds`: the kind of each of the model's cache slots (default: all full attention);
        `state`: the StateManager of a model with recurrent-state layers; `window`: the
        WindowKV holding its sliding-window layers apart (None: they are in `storage`)."""
        self.model = model
        self.storage = storage
        self.kinds = kinds
        self.state = state
        self.window = window
        self.last_state_plan: StatePlan | None = None  # the last pass's, for its snapshots
        self.block_size = storage.block_size
        self.split = _split_head(model)
        self.hooked = install_attention_hook(model)
        self.profile = None  # a StepProfile the engine sets: prepare / compute time per pass
        # Vision-language models: gives each pass's rows their input embeddings (image
        # features where a prompt has an image) and, for multimodal RoPE, their positions
        # (omlx.vision.encoder.PassInputs).  None for text models.
        self.vision = None
        # The step contract (execute): each pool's storage by index (the engine sets both of
        # a two-pool model's), the sampler, and how a row's sequence is found - the
        # scheduler's, on the rank that owns it; None on a rank that only runs the pass.
        self.pools: list[PagedKVStorage] = [storage]
        self.sampler = None
        self.resolve = None
        # A rank without the scheduler applies the step's KV operations itself (the
        # scheduler's rank has applied them where they were decided).
        self.replica = False

    @property
    def ragged(self) -> bool:
        """Whether a step's sequences, whatever their chunk lengths, share one pass."""
        return self.hooked

    # ------------------------------------------------------------------ the step
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run a step's rows and sample (or verify) the logits they want.  Without a
        `resolve` (a rank that runs the pass only) the output has no tokens."""
        rows = out.rows
        if self.replica:
            for storage, num_blocks in zip(self.pools, out.pool_blocks):
                if storage.num_blocks != num_blocks:  # the scheduler's pool grew or shrank
                    storage.grow(num_blocks) if num_blocks > storage.num_blocks else storage.shrink(num_blocks)
            if out.kv_ops:
                self.apply_kv_ops(out.kv_ops)
        result = RunnerOutput(sampled=[[] for _ in rows], logprobs=[None] * len(rows), accepted=[0] * len(rows))
        # Layer kinds whose managers key their storage by sequence (state slots, window
        # tables, image features) still need the sequence objects; the rest runs from the rows.
        bound = self.state is not None or self.window is not None or self.vision is not None
        if bound and self.resolve is None:
            raise ValueError("this model's state, window or vision layers need the scheduler's sequences")
        feed = [self.resolve(r.request_id, r.index) for r in rows] if bound else [RowView(r) for r in rows]
        for members in self._passes(rows):
            for part, pools in self._by_pool(rows, members):
                logits = self.forward([feed[k] for k in part], [rows[k].num_tokens for k in part],
                                      [rows[k].want_logits for k in part], pools)
                plan = self.last_state_plan
                result.local.append((plan, part))
                if logits is None or self.resolve is None or self.sampler is None:
                    continue
                take_back = None
                if self.state is not None:
                    take_back = lambda i, seq, keep, plan=plan: self.state.take_back(plan, i, seq, keep)  # noqa: E731
                sample_pass(self.sampler, logits, rows, part, self.resolve, result, self.profile, take_back)
        return result

    def _passes(self, rows: list[ScheduledRow]) -> list[list[int]]:
        """The forward passes of a step (row indices): one ragged pass for everything when
        the runner can (decodes and prefill chunks side by side, weights read once); else
        prefill chunks grouped by length (they are padded), then the decodes."""
        if self.ragged:
            return [list(range(len(rows)))]
        prefills = [k for k, r in enumerate(rows) if r.prefill]
        decodes = [k for k, r in enumerate(rows) if not r.prefill]
        groups = prefill_groups([(k, rows[k].num_tokens) for k in prefills])
        return [[k for k, _ in group] for group in groups] + ([decodes] if decodes else [])

    def _by_pool(self, rows: list[ScheduledRow], members: list[int]):
        """A pass's rows grouped by the pool their blocks live in: one pass for all pools
        when the model's attention is routed to the cache, else one pass per pool.
        Returns [(row indices, [(pool storage, how many consecutive rows)])]."""
        runs = [[k for k in members if rows[k].pool == index] for index in range(len(self.pools))]
        runs = [(self.pools[index], run) for index, run in enumerate(runs) if run]
        if len(runs) == 1 or not self.hooked:
            return [(run, [(storage, len(run))]) for storage, run in runs]
        return [([k for _, run in runs for k in run], [(storage, len(run)) for storage, run in runs])]

    def apply_kv_ops(self, ops: KVOps) -> None:
        """The scheduler's KV operations, on this rank's pools."""
        for pool, src, dst in ops.copies:
            self.pools[pool].copy_blocks([src], [dst])
        if ops.migrations:
            src, dst = zip(*ops.migrations)
            self.pools[0].copy_blocks_from(self.pools[FLOAT_POOL], list(src), list(dst))
        if ops.disk_loads:
            raise NotImplementedError("a rank without the scheduler has no disk tier of its own yet")

    def forward(
        self, seqs: list[Sequence], num_new_tokens: list[int], want_logits: list[int],
        pools: list[tuple[PagedKVStorage, int]] | None = None,
    ) -> mx.array | None:
        """Feed each sequence its next `num_new_tokens` tokens, store their KV in its pool,
        and return logits at the last `want_logits[i]` new tokens of each sequence (0: none;
        1: the last token's, to sample; more: a speculative draft's rows, to verify), the
        sequences' rows one after another, `(sum(want_logits), vocab)`.

        `pools`: (storage, how many rows) for consecutive runs of rows, when a pass carries
        sequences of several pools (`--quantized-kv-start`); default: all in the main pool.
        One pass serves them all when the model's attention is routed to the cache.
        """
        pools = [(storage, n) for storage, n in (pools or [(self.storage, len(seqs))]) if n]
        if len(pools) > 1 and not self.hooked:
            raise ValueError("rows of several pools share a pass only when attention is routed to the cache")
        started = time.perf_counter()
        forward = self._forward_ragged if self.ragged else self._forward_padded
        logits, written = forward(seqs, num_new_tokens, want_logits, pools)
        built = time.perf_counter()
        # Evaluating the logits evaluates every layer's pool write too (each feeds its
        # layer's attention); a pass without logits evaluates the writes alone.  State
        # layers' new states feed nothing later in the pass: they are evaluated explicitly.
        outputs = [logits] if logits is not None else written
        if self.state is not None:
            plan = self.last_state_plan
            outputs = outputs + self.state.pool.all_arrays() + [
                a for layers in plan.snapshots.values() for layer in layers for a in layer]
        mx.eval(outputs)
        if self.profile is not None:
            self.profile.add("prepare", built - started)
            self.profile.add("compute", time.perf_counter() - built)
        return logits

    def decode_pass(self, rows: list[ScheduledRow], fed: mx.array | None) -> mx.array:
        """The logits of a step of plain one-token decodes in the main pool, built but not
        evaluated (omlx.scheduler.lookahead queues it behind the step in flight).  `fed`:
        each row's input token as a lazy array (the previous step's samples, not yet read
        back), or None to feed the rows' own tokens.  Ragged runners only."""
        started = time.perf_counter()
        logits, _ = self._forward_ragged([RowView(r) for r in rows], [1] * len(rows), [1] * len(rows),
                                         [(self.storage, len(rows))], fed=fed)
        if self.profile is not None:
            self.profile.add("prepare", time.perf_counter() - started)
        return logits

    def _layer_caches(self, pools, layouts, splits, offsets: mx.array, state_plan: StatePlan | None = None,
                      window_layout: BatchLayout | None = None):
        """Each cache slot's object, in the model's order: an attention layer's reads and writes
        its pool (or splits rows among pools), a sliding-window layer's the window pool when
        it has one, a state layer's the state pool."""
        kinds = self.kinds or [LayerKind(Kind.FULL)] * pools[0][0].layout.num_layers
        caches = []
        attention = state = windowed = 0
        for kind in kinds:
            if kind.kind is Kind.STATE:
                caches.append(StateLayerCache(self.state.pool, state, state_plan))
                state += 1
                continue
            if kind.kind is Kind.WINDOW and window_layout is not None:
                caches.append(PagedLayerCache(self.window.storage, windowed, window_layout, kind))
                windowed += 1
                continue
            i = attention
            attention += 1
            if len(pools) == 1:
                caches.append(PagedLayerCache(pools[0][0], i, layouts[0], kind))
            else:
                caches.append(MultiPoolLayerCache(
                    [PagedLayerCache(storage, i, layout, kind) for (storage, _), layout in zip(pools, layouts)],
                    splits, offsets))
        return caches

    def _forward_ragged(self, seqs, num_new_tokens, want_logits, pools, fed: mx.array | None = None):
        """Every new token is a batch row of length one, with its own RoPE offset: the
        model's matmuls see `(tokens, 1, hidden)` whatever mix of decodes and prefill chunks
        the step holds, so nothing is padded and the weights are read once per step.  The
        attention hook regroups tokens by sequence (`RaggedPlan`)."""
        bs = self.block_size
        batch = len(seqs)
        kernel = attention_backend().module  # chosen once per pass, for every layer
        heads = pools[0][0].layout.num_kv_heads
        order: list[int] = []  # pass position -> index in `seqs`
        plans: list[RaggedPlan] = []
        lo = 0
        for _, count in pools:
            members = list(range(lo, lo + count))
            lo += count
            local, plan = RaggedPlan.for_sequences(
                [seqs[i].block_table for i in members], [num_new_tokens[i] for i in members],
                [seqs[i].num_computed_tokens for i in members], heads, bs, kernel,
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
            tokens[row : row + n] = seq.tokens_to_feed(start, n)
            positions[row : row + n] = span
            token_blocks[row : row + n] = np.asarray(seq.block_table, dtype=np.int32)[span // bs]
            last_row[i] = row + n - 1
            row += n
        token_offsets = positions % bs

        # Token rows of each pool's sequences are consecutive, pool after pool.
        splits, layouts, lo, first = [], [], 0, 0
        for (_, count), plan in zip(pools, plans):
            rows = int(sum(num_new_tokens[lo : lo + count]))
            part = slice(first, first + rows)
            layouts.append(BatchLayout.build_ragged(positions[part], token_blocks[part], token_offsets[part],
                                                    plan, heads, bs))
            splits.append(rows)
            lo += count
            first += rows
        state_plan = None
        if self.state is not None:
            state_plan = StatePlan.build(order, list(num_new_tokens), [s.num_computed_tokens for s in seqs],
                                         [self.state.pool.slot(s) for s in seqs], self.state.interval,
                                         frozenset(i for i, s in enumerate(seqs) if s.draft))
        self.last_state_plan = state_plan
        window_layout = None
        if self.window is not None:
            window_layout = self._window_layout(seqs, num_new_tokens, order, plans[0], positions,
                                                token_offsets, heads, bs, kernel)
        caches = self._layer_caches(pools, layouts, splits, mx.array(positions, dtype=mx.int32), state_plan,
                                    window_layout)
        written = [array for storage, _ in pools for array in storage.arrays()]
        if self.window is not None:
            written += self.window.storage.arrays()

        if fed is None:
            inputs = mx.array(tokens)[:, None]
        else:  # one token a sequence, each still being sampled by the step before (lookahead)
            if order != list(range(len(order))):
                fed = fed[mx.array(order, dtype=mx.int32)]
            inputs = fed.astype(mx.int32)[:, None]
        extra = self.vision.for_pass(seqs, order, num_new_tokens, tokens, positions) if self.vision else {}
        wanted = [np.arange(last_row[i] - m + 1, last_row[i] + 1) for i, m in enumerate(want_logits) if m]
        picks = mx.array(np.concatenate(wanted)) if wanted else None
        if self.split is not None:
            body, head = self.split
            hidden = body(inputs, cache=caches, **extra)
            logits = head(hidden[picks, 0, :]) if wanted else None
        else:
            out = self.model(inputs, cache=caches, **extra)
            logits = out[picks, 0, :] if wanted else None
        if logits is not None:
            logits = logits.astype(mx.float32)
        return logits, written

    def _window_layout(self, seqs, num_new_tokens, order, plan: RaggedPlan, positions, token_offsets,
                       heads: int, bs: int, kernel) -> BatchLayout:
        """The window pool's view of a ragged pass: its own block tables (the sequences'
        blocks mapped to window blocks), in the main plan's order and shared-prefix groups."""
        tables = self.window.prepare(seqs, num_new_tokens)
        groups = [(int(first), int(count), int(shared)) for first, count, _, shared in np.array(plan.groups)]
        padded = padded_tables([tables[i].tolist() for i in order])
        lens = np.asarray([num_new_tokens[i] for i in order], dtype=np.int32)
        starts = np.asarray([seqs[i].num_computed_tokens for i in order], dtype=np.int32)
        window_plan = RaggedPlan.build(padded, lens, starts, groups, heads, bs, kernel)
        token_blocks = np.concatenate([tables[i][np.arange(seqs[i].num_computed_tokens,
                                                           seqs[i].num_computed_tokens + num_new_tokens[i]) // bs]
                                       for i in order])
        return BatchLayout.build_ragged(positions, token_blocks, token_offsets, window_plan, heads, bs)

    def _forward_padded(self, seqs, num_new_tokens, want_logits, pools):
        """Rows right-padded to the longest chunk (models whose attention is not routed to
        the cache); padded tokens write to the scratch block.  One logits row per sequence at
        most (no speculation on this path)."""
        assert max(want_logits, default=0) <= 1, "speculative rows need the ragged pass"
        if self.vision is not None:
            raise ValueError("vision-language models run only with attention routed to the paged cache")
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
            tokens[row, :n] = seq.tokens_to_feed(start, n)
            offsets[row] = start
            table = seq.block_table
            tables[row, : len(table)] = table
            positions = np.arange(start, start + n)
            token_blocks[row, :n] = tables[row, positions // bs]
            token_offsets[row, :n] = positions % bs

        heads = pools[0][0].layout.num_kv_heads
        layouts, lo = [], 0
        for _, count in pools:
            part = slice(lo, lo + count)
            width = max(len(s.block_table) for s in seqs[part])  # trim the other parts' padding
            layouts.append(BatchLayout.build(offsets[part], token_blocks[part], token_offsets[part],
                                             tables[part, :width], heads, bs, self.hooked))
            lo += count
        caches = self._layer_caches(pools, layouts, [n for _, n in pools], mx.array(offsets, dtype=mx.int32))
        written = [array for storage, _ in pools for array in storage.arrays()]
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


class RowView:
    """What a pass reads of a sequence, from a step's row alone."""

    __slots__ = ("block_table", "num_computed_tokens", "draft", "tokens")

    def __init__(self, row: ScheduledRow):
        self.block_table = row.block_table
        self.num_computed_tokens = row.start
        self.draft = row.draft
        self.tokens = row.tokens

    def tokens_to_feed(self, start: int, n: int) -> list[int]:
        assert start == self.num_computed_tokens and n <= len(self.tokens), "a row feeds its own tokens"
        return self.tokens[:n]


def prefill_groups(prefills: list[tuple[object, int]], max_padding: float = 0.25):
    """Split prefill chunks into forward passes whose rows have similar lengths.

    Rows of one pass are padded to its longest chunk; a 500-token chunk next to a 12-token
    one would nearly double the work, while one pass per chunk would re-read the weights for
    each.  Chunks are grouped, longest first, while padding stays under `max_padding`.
    """
    groups: list[list[tuple[object, int]]] = []
    real = 0
    for key, n in sorted(prefills, key=lambda p: p[1], reverse=True):
        if groups:
            group = groups[-1]
            longest = group[0][1]
            if longest * (len(group) + 1) <= (1 + max_padding) * (real + n):
                group.append((key, n))
                real += n
                continue
        groups.append([(key, n)])
        real = n
    return groups
