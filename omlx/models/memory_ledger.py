"""Bytes held against the model memory budget, by holder, safe to use from any thread.

The model pool holds weights and load reservations here from the event loop; each engine
thread asks for room before its KV pool grows.  One lock makes "is there room? then take it"
a single step, so two engines growing at once cannot both take the last free bytes.
"""

from __future__ import annotations

import threading


class MemoryLedger:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)

    def holders(self) -> dict[str, int]:
        """What each holder holds now (the admin panel shows where the budget goes)."""
        with self._lock:
            return dict(self._held)

    def held(self, holder: str) -> int:
        with self._lock:
            return self._held.get(holder, 0)

    def set(self, holder: str, nbytes: int) -> None:
        """Record what `holder` holds, whether or not it fits (the caller made room first)."""
        with self._lock:
            self._held[holder] = nbytes

    def try_add(self, holder: str, nbytes: int) -> bool:
        """Add `nbytes` to what `holder` holds if the total stays within capacity."""
        with self._lock:
            if sum(self._held.values()) + nbytes > self.capacity:
                return False
            self._held[holder] = self._held.get(holder, 0) + nbytes
            return True

    def reduce(self, holder: str, nbytes: int) -> None:
        """`holder` gave `nbytes` back."""
        with self._lock:
            self._held[holder] = max(0, self._held.get(holder, 0) - nbytes)

    def release(self, holder: str) -> int:
        """Forget `holder`; returns what it held."""
        with self._lock:
            return self._held.pop(holder, 0)
