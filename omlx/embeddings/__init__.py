"""Embedding models (mlx-embeddings) and the batcher that groups concurrent requests."""

from .model import LoadedEmbedder, load_embedder

__all__ = ["LoadedEmbedder", "load_embedder"]
