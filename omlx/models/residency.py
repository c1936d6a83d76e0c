"""Which models are resident, and the memory they hold under one budget.

Memory: every resident model counts its weights plus its KV pool against `memory_budget`,
in a ledger shared with the engine threads (omlx.models.memory_ledger).  Before a load, room
is made for an estimate by shrinking idle models' grown KV pools, then by unloading the least
recently used model that is idle (no lease) and not pinned.  If nothing can go, the load
fails with InsufficientMemory rather than overcommitting the machine.

Leases: a request holds its model for as long as it uses it (streaming included).  A leased
model is never evicted and never unloaded by TTL; an idle one past its TTL, or whose folder
was deleted, is unloaded by `expire_idle` / `unload_vanished`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omlx.allocator_caches import release_freed

from .memory_ledger import MemoryLedger
from .resident import Resident

log = logging.getLogger("omlx.pool")


def idle_clock() -> float:
    """The clock idle times (and so TTLs) are measured on; tests swap in a fake one."""
    return time.monotonic()


class InsufficientMemory(Exception):
    """The model does not fit in the memory budget and nothing idle can be evicted."""


class ModelBusy(Exception):
    """An explicit unload of a model that is serving requests."""


@dataclass
class Residence:
    """A resident model and its bookkeeping: bytes counted against the budget, leases held."""

    model: Resident | None
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0
    last_used: float = field(default_factory=lambda: idle_clock())
    released_bytes: int = 0  # what it held when unloaded

    @property
    def memory_bytes(self) -> int:
        """Weights plus the KV pool as it is now (pools grow while serving)."""
        return self.model.memory_bytes if self.model is not None else self.released_bytes

    @property
    def idle_s(self) -> float:
        return idle_clock() - self.last_used

    def mark_used(self) -> None:
        self.last_used = idle_clock()


class Residency:
    def __init__(self, memory_budget: int, is_pinned: Callable[[str], bool],
                 ttl_of: Callable[[str], float | None], metrics=None):
        """`metrics` (omlx.metrics.ServerMetrics) hears of evictions and unloads."""
        self.memory_budget = memory_budget
        self.ledger = MemoryLedger(memory_budget)
        self.is_pinned = is_pinned
        self.ttl_of = ttl_of
        self.metrics = metrics
        self.evictions = 0
        self._residents: dict[str, Residence] = {}
        self._admission: asyncio.Lock | None = None

    # ------------------------------------------------------------------ state
    @property
    def models(self) -> dict[str, Resident]:
        return {model_id: r.model for model_id, r in self._residents.items()}

    def get(self, model_id: str) -> Residence | None:
        return self._residents.get(model_id)

    @property
    def used_bytes(self) -> int:
        """Resident models' weights and KV pools, plus loads and unloads in progress."""
        return self.ledger.used

    def admission_lock(self) -> asyncio.Lock:
        """Held while making room and reserving it, so two loads never count the same bytes."""
        if self._admission is None:
            self._admission = asyncio.Lock()
        return self._admission

    # ------------------------------------------------------------------ leases
    def take_lease(self, model_id: str) -> Residence | None:
        """A lease on a resident model, or None if it is not resident.  No await between the
        lookup and the count: it cannot be evicted in between."""
        residence = self._residents.get(model_id)
        if residence is not None:
            residence.leases += 1
            residence.mark_used()
        return residence

    @staticmethod
    def end_lease(residence: Residence) -> None:
        residence.leases -= 1
        residence.mark_used()

    # ------------------------------------------------------------------ arrival
    def reserve(self, model_id: str, nbytes: int) -> str:
        """Count a load's estimate until it is resident (call with the admission lock, after
        `make_room`); returns the ledger key to release."""
        key = f"load:{model_id}"
        self.ledger.set(key, nbytes)
        return key

    def add(self, model_id: str, model: Resident) -> Residence:
        self.ledger.set(f"model:{model_id}", model.memory_bytes)
        residence = self._residents[model_id] = Residence(model)
        log.info("%s resident: %.1f MiB (pool %.1f / %.1f MiB)", model_id,
                 model.memory_bytes / 2**20, self.used_bytes / 2**20, self.memory_budget / 2**20)
        return residence

    def kv_budget(self, model_id: str) -> Callable[[int], bool]:
        """What a model's engine asks before its KV pool grows: room in the shared budget."""
        holder = f"model:{model_id}"

        def try_grow(nbytes: int) -> bool:
            return self.ledger.try_add(holder, nbytes)

        return try_grow

    # ------------------------------------------------------------------ making room
    async def make_room(self, needed: int, for_model: str) -> None:
        """Unload idle, unpinned models, least recently used first, until `needed` more bytes
        fit in the budget.  Call with the admission lock held."""
        if needed > self.memory_budget:
            raise InsufficientMemory(
                f"'{for_model}' needs about {gib(needed)} of memory, more than the whole model "
                f"memory budget of {gib(self.memory_budget)} (--max-model-memory)"
            )
        while self.used_bytes + needed > self.memory_budget:
            if await self._shrink_an_idle_kv_pool(for_model):
                continue  # cached prefixes go before whole models do
            idle = [(r.last_used, model_id) for model_id, r in self._residents.items()
                    if r.leases == 0 and model_id != for_model and not self.is_pinned(model_id)]
            if not idle:
                busy = [f"{m} ({'pinned' if self.is_pinned(m) else f'{r.leases} request(s)'})"
                        for m, r in sorted(self._residents.items()) if m != for_model]
                raise InsufficientMemory(
                    f"'{for_model}' needs about {gib(needed)} of memory but only "
                    f"{gib(max(0, self.memory_budget - self.used_bytes))} of the "
                    f"{gib(self.memory_budget)} budget is free, and every resident model is in "
                    f"use or pinned: {', '.join(busy) or 'none (other loads are in progress)'}. "
                    "Retry when a request finishes, or raise --max-model-memory."
                )
            _, victim = min(idle)
            log.info("evicting %s (least recently used, idle) to make room for %s", victim, for_model)
            self.evictions += 1
            if self.metrics is not None:
                self.metrics.model_evicted(victim)
            await self.unload(victim)

    async def _shrink_an_idle_kv_pool(self, for_model: str) -> bool:
        """Shrink the least recently used idle model's grown KV pool back to its initial size
        (its blocks hold only cached prefixes then); False if no pool could give anything."""
        candidates = sorted(
            (r.last_used, model_id) for model_id, r in self._residents.items()
            if r.leases == 0 and model_id != for_model and r.model.kv_pool_grown
        )
        for _, model_id in candidates:
            residence = self._residents[model_id]
            try:
                freed = await asyncio.wait_for(asyncio.wrap_future(residence.model.shrink_kv_pool()), 60)
            except Exception as exc:  # a stopped engine, or one too busy to answer
                log.warning("could not shrink %s's KV pool: %s", model_id, exc)
                continue
            if freed:
                self.ledger.reduce(f"model:{model_id}", freed)
                log.info("shrank idle %s's KV pool by %s to make room for %s", model_id, gib(freed), for_model)
                return True
        return False

    # ------------------------------------------------------------------ departure
    async def unload_idle(self, model_id: str) -> bool:
        """Unload a resident model now; False if it was not loaded.  Raises ModelBusy while
        requests are using it."""
        residence = self._residents.get(model_id)
        if residence is None:
            return False
        if residence.leases:
            raise ModelBusy(f"'{model_id}' is serving {residence.leases} request(s); unload it when they finish")
        await self.unload(model_id)
        return True

    async def unload(self, model_id: str) -> None:
        residence = self._residents.pop(model_id)
        if self.metrics is not None:
            self.metrics.model_unloading(model_id, residence.model)
        key = f"unload:{model_id}"
        # Its memory counts until the engine thread has stopped and the arrays are freed.
        residence.released_bytes = residence.memory_bytes
        self.ledger.set(key, max(residence.released_bytes, self.ledger.release(f"model:{model_id}")))
        try:
            await asyncio.to_thread(_release, residence)
        finally:
            self.ledger.release(key)
        log.info("unloaded %s", model_id)

    async def expire_idle(self) -> list[str]:
        """Unload every idle, unpinned model whose TTL has passed; returns their ids."""
        expired = []
        for model_id, residence in list(self._residents.items()):
            ttl = self.ttl_of(model_id)
            if (ttl is not None and residence.leases == 0 and residence.idle_s >= ttl
                    and not self.is_pinned(model_id) and self._residents.get(model_id) is residence):
                log.info("unloading %s: idle for %.0fs (ttl %gs)", model_id, residence.idle_s, ttl)
                async with self.admission_lock():
                    if self._residents.get(model_id) is residence and residence.leases == 0:
                        await self.unload(model_id)
                        expired.append(model_id)
        return expired

    async def unload_vanished(self) -> list[str]:
        """Unload idle models whose folder was deleted while they were loaded: requests
        naming them already get 404 (discovery no longer finds them), so the memory they hold
        would never be given back otherwise.  Requests in flight finish first (their lease)."""
        gone = []
        for model_id, residence in list(self._residents.items()):
            path = getattr(getattr(residence.model, "info", None), "path", None)
            if path is None or residence.leases or Path(path).exists():
                continue
            async with self.admission_lock():
                if self._residents.get(model_id) is residence and residence.leases == 0:
                    log.warning("the folder of %s (%s) was removed while it was loaded: unloading it",
                                model_id, path)
                    await self.unload(model_id)
                    gone.append(model_id)
        return gone

    async def unload_all(self) -> None:
        for model_id in list(self._residents):
            await self.unload(model_id)

    def shutdown(self) -> None:
        """Synchronous last resort at exit: stop every engine thread."""
        for residence in self._residents.values():
            residence.model.shutdown()
        self._residents.clear()


def _release(residence: Residence) -> None:
    """Stop the model's engine thread and give its arrays back to the allocator."""
    residence.model.shutdown()
    residence.model = None
    gc.collect()
    # To the system, not just out of MLX's cache: malloc would keep the weights' chunks.
    release_freed()


def gib(n: int) -> str:
    """A byte count for people: GiB for model-sized numbers, MiB below that."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
