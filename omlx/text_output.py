"""Token ids to text deltas for one request: streaming detokenization and stop strings.

Stop strings may span token boundaries, so text that could still turn out to be the start
of a stop string is held back until the next token settles it; a matched stop string and
everything after it are never sent.
"""

from __future__ import annotations

import copy

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder


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


def _decode_byte_level(pieces: str) -> str:
    decoder = _byte_decoder()
    out = bytearray()
    for char in pieces:
        byte = decoder.get(char)
        # Added tokens (<think>, ...) are stored as plain text, not byte-mapped.
        out += bytes([byte]) if byte is not None else char.encode()
    return out.decode("utf-8", "replace")


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self._detokenizer = new_detokenizer(tokenizer)
        self._stop = [s for s in (stop or []) if s]
        self._text = ""  # everything decoded so far
        self._sent = 0  # how much of _text has been handed out
        self.stopped = False  # a stop string matched; the request should end
        self.matched_stop: str | None = None  # which one (Anthropic reports it)

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return the text now safe to send."""
        if self.stopped:
            return ""
        self._detokenizer.add_token(token_id)
        self._text += self._detokenizer.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: flush whatever is still held back."""
        if self.stopped:
            return ""
        self._detokenizer.finalize()
        self._text += self._detokenizer.last_segment
        return self._release(final=True)

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def _release(self, final: bool) -> str:
        text, start = self._text, self._sent
        if self._stop:
            longest = max(len(s) for s in self._stop)
            search_from = max(0, start - longest + 1)
            hits = [(i, s) for s in self._stop if (i := text.find(s, search_from)) >= 0]
            if hits:
                first, self.matched_stop = min(hits, key=lambda hit: hit[0])
                end = max(first, start)
                self.stopped = True
                self._text = text[:end]
                self._sent = end
                return text[start:end]
            if not final:
                end = len(text) - self._held_back(text, start)
                self._sent = max(end, start)
                return text[start : self._sent]
        self._sent = len(text)
        return text[start:]

    def _held_back(self, text: str, start: int) -> int:
        """Length of the longest unsent tail of `text` that begins some stop string."""
        for size in range(min(len(text) - start, max(len(s) for s in self._stop) - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
