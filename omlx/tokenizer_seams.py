"""The one place omlx reaches into mlx-lm's private tokenizer internals.

mlx-lm keeps its streaming detokenizer (`TokenizerWrapper._detokenizer`) and the byte-level
BPE character map (`tokenizer_utils._byte_decoder`) private.  Streaming text and exact token
bytes need both; keeping every such access here means an mlx-lm upgrade that moves them
breaks one module, with one test file to tell (tests/test_openai_api.py, tests/test_logprobs.py).
"""

from __future__ import annotations

import copy

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, _byte_decoder

_SPM_SPACE = "\u2581".encode()


def new_detokenizer(tokenizer):
    """A fresh streaming detokenizer of the kind mlx-lm chose for this tokenizer.

    mlx-lm's TokenizerWrapper builds one (with its expensive token map) and keeps it; a
    shallow copy shares the map while giving this request its own decoding state.
    """
    detokenizer = copy.copy(tokenizer._detokenizer)
    detokenizer.reset()
    if isinstance(detokenizer, BPEStreamingDetokenizer):
        # mlx-lm's BPE detokenizer drops one leading space from the first text it flushes,
        # but in byte-level BPE that space is real text, which tokenizer.decode keeps: a
        # completion of "The capital of France is" must be " Paris", not "Paris".
        detokenizer._maybe_trim_space = _keep_text
        # It also reads the byte-level character for byte 0x00 ("Ā") as "not a byte" (0 is
        # falsy) and outputs "Ā" instead of "\x00", where tokenizer.decode gives "\x00".
        detokenizer._decode_bytes = _decode_byte_level
    return detokenizer


def _keep_text(text: str) -> str:
    return text


def _byte_level_bytes(pieces: str) -> bytes:
    decoder = _byte_decoder()
    out = bytearray()
    for char in pieces:
        byte = decoder.get(char)
        # Added tokens (<think>, <|im_end|>, ...) are stored as plain text, not byte-mapped.
        out += bytes([byte]) if byte is not None else char.encode()
    return bytes(out)


def _decode_byte_level(pieces: str) -> str:
    return _byte_level_bytes(pieces).decode("utf-8", "replace")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for, read from the tokenizer's own token strings."""
    detokenizer = tokenizer._detokenizer
    tokenmap = getattr(detokenizer, "tokenmap", None)
    if tokenmap is not None and token_id < len(tokenmap):
        piece = tokenmap[token_id]
        if isinstance(detokenizer, BPEStreamingDetokenizer):
            return _byte_level_bytes(piece)
        if isinstance(detokenizer, SPMStreamingDetokenizer):
            return piece.replace(_SPM_SPACE, b" ")
    return tokenizer.decode([token_id]).encode()
