"""Real English text for agreement checks, and the float32 model's choices on it.

Several tests compare a reduced-precision form of the real SmolLM2 (packed bf16 weights,
quantized kernels, bf16 KV) with its float32 model, teacher-forced, top-1 per token.  The
float32 reference is the expensive half (~0.8 TFLOP over 3,072 tokens), and it is the same
for every form: `float32_top1` computes it once per model folder and token count and keeps
it beside the folder, so each further form costs only its own forward passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from omlx.testing.file_lock import exclusive

TOKENS = 3072
CHUNK = 512  # tokens per teacher-forced window: each window is a fresh sequence


def real_text_ids(tokenizer, tokens: int = TOKENS) -> list[int]:
    """Python's own documentation (pydoc_data, in every CPython): real English prose and code."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text[: max(40000, tokens * 16)])[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"pydoc text gave {len(ids)} tokens, fewer than {tokens}")
    return ids


def top1(model, ids: list[int], chunk: int = CHUNK) -> np.ndarray:
    """The model's argmax at every position, each `chunk` of `ids` a window of its own."""
    import mlx.core as mx

    choices = [np.array(mx.argmax(model(mx.array([ids[start:start + chunk]])), -1)[0])
               for start in range(0, len(ids), chunk)]
    return np.concatenate(choices)


def float32_top1(folder: str | Path, tokens: int = TOKENS, chunk: int = CHUNK) -> np.ndarray:
    """The float32 model's top-1 choices on `real_text_ids`, computed once per folder (cached
    in it; the write is atomic, so a concurrent reader sees the whole file or none).  Processes
    sharing the folder (pytest-xdist workers) compute it once: the others wait for the file."""
    cache = Path(folder) / f".omlx-float32-top1-{tokens}-{chunk}.npy"
    if cache.is_file():
        return np.load(cache)
    with exclusive(cache.with_name(cache.name + ".lock")):
        if cache.is_file():
            return np.load(cache)
        return _compute_float32_top1(folder, cache, tokens, chunk)


def _compute_float32_top1(folder: str | Path, cache: Path, tokens: int, chunk: int) -> np.ndarray:
    from mlx_lm import load

    from omlx.models.cpu_weights import to_float32

    reference, tokenizer = load(str(folder))
    to_float32(reference)
    choices = top1(reference, real_text_ids(tokenizer, tokens), chunk)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npy")
    np.save(partial, choices)
    os.replace(partial, cache)
    return choices


def agreement_with_float32(model, tokenizer, folder: str | Path, tokens: int = TOKENS,
                           chunk: int = CHUNK) -> int:
    """How many of the `tokens` positions `model` picks the float32 model's top-1 token at."""
    ids = real_text_ids(tokenizer, tokens)
    return int((top1(model, ids, chunk) == float32_top1(folder, tokens, chunk)).sum())
