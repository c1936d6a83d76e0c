"""What the sampler needs from a constraint, and the batched allowed-token mask."""

from __future__ import annotations

import numpy as np


class TokenConstraint:
    """One sequence's constraint state: the tokens it allows now, advanced token by token."""

    # Words of 32 token bits this state writes (its tokenizer's vocabulary, rounded up);
    # may exceed the model's logits width, never matters when smaller.
    num_words: int = 0

    @property
    def active(self) -> bool:
        """False when every token is allowed at this step (no mask needed)."""
        return True

    @property
    def finished(self) -> bool:
        """The constraint is satisfied and allows nothing more: the sequence should end."""
        return False

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Set the bits of the allowed tokens in `row` (int32 words, zeroed, bit i of word
        w is token 32*w + i)."""
        raise NotImplementedError

    def accept(self, token: int) -> None:
        """The sampler picked `token` for this sequence."""
        raise NotImplementedError

    @classmethod
    def fill_bitmasks(cls, states: list["TokenConstraint"], bitmask: np.ndarray, rows: list[int]) -> None:
        """Fill `bitmask[rows[i]]` for `states[i]`; subclasses batch this where they can."""
        for state, row in zip(states, rows):
            state.fill_bitmask(bitmask[row])


def allowed_tokens(states: list[TokenConstraint], vocab: int) -> np.ndarray:
    """Boolean `(len(states), vocab)` mask of the tokens each state allows now."""
    words = max([(vocab + 31) // 32] + [s.num_words for s in states])
    bitmask = np.zeros((len(states), words), dtype=np.int32)
    by_kind: dict[type, list[int]] = {}
    for i, state in enumerate(states):
        by_kind.setdefault(type(state), []).append(i)
    for kind, rows in by_kind.items():
        kind.fill_bitmasks([states[r] for r in rows], bitmask, rows)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return bits.view(bool)
