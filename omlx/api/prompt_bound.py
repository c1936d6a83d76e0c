"""Token ids of a prompt, refused as soon as it is certain the prompt cannot fit the context.

Tokenizing 20 MiB of text takes seconds; a prompt that long can never fit a context window,
and knowing so takes far less.  No token stands for more characters than the vocabulary's
longest entry, so `tokens >= chars / longest` is a lower bound that costs nothing: when even
that leaves no room, the prompt is refused untokenized.  Between that bound and the window,
a prefix of the text is tokenized first, one large enough that it should already exceed the
window at any ordinary characters-per-token rate, cut where a word ends so its tokens are
the full text's; if that prefix alone leaves no room, the rest is never tokenized.  Only a
prompt that may fit is tokenized in full, which is the work it needs anyway.

The text is the rendered chat template; `encode(text, add_special_tokens=False)` is what
`apply_chat_template(tokenize=True)` does with it.  CPU work: run it in omlx.api.offload.
"""

from __future__ import annotations

import math
import threading
import weakref

# The first prefix holds this many characters per window token: plain text runs 3-5
# characters per token, so a prefix this long that still fits means the text is unusual
# (code, digits, another script) and the next prefix grows by PREFIX_GROWTH.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_GROWTH = 4
# How far back from a prefix's end a cut looks for whitespace (a word boundary).
CUT_SEARCH_CHARS = 4096
# Tokens the cut may still have changed near the prefix's end (a pre-tokenizer rule that
# looks past whitespace), not counted toward the proof that the prompt is too long.
CUT_SLACK_TOKENS = 16


class PromptTooLong(Exception):
    """The prompt has at least `at_least` tokens (exactly that many when `exact`)."""

    def __init__(self, at_least: int, exact: bool):
        super().__init__(at_least)
        self.at_least = at_least
        self.exact = exact


_longest: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_longest_by_id: dict[int, tuple[object, int]] = {}  # tokenizers that cannot be weakly referenced
_longest_lock = threading.Lock()


def longest_token_chars(tokenizer) -> int:
    """The most characters any one token stands for (cached per tokenizer).

    Byte-level vocabularies spell each byte as one character, so an entry's length counts
    bytes, never fewer than the characters it decodes to; SentencePiece pieces are the text
    itself.  Doubled, because a normalizer may fold several characters into one before the
    vocabulary sees them (NFKC composes accents, for instance).
    """
    with _longest_lock:
        try:
            if tokenizer in _longest:
                return _longest[tokenizer]
        except TypeError:
            pass
        held = _longest_by_id.get(id(tokenizer))
        if held is not None and held[0] is tokenizer:
            return held[1]
    get_vocab = getattr(tokenizer, "get_vocab", None)
    try:
        vocab = get_vocab() if get_vocab is not None else None
    except Exception:  # a tokenizer that cannot list its vocabulary: no bound from length
        vocab = None
    # Without a vocabulary, a bound no prompt reaches: only the prefix tokenization decides.
    value = 2 * max((len(token) for token in vocab), default=1) if vocab else 1 << 40
    with _longest_lock:
        try:
            _longest[tokenizer] = value
        except TypeError:
            _longest_by_id[id(tokenizer)] = (tokenizer, value)
    return value


def lower_bound(tokenizer, text: str) -> int:
    """Tokens the text has at least, from its length alone."""
    return math.ceil(len(text) / longest_token_chars(tokenizer))


def check_chars(tokenizer, text: str, window: int) -> None:
    """PromptTooLong when the text's length alone proves it leaves no room in `window`."""
    least = lower_bound(tokenizer, text)
    if least >= window:
        raise PromptTooLong(least, exact=False)


def encode_within(tokenizer, text: str, window: int, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`, or PromptTooLong once it is certain they number `window` or more
    (a prompt must leave at least one token of the window to generate).  A rendered chat
    template holds its special tokens already; a raw completion prompt gets the tokenizer's
    (a BOS) with `add_special_tokens`."""
    check_chars(tokenizer, text, window)
    length = PREFIX_CHARS_PER_TOKEN * window
    while length < len(text):
        cut = word_cut(text, length)
        if cut is not None:
            least = len(_encode(tokenizer, text[:cut], add_special_tokens)) - CUT_SLACK_TOKENS
            if least >= window:
                raise PromptTooLong(least, exact=False)
        length *= PREFIX_GROWTH
    ids = _encode(tokenizer, text, add_special_tokens)
    if len(ids) >= window:
        raise PromptTooLong(len(ids), exact=True)
    return ids


def word_cut(text: str, length: int) -> int | None:
    """Where to end a prefix of about `length` characters: just before the last whitespace
    in the CUT_SEARCH_CHARS before it, so no word is cut in two.  None when there is none:
    a prefix ending inside a word can have more tokens than that stretch of the whole text,
    so it proves nothing."""
    start = max(0, length - CUT_SEARCH_CHARS)
    for position in range(length, start, -1):
        if text[position - 1].isspace():
            return position - 1
    return None


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(ids)
