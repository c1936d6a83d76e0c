"""Token log-probabilities in OpenAI's two wire shapes (chat and legacy completions).

A token's text is what its bytes decode to; a token that holds part of a multi-byte
character has no text of its own, so its exact bytes are reported too (chat's `bytes`).
"""

from __future__ import annotations

from omlx.tokenizer_seams import token_bytes

from .generation import TokenLogprob


def _token(tokenizer, token_id: int) -> tuple[str, bytes]:
    raw = token_bytes(tokenizer, token_id)
    return raw.decode("utf-8", "replace"), raw


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """`choices[i].logprobs` of a chat completion (or of one streamed chunk)."""
    content = []
    for entry in entries:
        text, raw = _token(tokenizer, entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            alt_text, alt_raw = _token(tokenizer, token_id)
            top.append({"token": alt_text, "logprob": logprob, "bytes": list(alt_raw)})
        content.append({"token": text, "logprob": entry.logprob, "bytes": list(raw), "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """`choices[i].logprobs` of a text completion: parallel lists, offsets into the text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for entry in entries:
        text, _ = _token(tokenizer, entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        # Two alternatives may decode to the same text (e.g. partial characters); the more
        # likely one is kept, as the list is most likely first.
        alternatives: dict[str, float] = {}
        for token_id, logprob in entry.top:
            alternatives.setdefault(_token(tokenizer, token_id)[0], logprob)
        top_logprobs.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
