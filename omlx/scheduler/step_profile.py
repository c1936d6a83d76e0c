"""Where an engine step's time goes, measured on every step.

Phases: `schedule` (picking the batch), `prepare` (building the pass's inputs and its lazy
MLX graph on the host), `compute` (waiting for MLX to run the graph: matmuls, attention and
every other op), `sample` (sampling, on the evaluated logits), `verify` (accepting speculative
drafts), `draft` (a draft model's batched passes), `postprocess` (applying tokens to
sequences, prefix-cache bookkeeping, events).  Everything but `compute` and `draft` is host
time that the forward pass does not hide; `/health` reports the averages per step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("schedule", "draft", "prepare", "compute", "sample", "verify", "postprocess")


@dataclass
class StepProfile:
    steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def report(self) -> dict:
        """Mean milliseconds per step by phase, and the host share of the step."""
        steps = max(self.steps, 1)
        mean = {name: round(self.seconds[name] / steps * 1e3, 3) for name in PHASES}
        total = sum(self.seconds.values())
        host = total - self.seconds["compute"] - self.seconds["draft"]
        return {"steps": self.steps, "mean_ms": mean, "host_fraction": round(host / total, 4) if total else 0.0}

    def reset(self) -> None:
        self.steps = 0
        self.seconds = dict.fromkeys(PHASES, 0.0)
