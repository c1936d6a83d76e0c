"""Arrays in, logits out for the fallback engine: an mlx-lm model over mlx-lm's own caches.

Every sequence gets the caches `make_prompt_cache(model)` builds for it and is prefilled
alone, one chunk per step: a single sequence's caches need no padding, so a chunk may end
anywhere and any cache type works.  When its prompt is in, the sequence joins the decode
batch, as in mlx-lm's `BatchGenerator`: its caches become batch caches (`merge`: KVCache ->
BatchKVCache, RotatingKVCache -> BatchRotatingKVCache, ArraysCache and CacheList batch
themselves), appended to the batch's rows (`extend`, which left-pads the shorter rows); a
sequence that ends leaves it (`filter`).  Every step then decodes all of them in one forward
pass.

Whether a model decodes correctly that way is checked at load, not assumed: two sequences of
different lengths are decoded alone and as a batch that one joins and one leaves, and their
logits must agree.  A model whose caches have no batched form (`ConcatenateKVCache`,
`QuantizedKVCache`, `RotatingKVCache(keep>0)`, a cache type mlx-lm adds later) or that fails
that check decodes each sequence in a forward pass of its own, still every step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ChunkedKVCache, RotatingKVCache, make_prompt_cache

from .layer_kinds import UnsupportedLayout, classify_cache
from .sequence import Sequence

# Batched and lone decodes must agree to this relative error (of the logits, centered); a
# cache that the model reads wrongly in a batch (padding it does not mask, one offset for
# all rows) is off by far more, while bf16 rounding stays well under it.
PROBE_TOLERANCE = 0.05


class FallbackRunner:
    def __init__(self, model, vision=None):
        self.model = model
        # The vision side of a vision-language model (omlx.vision.encoder.PassInputs): prompt
        # chunks with images or audio take their input embeddings from it (not for
        # multimodal-RoPE families, which the engine refuses media for).
        self.vision = vision
        self.footprint, self.batch_problem = probe(model)
        # Sequences with caches of their own: prefilling, or (unbatched) decoding.
        self.caches: dict[Sequence, list] = {}
        # The sequences decoding each step, in the order of the batch caches' rows.
        self.decoding: list[Sequence] = []
        self._decoding_set: set[Sequence] = set()
        self.batch: list | None = None  # the decode batch's caches, one per cache slot

    @property
    def batched(self) -> bool:
        """Whether a step decodes every sequence in one forward pass."""
        return self.batch_problem is None

    def is_decoding(self, seq: Sequence) -> bool:
        return seq in self._decoding_set

    # ------------------------------------------------------------------ a step
    def forward(self, decodes: list[Sequence], chunks: list[tuple[Sequence, int]], profile=None):
        """Feed every decoding sequence its pending token and each prefill chunk its tokens
        (`decodes` must be `self.decoding`).  Returns the sequences that now have a token to
        sample (the decodes, then the chunks that reach their prompt's end) and their
        logits rows, evaluated, in float32."""
        started = time.perf_counter()
        pieces: list[mx.array] = []
        sampled: list[Sequence] = []
        touched: list = []  # caches written this step, evaluated with the logits
        if decodes:
            if self.batch is not None:
                tokens = mx.array([[seq.token_ids[seq.num_computed_tokens]] for seq in decodes])
                pieces.append(self._call(tokens, self.batch)[:, -1, :])
                touched += self.batch
            else:
                for seq in decodes:  # caches with no batched form: one pass each
                    cache = self.caches[seq]
                    tokens = mx.array([[seq.token_ids[seq.num_computed_tokens]]])
                    pieces.append(self._call(tokens, cache)[:, -1, :])
                    touched += cache
            sampled += decodes
        for seq, n in chunks:
            cache = self.caches.get(seq)
            if cache is None:
                cache = self.caches[seq] = make_prompt_cache(self.model)
            start = seq.num_computed_tokens
            # A prompt with images / audio: its rows' embeddings come from the towers.
            extra = self.vision.prompt_chunk(seq, start, n) if self.takes_media(seq) else {}
            out = self._call(mx.array([seq.token_ids[start : start + n]]), cache, **extra)
            touched += cache
            if start + n == seq.num_tokens:  # the prompt is in: its last row samples
                pieces.append(out[:, -1, :])
                sampled.append(seq)
        logits = mx.concatenate(pieces).astype(mx.float32) if pieces else None
        built = time.perf_counter()
        mx.eval(([logits] if logits is not None else []) + cache_arrays(touched))
        if profile is not None:
            profile.add("prepare", built - started)
            profile.add("compute", time.perf_counter() - built)
        return sampled, logits

    def takes_media(self, seq: Sequence) -> bool:
        return (self.vision is not None and seq.request.multimodal is not None
                and seq.num_computed_tokens < seq.num_prompt_tokens)

    def _call(self, tokens: mx.array, cache, **extra) -> mx.array:
        out = self.model(tokens, cache=cache, **extra)
        return getattr(out, "logits", out)  # mlx-vlm language models return an output object

    # ------------------------------------------------------------------ membership
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` continues from `parent`'s prompt (n > 1).  Batched, both join the decode
        batch in the same step and merging only reads the caches, so they share them until
        then; unbatched, the child decodes its own copy."""
        cache = self.caches[parent]
        self.caches[child] = cache if self.batched else copy.deepcopy(cache)

    def join(self, seqs: list[Sequence]) -> None:
        """Sequences whose prompt is in start decoding (from the next step)."""
        if not seqs:
            return
        self._decoding_set.update(seqs)
        if not self.batched:
            self.decoding += seqs
            return
        caches = [self.caches.pop(seq) for seq in seqs]
        merged = [type(slot).merge([cache[i] for cache in caches]) for i, slot in enumerate(caches[0])]
        if self.batch is None:
            self.batch = merged
        else:
            for batch_slot, new in zip(self.batch, merged):
                batch_slot.extend(new)
        self.decoding += seqs

    def release(self, seqs) -> None:
        """Drop these sequences' caches (finished, aborted or preempted)."""
        gone = set(seqs)
        if not gone:
            return
        for seq in gone:
            self.caches.pop(seq, None)
        if not gone & self._decoding_set:
            return
        keep = [i for i, seq in enumerate(self.decoding) if seq not in gone]
        if self.batch is not None:
            if keep:
                for slot in self.batch:
                    slot.filter(keep)
            else:
                self.batch = None
        self.decoding = [self.decoding[i] for i in keep]
        self._decoding_set -= gone

    @property
    def nbytes(self) -> int:
        """Bytes the caches hold now (the decode batch's padding included).  Read from other
        threads too: it works on copies of the containers the engine thread changes."""
        slots = list(self.batch or [])
        seen = set()
        for cache in list(self.caches.values()):
            if id(cache) not in seen:  # n > 1 siblings may share one until they join
                seen.add(id(cache))
                slots += cache
        return sum(_nbytes(slot) for slot in slots)


# ---------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Footprint:
    """One sequence's cache memory: caches that grow with its tokens, as (bytes per token,
    tokens kept at most or None, allocation step), and fixed-size state."""

    growing: tuple[tuple[float, int | None, int], ...]
    fixed: int

    def bytes_for(self, tokens: int) -> int:
        total = float(self.fixed)
        for per_token, cap, step in self.growing:
            held = -(-tokens // step) * step
            total += per_token * (min(held, cap) if cap else held)
        return int(math.ceil(total))

    def batch_bytes(self, lengths: list[int], padded: bool) -> int:
        """Caches of sequences of these lengths: in a decode batch every row is as long
        as the longest (left padding), else each holds its own."""
        if not lengths:
            return 0
        if padded:
            return len(lengths) * self.bytes_for(max(lengths))
        return sum(self.bytes_for(n) for n in lengths)

    def most_tokens(self, nbytes: int, limit: int) -> int:
        """The longest sequence (up to `limit` tokens) whose caches fit in `nbytes`."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.bytes_for(mid) <= nbytes:
                lo = mid
            else:
                hi = mid - 1
        return lo


def measure_footprint(caches: list) -> Footprint:
    """Read a sequence's footprint off caches that hold a few tokens: attention caches grow
    by their keys' and values' bytes per token (up to their window or chunk); anything else
    is counted as the fixed size it has now."""
    growing, fixed = [], 0
    for leaf in _leaves(caches):
        keys = getattr(leaf, "keys", None)
        arrays = keys if isinstance(keys, (tuple, list)) else [keys]
        if isinstance(arrays[0], mx.array) and arrays[0].ndim >= 2 and arrays[0].shape[-2]:
            cap = leaf.max_size if isinstance(leaf, RotatingKVCache) else (
                leaf.chunk_size if isinstance(leaf, ChunkedKVCache) else None)
            growing.append((_nbytes(leaf) / arrays[0].shape[-2], cap, int(getattr(leaf, "step", 1) or 1)))
        else:
            fixed += _nbytes(leaf)
    return Footprint(tuple(growing), fixed)


def _leaves(caches):
    for cache in caches:
        inner = getattr(cache, "caches", None)  # CacheList
        if isinstance(inner, (tuple, list)):
            yield from _leaves(inner)
        else:
            yield cache


def _nbytes(cache) -> int:
    try:
        return int(cache.nbytes)
    except (NotImplementedError, AttributeError, TypeError):
        return 0


def cache_arrays(caches) -> list[mx.array]:
    """The arrays of these caches' states (to evaluate them; CacheList states carry names)."""
    return [leaf for _, leaf in tree_flatten([getattr(c, "state", None) for c in caches]) if isinstance(leaf, mx.array)]


def cache_kinds(model) -> dict[str, int]:
    """How many cache slots of each kind the model has: the paged engine's labels where they
    apply ("full", "window:512"), else mlx-lm's class ("CacheList(ArraysCache, KVCache)")."""
    out: dict[str, int] = {}
    for cache in make_prompt_cache(model):
        label = _cache_label(cache)
        out[label] = out.get(label, 0) + 1
    return out


def _cache_label(cache) -> str:
    inner = getattr(cache, "caches", None)
    if isinstance(inner, (tuple, list)):
        return f"{type(cache).__name__}({', '.join(_cache_label(c) for c in inner)})"
    try:
        return classify_cache(cache).label
    except UnsupportedLayout:
        keep = getattr(cache, "keep", 0)
        return f"{type(cache).__name__}(keep={keep})" if keep else type(cache).__name__


# ---------------------------------------------------------------------------- load-time probe
def probe(model) -> tuple[Footprint, str | None]:
    """The model's footprint per sequence, and why its decodes cannot be batched (None if
    they can)."""
    caches = make_prompt_cache(model)
    model(mx.array([PROBE_PROMPTS[0]]), cache=caches)
    mx.eval(cache_arrays(caches))
    return measure_footprint(caches), batch_problem(model)


PROBE_PROMPTS = ([1, 2, 3], [4, 5, 6, 7, 8, 9, 3, 2, 1])


def batch_problem(model) -> str | None:
    """Why decoding this model's sequences as one batch would not give what decoding each
    alone gives; None when it does.  Exercises what the engine does: a batch made of one
    sequence, a second (longer) one joining it, the first leaving."""
    for cache in _leaves(make_prompt_cache(model)):
        name = type(cache).__name__
        if not callable(getattr(cache, "merge", None)):
            return f"{name} has no batched form in mlx-lm"
        if isinstance(cache, RotatingKVCache) and cache.keep:
            return f"RotatingKVCache(keep={cache.keep}) has no batched form in mlx-lm (its batch cache drops kept tokens)"
    a, b = PROBE_PROMPTS
    try:
        alone_a = _decode_alone(model, a, [10, 11])
        alone_b = _decode_alone(model, b, [10, 12])
        first, second = _prefill(model, a), _prefill(model, b)
        batch = [type(slot).merge([slot]) for slot in first]
        got = [_logits(model, [[10]], batch)]  # a alone in the batch
        for slot, new in zip(batch, [type(slot).merge([slot]) for slot in second]):
            slot.extend(new)
        both = _logits(model, [[11], [10]], batch)  # b joined
        for slot in batch:
            slot.filter([1])
        last = _logits(model, [[12]], batch)  # a left
        pairs = [(got[0][0], alone_a[0]), (both[0], alone_a[1]), (both[1], alone_b[0]), (last[0], alone_b[1])]
        error = max(_relative_error(x, y) for x, y in pairs)
    except Exception as exc:  # noqa: BLE001 - any failure means: decode one by one
        return f"batched decode failed in the load-time check ({type(exc).__name__}: {exc})"
    if not error <= PROBE_TOLERANCE:
        return f"batched decode differs from decoding alone (relative error {error:.3g})"
    return None


def _prefill(model, tokens: list[int]) -> list:
    caches = make_prompt_cache(model)
    _logits(model, [tokens], caches)
    return caches


def _decode_alone(model, prompt: list[int], tokens: list[int]) -> list[mx.array]:
    caches = _prefill(model, prompt)
    return [_logits(model, [[t]], caches)[0] for t in tokens]


def _logits(model, tokens, caches) -> mx.array:
    out = model(mx.array(tokens), cache=caches)
    out = getattr(out, "logits", out)[:, -1, :].astype(mx.float32)
    mx.eval(out, cache_arrays(caches))
    return out


def _relative_error(x: mx.array, y: mx.array) -> float:
    x, y = x - x.mean(), y - y.mean()
    return (mx.linalg.norm(x - y) / (mx.linalg.norm(y) + 1e-6)).item()
