"""A vision-language model inside the text engine: its language model as the runner's model,
and the input rows of each pass.

The engine's ragged pass feeds the language model one token per batch row.  For a VLM the
rows' inputs are embeddings, not token ids: a row at an image position of a prompt takes that
image's feature (vision tower + projector, merged the model's own way), every other row its
token embedding.  `PassInputs.for_pass` builds them for a pass, running the vision tower for
the prompts that reach an image in this pass - all of them in one call where the family's
tower takes a batch of images of different sizes (Qwen2-VL's packed patches) - and, for
multimodal RoPE (Qwen2-VL), gives every row its (time, height, width) position.
"""

from __future__ import annotations

import inspect
import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from omlx.audio import clip_features

log = logging.getLogger("omlx.vision")


class LanguageAdapter(nn.Module):
    """An mlx-vlm model's language model shaped like an mlx-lm model (`model(tokens, cache)`
    returns logits; `.model` is the decoder body, `.layers` its layers), so the KV layout
    probe, the head split and the paged attention hook treat it like any text model."""

    def __init__(self, vlm):
        super().__init__()
        self.language_model = vlm.language_model

    @property
    def model(self):
        return self.language_model.model

    @property
    def layers(self):
        return self.language_model.model.layers

    @property
    def lm_head(self):
        return self.language_model.lm_head

    @property
    def args(self):
        language = self.language_model
        return getattr(language, "args", None) or language.config

    def make_cache(self):
        """The language model's own caches (sliding windows, recurrent state...), which the
        engine reads each layer's kind from; one full-attention cache per layer otherwise."""
        make = getattr(self.language_model, "make_cache", None)
        if make is not None:
            return make()
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.layers]

    def __call__(self, inputs, cache=None, **kwargs):
        # Qwen-VL language models remember the last prompt's RoPE positions between calls
        # (for mlx-vlm's own generate loop); every call here is a fresh prompt.
        for state in ("_position_ids", "_rope_deltas"):
            if hasattr(self.language_model, state):
                setattr(self.language_model, state, None)
        out = self.language_model(inputs, cache=cache, **kwargs)
        return getattr(out, "logits", out)


def takes_position_ids(vlm) -> bool:
    """Whether the decoder body takes explicit positions (multimodal RoPE: Qwen2-VL)."""
    body = vlm.language_model.model
    return "position_ids" in inspect.signature(body.__call__).parameters and hasattr(
        vlm.language_model, "get_rope_index")


class PassInputs:
    def __init__(self, vlm):
        self.vlm = vlm
        self.language = vlm.language_model
        self.embed_tokens = vlm.language_model.model.embed_tokens
        self.mrope = takes_position_ids(vlm)
        self.image_token_id = _image_token_id(vlm.config)
        # Qwen2-VL-style towers take the patches of any number of images of any sizes in one
        # call (with their grids); other families' images go through the model one prompt
        # at a time.
        self.packed_tower = "grid_thw" in inspect.signature(vlm.vision_tower.__call__).parameters
        self.vision_calls = 0  # tower invocations (statistics, tests)
        self.images_encoded = 0
        self.audio_token_id = audio_token_id(vlm)
        self.clips_encoded = 0
        # Gemma 4's get_input_embeddings scales the text rows itself and its decoder takes
        # `inputs_embeds` as they are: the rows of a pass built here are scaled the same way.
        body = vlm.language_model.model
        self.text_scale = getattr(body, "embed_scale", None) if getattr(vlm, "model_type", "") == "gemma4" else None
        # Per-layer token embeddings (Gemma 4 E2B / E4B): mlx-vlm looks them up with every
        # image / audio position as token 0.
        self.per_layer = bool(getattr(body, "hidden_size_per_layer_input", 0)) and hasattr(body, "get_per_layer_inputs")
        self.media_token_ids = [t for t in (self.image_token_id, self.audio_token_id,
                                            getattr(vlm.config, "video_token_id", None)) if isinstance(t, int)]

    # ------------------------------------------------------------------ one pass
    def for_pass(self, seqs, order, num_new_tokens, tokens: np.ndarray, positions: np.ndarray) -> dict:
        """Keyword arguments for the decoder body: `inputs_embeds` (rows, 1, hidden) when a
        row of this pass is a prompt position of a request with images, `position_ids`
        (3, rows, 1) for multimodal RoPE.  Empty when plain token ids do."""
        chunks = []  # (seq, start, end, row) in pass order
        row = 0
        for i in order:
            seq, n = seqs[i], num_new_tokens[i]
            chunks.append((seq, seq.num_computed_tokens, seq.num_computed_tokens + n, row))
            row += n
        image_chunks = [
            (seq, start, end, first) for seq, start, end, first in chunks
            if seq.request.multimodal is not None and start < seq.num_prompt_tokens
        ]
        extra = {}
        if image_chunks:
            self._encode([seq for seq, start, end, _ in image_chunks
                          if seq.request.multimodal.embeddings is None
                          and seq.request.multimodal.touches_image(start, end)])
            extra["inputs_embeds"] = self._embeddings(chunks, tokens)
            if self.per_layer:
                ids = np.where(np.isin(tokens, self.media_token_ids), 0, tokens)
                extra["per_layer_inputs"] = self.language.model.get_per_layer_inputs(mx.array(ids)[:, None])
        if self.mrope:
            extra["position_ids"] = self._positions(chunks, positions)
        return extra

    def prompt_chunk(self, seq, start: int, n: int) -> dict:
        """Keyword arguments for one sequence's prompt chunk [start, start + n) fed alone (the
        fallback engine's prefill, over the model's own caches): its rows' input embeddings
        (1, n, hidden) and per-layer inputs where the family has them.  Runs the towers the
        first time a chunk of the prompt needs them."""
        mm = seq.request.multimodal
        if mm.embeddings is None:
            self._encode([seq])
        rows = mm.embeddings[start : start + n][None]
        extra = {"inputs_embeds": rows}
        if self.per_layer:
            ids = np.asarray(seq.token_ids[start : start + n])
            ids = np.where(np.isin(ids, self.media_token_ids), 0, ids)
            extra["per_layer_inputs"] = self.language.model.get_per_layer_inputs(mx.array(ids)[None])
        if start + n >= seq.num_prompt_tokens:
            mm.embeddings = None  # the prompt is in the caches now; recomputed if preempted
        return extra

    def _embeddings(self, chunks, tokens: np.ndarray) -> mx.array:
        text = self.embed_tokens(mx.array(tokens))
        if self.text_scale is not None:
            text = text * self.text_scale
        pieces = []
        for seq, start, end, row in chunks:
            mm = seq.request.multimodal
            prompt = seq.num_prompt_tokens
            if mm is None or mm.embeddings is None or start >= prompt:
                pieces.append(text[row : row + end - start])
                continue
            cut = min(end, prompt)
            pieces.append(mm.embeddings[start:cut].astype(text.dtype))
            if end > cut:
                pieces.append(text[row + cut - start : row + end - start])
            if cut == prompt:
                mm.embeddings = None  # the prompt is in the cache now; recomputed if preempted
        return mx.concatenate(pieces, axis=0)[:, None, :]

    def _positions(self, chunks, positions: np.ndarray) -> mx.array:
        out = np.repeat(positions[None, :].astype(np.int64), 3, axis=0)
        for seq, start, end, row in chunks:
            mm = seq.request.multimodal
            if mm is None:
                continue
            if mm.positions is None:
                self._rope_index(seq)
            prompt = seq.num_prompt_tokens
            cut = min(max(start, min(end, prompt)), end)
            if start < prompt:
                out[:, row : row + cut - start] = mm.positions[:, start:cut]
            if end > cut:
                out[:, row + cut - start : row + end - start] += mm.rope_delta
        return mx.array(out)[:, :, None]

    # ------------------------------------------------------------------ the vision tower
    def _encode(self, seqs) -> None:
        """Image features merged into each prompt's embeddings, for prompts that need them."""
        if not seqs:
            return
        if self.packed_tower and len(seqs) > 1:
            self._encode_packed(seqs)
            return
        for seq in seqs:
            mm = seq.request.multimodal
            several = clip_features.clip_wise(self.vlm, mm.spans)
            # Several clips: the text and images here, each clip's features on its own below.
            arrays = {k: mx.array(v) for k, v in mm.arrays.items()
                      if not (several and k in clip_features.FEATURE_KEYS)}
            ids = mx.array(seq.token_ids[: seq.num_prompt_tokens])[None]
            out = self.vlm.get_input_embeddings(ids, arrays.pop("pixel_values", None), **arrays)
            mm.embeddings = out.inputs_embeds[0]
            if several:
                mm.embeddings = clip_features.merge(mm.embeddings, mm.spans,
                                                    clip_features.clip_rows(self.vlm, mm.arrays, mm.spans))
            self.vision_calls += 1
            clips = sum(1 for span in mm.spans if span.digest.startswith(b"audio:"))
            self.clips_encoded += clips
            self.images_encoded += len(mm.spans) - clips

    def _encode_packed(self, seqs) -> None:
        """Every prompt's images through the tower in one call, features split back by image."""
        pixels = mx.array(np.concatenate([s.request.multimodal.arrays["pixel_values"] for s in seqs]))
        grids = np.concatenate([s.request.multimodal.arrays["image_grid_thw"] for s in seqs])
        tower = self.vlm.vision_tower
        dtype = tower.patch_embed.proj.weight.dtype
        features = tower(pixels.astype(dtype), mx.array(grids), output_hidden_states=False)
        self.vision_calls += 1
        first = 0
        for seq in seqs:
            mm = seq.request.multimodal
            count = sum(span.end - span.start for span in mm.spans)
            mm.embeddings = self._merge(seq, features[first : first + count])
            first += count
            self.images_encoded += len(mm.spans)

    def _merge(self, seq, features: mx.array) -> mx.array:
        """The prompt's token embeddings with its image positions replaced, in order, by the
        image features."""
        ids = np.asarray(seq.token_ids[: seq.num_prompt_tokens])
        text = self.embed_tokens(mx.array(ids))
        at_image = ids == self.image_token_id
        if int(at_image.sum()) != features.shape[0]:
            raise ValueError(f"{int(at_image.sum())} image tokens for {features.shape[0]} image features")
        # Row r takes the text row r, or feature k for the k-th image position.
        index = np.where(at_image, len(ids) + np.cumsum(at_image) - 1, np.arange(len(ids)))
        table = mx.concatenate([text, features.astype(text.dtype)], axis=0)
        return table[mx.array(index)]

    def _rope_index(self, seq) -> None:
        mm = seq.request.multimodal
        ids = mx.array(seq.token_ids[: seq.num_prompt_tokens])[None]
        grid = mm.arrays.get("image_grid_thw")
        position_ids, deltas = self.language.get_rope_index(ids, None if grid is None else mx.array(grid))
        mm.positions = np.array(position_ids)[:, 0, :].astype(np.int64)
        mm.rope_delta = int(np.array(deltas).reshape(-1)[0])


def _image_token_id(config) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def audio_token_id(vlm, processor=None) -> int | None:
    """The token a clip's features replace, for a model whose audio tower mlx-vlm built."""
    if getattr(vlm, "audio_tower", None) is None:
        return None
    value = getattr(vlm.config, "audio_token_id", None)
    if not isinstance(value, int):
        value = getattr(processor, "audio_token_id", None)
    return value if isinstance(value, int) else None
