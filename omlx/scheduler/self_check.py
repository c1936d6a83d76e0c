"""A model's first pass through the paged engine, checked against mlx-lm before serving.

The engine plugs into unmodified mlx-lm models through their cache objects and attention
function.  Most models only call `update_and_fetch`, read `offset` for RoPE and build masks
through the cache, but some do more (Llama 4 trims its chunked caches itself and builds its
chunk mask from integer offsets; others may index the cache's arrays directly).  Rather than
keep a list of such models, every model's first ragged pass - a prefill chunk and a decode side
by side - is compared with mlx-lm's own caches at load: a model that fails or disagrees is
`UnsupportedLayout`, and the fallback engine serves it instead of the requests failing later.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from omlx.models.weight_form import runs_exactly

from .layer_kinds import UnsupportedLayout
from .request import GenerationRequest
from .sequence import Sequence

PROMPTS = ([3, 14, 15, 92, 65, 35, 89], [27, 18, 28])


def check_paged_pass(engine) -> None:
    """Run PROMPTS through the engine's runner (one ragged pass, then one decode step of the
    first) and compare their last logits with mlx-lm's.  Leaves the pools as it found them."""
    model = engine.model
    vocab_ids = _in_vocab(model)
    prompts = [[vocab_ids(t) for t in p] for p in PROMPTS]
    seqs = [Sequence(GenerationRequest(f"_self_check_{i}", p, 2)) for i, p in enumerate(prompts)]
    blocks = engine.blocks
    needed = sum(-(-(s.num_tokens + 1) // blocks.block_size) for s in seqs)
    if needed > blocks.num_free_blocks:
        return  # checked only in the blocks the pool has: it must not grow for this
    try:
        for seq in seqs:
            blocks.allocate(seq, seq.num_tokens + 1)
            if engine.state is not None:
                engine.state.pool.allocate(seq)
        got = engine.runner.forward(seqs, [s.num_tokens for s in seqs], [1, 1])
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens
        follow = vocab_ids(7)
        seqs[0].token_ids.append(follow)
        got_next = engine.runner.forward(seqs[:1], [1], [1])
        want = [_last_logits(model, p) for p in prompts]
        want_next = _last_logits(model, prompts[0] + [follow])
        # float32 models agree to rounding; half precision and quantized weights within a
        # few percent of the logits' range (the ragged pass sums in another order).
        # Quantized KV changes the numbers by design: there only failures and non-finite
        # logits count.
        # Weights packed in bf16 (omlx/kernels/linear.py) round every linear layer's input to
        # bf16: the ragged pass's last-bit differences can flip one of those roundings, so
        # such a model agrees to half precision, not float32 rounding; so does one whose
        # quantized layers run through omlx/kernels/quant_linear.py (~15-bit activations).
        exact = engine.storage.layout.dtype == mx.float32 and runs_exactly(model)
        tolerance = 1e-3 if exact else 5e-2
        if engine.storage.kv_bits is not None:
            tolerance = float("inf")
        _compare(got, mx.stack(want), tolerance)
        _compare(got_next, want_next[None], tolerance)
    except UnsupportedLayout:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the paged pass cannot serve it
        raise UnsupportedLayout(f"the paged pass failed on this model ({type(exc).__name__}: {exc})") from None
    finally:
        for seq in seqs:
            # Nothing of the check is left as a cached prefix (a partial last block would be,
            # see partial_prefix): other ranks never ran it, and the pools stay as they were.
            seq.num_computed_tokens = 0
            blocks.free(seq)
            if engine.state is not None:
                engine.state.release(seq)
            if engine.window is not None:
                engine.window.release(seq)
        engine.runner.last_state_plan = None


def _in_vocab(model):
    size = _vocab_size(model)
    return lambda t: t % size if size else t


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    if size is None:
        size = getattr(getattr(args, "text_config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return 0


def _last_logits(model, prompt: list[int]) -> mx.array:
    out = model(mx.array([prompt]), cache=make_prompt_cache(model))
    return out[0, -1].astype(mx.float32)


def _compare(got: mx.array, want: mx.array, tolerance: float) -> None:
    """Whether the paged pass computes what mlx-lm does, to `tolerance` of the logits' range."""
    spread = float(mx.abs(want).max().item()) + 1.0
    worst = float(mx.abs(got - want).max().item())
    if not mx.isfinite(got).all().item() or not worst <= tolerance * spread:
        raise UnsupportedLayout(f"the paged pass disagrees with mlx-lm on this model "
                                f"(largest logit difference {worst:.3g} of {spread:.3g})")

