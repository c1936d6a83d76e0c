"""Token ids to text deltas for one request: streaming detokenization and stop strings.

Stop strings may span token boundaries, so text that could still turn out to be the start
of a stop string is held back until the next token settles it; a matched stop string and
everything after it are never sent.
"""

from __future__ import annotations

from omlx.tokenizer_seams import new_detokenizer


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
