"""Several clips in one prompt, each clip's features where its tokens are (Gemma 4).

mlx-vlm's Gemma 4 runs a prompt's clips through the audio tower as one padded batch and
scatters the flattened output over the audio tokens in order, so with clips of different
lengths the second clip's tokens take the first clip's padding rows.  Here each clip goes
through the tower alone, over its own frames (what a prompt with that one clip computes, the
case mlx-vlm gets right), and the first n rows of its features fill its n audio tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# Families whose clips are encoded one by one here when a prompt has more than one.
CLIP_WISE_FAMILIES = {"gemma4"}
FEATURE_KEYS = ("input_features", "input_features_mask")


def audio_spans(spans) -> list:
    return [span for span in spans if span.digest.startswith(b"audio:")]


def clip_wise(vlm, spans) -> bool:
    return getattr(vlm, "model_type", None) in CLIP_WISE_FAMILIES and len(audio_spans(spans)) > 1


def clip_rows(vlm, arrays: dict, spans) -> list[mx.array]:
    """Each clip's soft-token embeddings (n_i, hidden), in prompt order."""
    features, valid = arrays["input_features"], np.asarray(arrays["input_features_mask"]).astype(bool)
    out = []
    for i, span in enumerate(audio_spans(spans)):
        frames = int(valid[i].sum())
        clip = mx.array(np.asarray(features[i : i + 1, :frames], dtype=np.float32))
        encoded, _ = vlm.audio_tower(clip, mx.zeros((1, frames), dtype=mx.bool_))
        rows = vlm.embed_audio(encoded)[0]
        wanted = span.end - span.start
        # The processor counts tokens by duration (ceil(ms / 40)), the tower by frames: at some
        # lengths the tower gives one row less.  mlx-vlm's scatter then wraps round to the
        # clip's first rows; so does this, so one clip gives what a prompt with it alone gives.
        out.append(rows[mx.array(np.arange(wanted) % rows.shape[0])] if rows.shape[0] < wanted else rows[:wanted])
    return out


def merge(text: mx.array, spans, rows: list[mx.array]) -> mx.array:
    """`text` (prompt_len, hidden) with each audio span's rows replaced by its clip's rows."""
    index = np.arange(text.shape[0])
    offset = text.shape[0]
    for span, clip in zip(audio_spans(spans), rows):
        index[span.start : span.end] = offset + np.arange(span.end - span.start)
        offset += span.end - span.start
    table = mx.concatenate([text, *[r.astype(text.dtype) for r in rows]], axis=0)
    return table[mx.array(index)]
