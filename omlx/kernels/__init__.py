"""Attention over the paged KV cache."""

from .paged_attention import causal_paged_mask, gather_blocks

__all__ = ["causal_paged_mask", "gather_blocks"]
