"""Teacher-forced top-1 agreement of a model served from paged KV pools of several dtypes with
the float32 model, over real text (tests/test_kv_bf16.py and bench/kv_dtype_bench.py).

The reference is mlx-lm's float32 model on each window of text alone.  Each candidate is the
model with its linear layers packed bf16 (omlx/kernels/linear.py), run through an `LLMEngine`
whose pool stores KV in the given dtype: every window is one sequence, prefilled in chunks so
later chunks read the earlier ones' keys and values back from the pool, and the logits of
every token are compared.  Needs a CPU with a bf16 unit and the built `_linear_cpu` kernel.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm import load

from omlx.models import packed_weights
from omlx.models.cpu_weights import to_float32
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine
from omlx.scheduler.sequence import Sequence

WINDOW = 512  # tokens each sequence holds (the existing packed-weights agreement test's windows)
CHUNK = 128  # tokens per forward pass: a window's later chunks attend to KV read from the pool


def real_text_ids(tokenizer, tokens: int) -> list[int]:
    """Python's own documentation (pydoc_data, in every CPython): real English prose and code."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text[: tokens * 16])[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"only {len(ids)} tokens of text, {tokens} asked")
    return ids


def engine_top1(engine: LLMEngine, window: list[int]) -> mx.array:
    """Greedy choices after every token of `window`, fed as one sequence in CHUNK-token passes."""
    seq = Sequence(GenerationRequest("agreement", window, max_tokens=1))
    engine.blocks.allocate(seq, len(window))
    choices = []
    try:
        for start in range(0, len(window), CHUNK):
            n = min(CHUNK, len(window) - start)
            logits = engine.runner.forward([seq], [n], [n])
            seq.num_computed_tokens += n
            choices.append(mx.argmax(logits, axis=-1))
    finally:
        engine.blocks.free(seq)
    return mx.concatenate(choices)


def agreement(folder: str, tokens: int, kv_dtypes=("float32", "bfloat16")) -> dict:
    """{"tokens", and per KV dtype: tokens whose top-1 equals the float32 model's, and the
    pool's bytes per token}."""
    reference, tokenizer = load(folder)
    to_float32(reference)
    packed, _ = load(folder)
    if packed_weights.pack_model(packed) == 0:
        raise RuntimeError("the model's layers could not be packed")
    ids = real_text_ids(tokenizer, tokens)
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids), WINDOW)]
    want = [mx.argmax(reference(mx.array([w]))[0], axis=-1) for w in windows]
    mx.eval(want)
    del reference
    out = {"tokens": len(ids)}
    for kv_dtype in kv_dtypes:
        blocks = 2 * (-(-WINDOW // 32)) + 4
        engine = LLMEngine(packed, EngineConfig(block_size=32, num_blocks=blocks, max_num_seqs=1,
                                                prefix_cache=False, speculative=False, kv_dtype=kv_dtype), 8192)
        agree = sum(int((engine_top1(engine, w) == ref).sum()) for w, ref in zip(windows, want))
        out[kv_dtype] = {"agree": agree, "kv_bytes_per_token": engine.storage.layout.bytes_per_token,
                         "served_as": engine.serving_info()["kv_dtype"]}
        engine.close()
    return out
