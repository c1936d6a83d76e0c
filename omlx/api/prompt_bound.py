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

from .json_child import user_text_chars  # noqa: F401 (re-exported: the bound before rendering)

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


_facts: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_facts_by_id: dict[int, tuple[object, dict]] = {}  # tokenizers that cannot be weakly referenced
_facts_lock = threading.Lock()


def _tokenizer_fact(tokenizer, name: str, compute):
    """`compute(tokenizer)`, once per tokenizer and fact (a tokenizer never changes)."""
    with _facts_lock:
        try:
            facts = _facts.get(tokenizer)
        except TypeError:
            held = _facts_by_id.get(id(tokenizer))
            facts = held[1] if held is not None and held[0] is tokenizer else None
        if facts is not None and name in facts:
            return facts[name]
    value = compute(tokenizer)
    with _facts_lock:
        try:
            facts = _facts.setdefault(tokenizer, {})
        except TypeError:
            held = _facts_by_id.get(id(tokenizer))
            if held is None or held[0] is not tokenizer:
                held = _facts_by_id[id(tokenizer)] = (tokenizer, {})
            facts = held[1]
        facts[name] = value
    return value


def longest_token_chars(tokenizer) -> int:
    """The most characters any one token stands for (cached per tokenizer).

    Byte-level vocabularies spell each byte as one character, so an entry's length counts
    bytes, never fewer than the characters it decodes to; SentencePiece pieces are the text
    itself.  Doubled, because a normalizer may fold several characters into one before the
    vocabulary sees them (NFKC composes accents, for instance).
    """
    return _tokenizer_fact(tokenizer, "longest_token_chars", _longest_token_chars)


def _longest_token_chars(tokenizer) -> int:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    try:
        vocab = get_vocab() if get_vocab is not None else None
    except Exception:  # a tokenizer that cannot list its vocabulary: no bound from length
        vocab = None
    # Without a vocabulary, a bound no prompt reaches: only the prefix tokenization decides.
    return 2 * max((len(token) for token in vocab), default=1) if vocab else 1 << 40


# What a user says in the probe conversation of renders_user_text: text no template makes.
_PROBE_TEXT = "omlx probe: 7f3a9c user text"


def renders_user_text(tokenizer) -> bool:
    """Whether the model's chat template puts a user message's text in the prompt as it is
    (seen once, on a probe conversation): then that text's length bounds the prompt's before
    anything is rendered (user_text_chars)."""
    return _tokenizer_fact(tokenizer, "renders_user_text", _renders_user_text)


def _renders_user_text(tokenizer) -> bool:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_TEXT}],
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # no template, or one that wants more than this: no bound from it
        return False
    return isinstance(text, str) and _PROBE_TEXT in text


def lower_bound(tokenizer, text: str) -> int:
    """Tokens the text has at least, from its length alone."""
    return length_bound(tokenizer, len(text))


def length_bound(tokenizer, chars: int) -> int:
    """Tokens that `chars` characters of text are at least."""
    return math.ceil(chars / longest_token_chars(tokenizer))


def check_chars(tokenizer, text: str, window: int) -> None:
    """PromptTooLong when the text's length alone proves it leaves no room in `window`."""
    check_length(tokenizer, len(text), window)


def check_length(tokenizer, chars: int, window: int) -> None:
    """PromptTooLong when a prompt of at least `chars` characters leaves no room in `window`."""
    least = length_bound(tokenizer, chars)
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
