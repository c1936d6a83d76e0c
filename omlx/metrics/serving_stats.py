"""The admin panel's serving statistics: totals per model since start and all-time, recent
latency percentiles, and live throughput.

Totals come from each finished request (the same `FinishedRequest` the Prometheus counters
take).  All-time totals live in `$OMLX_HOME/stats.json` (as oMLX keeps them), rewritten
atomically at most every few seconds while requests finish, and at shutdown.  Throughput is
read from the engines' own token counters: the panel polls, and each poll's rate is taken
over the last few seconds of samples.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

from .request_timer import FinishedRequest

log = logging.getLogger("omlx.stats")

RECENT_SAMPLES = 1000  # latency samples kept per model for percentiles
RATE_WINDOW_S = 5.0
SAVE_EVERY_S = 5.0


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    prefill_seconds: float = 0.0  # TTFT of each request: prefill plus its queue wait
    decode_seconds: float = 0.0

    def add(self, done: FinishedRequest) -> None:
        self.requests += 1
        self.prompt_tokens += done.prompt_tokens
        self.cached_tokens += done.cached_tokens
        self.generation_tokens += done.generation_tokens
        if done.ttft_s is not None:
            self.prefill_seconds += max(0.0, done.ttft_s - (done.queue_s or 0.0))
        self.decode_seconds += done.decode_s

    def report(self) -> dict:
        computed = self.prompt_tokens - self.cached_tokens
        return {
            **asdict(self),
            "cache_efficiency": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "avg_prefill_tps": computed / self.prefill_seconds if self.prefill_seconds else 0.0,
            # Each request's first token comes from the prefill; the rest from decode steps.
            "avg_decode_tps": (self.generation_tokens - self.requests) / self.decode_seconds
            if self.decode_seconds else 0.0,
        }


def percentiles(samples, points=(50, 90, 99)) -> dict:
    ordered = sorted(samples)
    if not ordered:
        return {f"p{p}": None for p in points}
    return {f"p{p}": ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in points}


class ServingStats:
    def __init__(self, path: Path | None):
        self.path = path
        self.started = time.time()
        self.session: dict[str, Totals] = defaultdict(Totals)
        self.all_time: dict[str, Totals] = defaultdict(Totals)
        self.ttft: dict[str, deque] = defaultdict(lambda: deque(maxlen=RECENT_SAMPLES))
        self.itl: dict[str, deque] = defaultdict(lambda: deque(maxlen=RECENT_SAMPLES))
        self._rates: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()
        self._dirty = False
        self._saved_at = 0.0
        self._load()

    # ------------------------------------------------------------------ totals
    def request_finished(self, done: FinishedRequest) -> None:
        with self._lock:
            self.session[done.model_name].add(done)
            self.all_time[done.model_name].add(done)
            if done.ttft_s is not None:
                self.ttft[done.model_name].append(done.ttft_s)
            self.itl[done.model_name].extend(done.itl_s)
            self._dirty = True
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.save()

    def clear(self, all_time: bool = False) -> None:
        with self._lock:
            self.session.clear()
            self.ttft.clear()
            self.itl.clear()
            if all_time:
                self.all_time.clear()
            self._dirty = True
        self.save()

    def totals(self) -> dict:
        with self._lock:
            def table(by_model):
                total = Totals()
                for t in by_model.values():
                    for name in ("requests", "prompt_tokens", "cached_tokens", "generation_tokens",
                                 "prefill_seconds", "decode_seconds"):
                        setattr(total, name, getattr(total, name) + getattr(t, name))
                return {"total": total.report(), "models": {m: t.report() for m, t in sorted(by_model.items())}}

            return {"session": table(self.session), "all_time": table(self.all_time),
                    "latency": {m: {"ttft_s": percentiles(self.ttft[m]), "itl_s": percentiles(self.itl[m]),
                                    "samples": len(self.ttft[m])}
                                for m in sorted(set(self.ttft) | set(self.itl))}}

    # ------------------------------------------------------------------ live throughput
    def throughput(self, model_name: str, prefill_tokens: int, generated_tokens: int) -> dict:
        """Tokens/s over the last few seconds, from an engine's cumulative counters."""
        now = time.monotonic()
        samples = self._rates[model_name]
        if samples and (prefill_tokens < samples[-1][1] or generated_tokens < samples[-1][2]):
            samples.clear()  # the model was reloaded: its engine's counters started over
        samples.append((now, prefill_tokens, generated_tokens))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        t0, p0, g0 = samples[0]
        span = now - t0
        if span <= 0:
            return {"prefill_tps": 0.0, "decode_tps": 0.0}
        return {"prefill_tps": (prefill_tokens - p0) / span, "decode_tps": (generated_tokens - g0) / span}

    # ------------------------------------------------------------------ the stats file
    def _load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return
        fields = Totals.__dataclass_fields__
        for model, totals in (data.get("all_time") or {}).items():
            if isinstance(totals, dict):
                self.all_time[model] = Totals(**{k: v for k, v in totals.items()
                                                  if k in fields and isinstance(v, (int, float))})

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            if not self._dirty:
                return
            body = {"version": 1, "all_time": {m: asdict(t) for m, t in self.all_time.items()}}
            self._dirty = False
            self._saved_at = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)
