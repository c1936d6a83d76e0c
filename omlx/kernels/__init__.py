"""Attention over the paged KV cache."""

from .paged_attention import causal_paged_mask, gather_blocks, gather_indices, write_indices

__all__ = ["causal_paged_mask", "gather_blocks", "gather_indices", "write_indices"]
