"""What every resident model is to the pool and the server, whatever its kind.

An LLM (omlx.models.loaded.LoadedModel, which vision and OCR models are too), an embedding
model (omlx.embeddings.LoadedEmbedder) and a cross-encoder reranker
(omlx.rerank.LoadedCrossEncoder) each implement `Resident`, so the residency, /health, the
admission queue and the admin routes ask a model what they need instead of checking its
class.  A new model kind is a class implementing this plus a loader (omlx.models.loaders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .discovery import DiscoveredModel


@runtime_checkable
class Resident(Protocol):
    info: DiscoveredModel
    loaded_at: float
    # Whether it generates tokens through an engine (LoadedModel's facade: generate, check,
    # engine_stats, ...); encoders answer in one forward pass each batch.
    generates: bool

    @property
    def model_id(self) -> str: ...

    @property
    def memory_bytes(self) -> int:
        """Bytes it holds against the memory budget now (weights, plus a KV pool that grows)."""

    @property
    def queued_requests(self) -> int:
        """Requests waiting for it that the admission bound counts."""

    @property
    def kv_pool_grown(self) -> bool:
        """Whether it holds memory beyond its initial size that `shrink_kv_pool` can give back."""

    def shrink_kv_pool(self):
        """A future of the bytes freed by shrinking back to the initial size."""

    def serving_info(self) -> dict | None:
        """Which engine serves it and what that engine cannot do; None for encoders."""

    def health(self) -> dict:
        """Its line in /health."""

    def shutdown(self) -> None:
        """Stop its threads and drop its arrays (the pool frees the memory after)."""


@dataclass
class EncoderStats:
    batches: int = 0  # forward passes
    inputs: int = 0  # texts embedded, or (query, document piece) pairs scored
    tokens: int = 0


class EncoderResident:
    """The `Resident` members an encoder (embeddings, cross-encoder reranker) shares: it holds
    its weights (`weights_bytes`) and nothing that grows, no generation engine, no queue the
    admission bound counts; it reports its forward passes (`stats`, EncoderStats) in /health."""

    generates = False
    queued_requests = 0
    kv_pool_grown = False

    @property
    def model_id(self) -> str:
        return self.info.model_id  # type: ignore[attr-defined]

    @property
    def memory_bytes(self) -> int:
        return self.weights_bytes  # type: ignore[attr-defined]

    def shrink_kv_pool(self):
        raise NotImplementedError("an encoder has no KV pool")

    def serving_info(self) -> dict | None:
        return None

    def health(self) -> dict:
        stats = self.stats  # type: ignore[attr-defined]
        return {"memory_bytes": self.memory_bytes, "batches": stats.batches,  # type: ignore[attr-defined]
                "inputs": stats.inputs, "tokens": stats.tokens}
