"""Long documents cut into pieces that fit beside the query in the model's context.

A reranker sees the query and one document at a time within a fixed number of tokens.  A
longer document is either truncated (one piece: what oMLX and sentence-transformers do) or,
with `max_chunks_per_doc`, cut into consecutive pieces that are each scored; the document
counts with its best piece.  Pieces are cut on the tokenizer's own token boundaries (its
offset mapping), so each piece re-tokenizes to about the tokens it was cut from.
"""

from __future__ import annotations


def document_pieces(tokenizer, text: str, piece_tokens: int, max_pieces: int = 1,
                    max_tokens: int | None = None) -> list[str]:
    """`text` as at most `max_pieces` pieces of at most `piece_tokens` tokens each, covering
    its first `max_tokens` tokens (all of them when None); what lies beyond is dropped.

    With one piece and no token cap the text comes back whole: the pair encoder truncates
    it, which needs no second tokenization.
    """
    if piece_tokens < 1:
        raise ValueError("a piece must hold at least one token")
    if max_pieces == 1 and max_tokens is None:
        return [text]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    limit = len(offsets) if max_tokens is None else min(len(offsets), max_tokens)
    if limit == len(offsets) and limit <= piece_tokens:
        return [text]
    pieces = []
    for start in range(0, limit, piece_tokens):
        if len(pieces) == max_pieces:
            break
        end = min(start + piece_tokens, limit)
        pieces.append(text[offsets[start][0]: offsets[end - 1][1]])
    return pieces or [""]
