"""`thinking_budget`: after N tokens inside a thinking block, force the block closed.

The state watches the sampled tokens: the think-start token opens the block (or the prompt
already opened it), the think-end token closes it.  Once N tokens have been generated inside
the block it forces the think-end tokens one by one through the sampler's mask; everywhere
else it allows every token, so a sequence pays for the mask only on the forced steps.
"""

from __future__ import annotations

import numpy as np

from .base import TokenConstraint


class ThinkingBudget:
    """Factory: the same budget for each of a request's sequences."""

    def __init__(self, budget: int, think_start: list[int], think_end: list[int], starts_inside: bool):
        if budget < 0:
            raise ValueError("the thinking budget must be >= 0")
        if not think_end:
            raise ValueError("the model has no think-end token")
        self.budget = budget
        self.think_start = list(think_start)
        self.think_end = list(think_end)
        self.starts_inside = starts_inside

    def new_state(self, max_tokens: int | None = None) -> "ThinkingBudgetState":
        return ThinkingBudgetState(self)


_BEFORE, _INSIDE, _AFTER = 0, 1, 2


class ThinkingBudgetState(TokenConstraint):
    __slots__ = ("config", "phase", "recent", "spent", "forced")

    def __init__(self, config: ThinkingBudget):
        self.config = config
        self.phase = _INSIDE if config.starts_inside else _BEFORE
        self.recent: list[int] = []  # the last few tokens, to spot multi-token markers
        self.spent = 0  # tokens generated inside the block
        self.forced = 0  # how many think-end tokens have been forced so far

    @property
    def active(self) -> bool:
        return self.phase == _INSIDE and self.spent >= self.config.budget

    def fill_bitmask(self, row: np.ndarray) -> None:
        token = self.config.think_end[self.forced]
        row.view(np.uint32)[token // 32] |= np.uint32(1 << (token % 32))

    def accept(self, token: int) -> None:
        config = self.config
        if self.phase == _AFTER:
            return
        self.recent = (self.recent + [token])[-max(len(config.think_start), len(config.think_end)) :]
        if self.phase == _BEFORE:
            if config.think_start and self.recent[-len(config.think_start) :] == config.think_start:
                self.phase = _INSIDE
            return
        if self.active:  # this token was forced
            self.forced += 1
            if self.forced == len(config.think_end):
                self.phase = _AFTER
            return
        self.spent += 1
        if self.recent[-len(config.think_end) :] == config.think_end:
            self.phase = _AFTER
