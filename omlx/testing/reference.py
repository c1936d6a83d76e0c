"""What a request should produce: mlx-lm generating it alone, greedily, with its own cache."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import generate_step


def greedy_reference(model, prompt_ids: list[int], max_tokens: int, eos_ids, prefill_step_size: int = 2048) -> list[int]:
    """Tokens `mlx_lm` generates for the prompt alone (EOS ends it and is not included)."""
    out: list[int] = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens,
                                  prefill_step_size=prefill_step_size):
        token = int(token)
        if token in eos_ids:
            break
        out.append(token)
    return out
