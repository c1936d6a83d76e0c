"""What each layer of a model keeps between tokens, read from the caches mlx-lm builds for it.

A model's `make_cache()` (or mlx-lm's default, one `KVCache` per layer) says what its layers
need: full attention (`KVCache`), attention over a sliding window (`RotatingKVCache`) or within
fixed chunks (`ChunkedKVCache`), or a fixed-size recurrent / convolution state (`ArraysCache`:
Gated DeltaNet, Mamba, short convolutions).  The engine classifies every cache slot once at
load and gives each kind its storage: the attention kinds share the paged KV pool (the window
or chunk is applied by attention), state layers get a slot pool (omlx.scheduler.state_cache).

Anything else (`CacheList`, `ConcatenateKVCache`, a kind a later mlx-lm adds) is
`UnsupportedLayout`: the model is then served by the fallback engine over mlx-lm's own caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mlx_lm.models.cache import ArraysCache, ChunkedKVCache, KVCache, RotatingKVCache, make_prompt_cache


class UnsupportedLayout(ValueError):
    """The paged engine cannot hold this model's caches (the fallback engine serves it)."""


class Kind(Enum):
    FULL = "full"  # attention over every earlier token
    WINDOW = "window"  # attention over the last `span` tokens (the query's own included)
    CHUNK = "chunk"  # attention within the query's aligned chunk of `span` tokens
    STATE = "state"  # fixed-size per-sequence arrays (recurrent / convolution state)

    @property
    def attends(self) -> bool:
        return self is not Kind.STATE


@dataclass(frozen=True)
class LayerKind:
    kind: Kind
    span: int = 0  # the window or chunk size (WINDOW / CHUNK)
    size: int = 0  # how many arrays a STATE layer keeps

    @property
    def label(self) -> str:
        return f"{self.kind.value}:{self.span}" if self.span else self.kind.value


# mlx-vlm's language models build caches of its own classes, with the same meaning.
_VLM_CACHES = "mlx_vlm.models.cache"


def _is(cache, cls) -> bool:
    kind = type(cache)
    return kind is cls or (kind.__module__ == _VLM_CACHES and kind.__name__ == cls.__name__)


def classify_cache(cache) -> LayerKind:
    """The kind of one cache object from mlx-lm or mlx-vlm (ArraysCache subclasses count as
    state; other subclasses, which may change what the cache keeps, are not guessed at)."""
    if _is(cache, KVCache):
        return LayerKind(Kind.FULL)
    if _is(cache, RotatingKVCache):
        if cache.keep:
            # Tokens kept at the front of the window: not a plain window; no model in mlx-lm
            # 0.32 asks for it, so it is left to the fallback engine rather than guessed.
            raise UnsupportedLayout(f"RotatingKVCache(keep={cache.keep})")
        return LayerKind(Kind.WINDOW, span=int(cache.max_size))
    if _is(cache, ChunkedKVCache):
        return LayerKind(Kind.CHUNK, span=int(cache.chunk_size))
    if isinstance(cache, ArraysCache) or any(
            c.__module__ == _VLM_CACHES and c.__name__ == "ArraysCache" for c in type(cache).__mro__):
        return LayerKind(Kind.STATE, size=len(cache.cache))
    raise UnsupportedLayout(type(cache).__name__)


def layer_kinds(model) -> list[LayerKind]:
    """Every cache slot's kind, in the order the model takes its caches."""
    caches = make_prompt_cache(model)
    unsupported = []
    kinds = []
    for cache in caches:
        try:
            kinds.append(classify_cache(cache))
        except UnsupportedLayout as exc:
            unsupported.append(str(exc))
    if unsupported:
        raise UnsupportedLayout("the paged engine does not hold " + ", ".join(sorted(set(unsupported))))
    return kinds


def describe(kinds: list[LayerKind]) -> dict[str, int]:
    """How many layers of each kind ({"full": 4, "window:512": 20, "state": 18})."""
    out: dict[str, int] = {}
    for kind in kinds:
        out[kind.label] = out.get(kind.label, 0) + 1
    return out
