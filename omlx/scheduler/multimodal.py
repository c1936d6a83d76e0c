"""A prompt's images as the engine core sees them: where their tokens sit and what they are.

The API layer turns a request's images into prompt tokens (one placeholder per image feature)
and family-specific pixel arrays; the engine only needs to know, per prompt position, whether
the model's input there comes from an image, and which image.  Two uses:

- the prefix cache keys a block on the images whose tokens start in it (`block_key`), so the
  hash chain of every later block depends on the pixels too: the same image under the same
  prompt prefix hits the cache, a different image never does;
- the runner asks the vision side (`omlx.vision.encoder`) for the input embeddings of rows
  whose positions fall in an image span, and feeds every other row through the token
  embedding as usual.

Image features are computed for the whole prompt at once and kept per position, so a prefill
chunk may end anywhere, also inside an image's tokens: the next chunk reads the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageSpan:
    start: int  # first prompt position of the image's features
    end: int  # one past the last
    digest: bytes  # hash of the decoded pixels (and the size they were processed at)


@dataclass
class MultimodalInput:
    spans: list[ImageSpan]
    # Processor outputs the model's vision side consumes (numpy arrays by name: pixel_values,
    # image_grid_thw, ...); opaque to the scheduler.
    arrays: dict = field(default_factory=dict)
    # Set on the engine thread by the vision encoder, the first time a pass needs them.
    embeddings: object | None = None  # (prompt_len, hidden) mx.array; dropped once prefilled
    positions: object | None = None  # (3, prompt_len) numpy, for multimodal-RoPE models
    rope_delta: int = 0  # position of token t past the prompt: t + rope_delta

    def block_key(self, start: int, end: int) -> bytes:
        """What a KV block covering prompt positions [start, end) adds to its hash."""
        return b"".join(span.digest for span in self.spans if start <= span.start < end)

    def touches_image(self, start: int, end: int) -> bool:
        return any(span.start < end and start < span.end for span in self.spans)


def needs_vision(seq, num_new_tokens: int) -> bool:
    """Whether feeding the sequence's next `num_new_tokens` runs the vision tower: they reach
    an image whose features are not computed (the first chunk to touch an image encodes all of
    the prompt's images; a preempted prompt encodes them again)."""
    multimodal = getattr(seq.request, "multimodal", None)
    if multimodal is None or multimodal.embeddings is not None:
        return False
    start = seq.num_computed_tokens
    return start < seq.num_prompt_tokens and multimodal.touches_image(start, start + num_new_tokens)


def block_key(request, start: int, end: int) -> bytes:
    """The extra hash input of a request's block [start, end): empty for text-only requests."""
    multimodal = getattr(request, "multimodal", None)
    return multimodal.block_key(start, end) if multimodal is not None else b""
