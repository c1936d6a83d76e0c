"""Rerankers: cross-encoders (a sequence-classification head on an mlx-embeddings encoder,
batched like embeddings) and LLM rerankers (yes/no odds on the LLM engine)."""

from .cross_encoder import LoadedCrossEncoder, load_cross_encoder
from .llm import LLMReranker

__all__ = ["LLMReranker", "LoadedCrossEncoder", "load_cross_encoder"]
