"""What an engine reports about itself: one typed snapshot, made on its own thread.

The engine thread publishes an `EngineStats` after every step (and after it applies requests
between steps); `/health`, `/metrics`, the admin panel and the model pool read the latest one
whole, from any thread, instead of reaching into the scheduler's queues and pools while the
engine thread changes them.  Both engines (the paged one and the fallback) build it alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .step_profile import StepProfile


@dataclass
class StepCounters:
    """The engine thread's running totals (only it writes them)."""

    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    running: int = 0
    waiting: int = 0
    preemptions: int = 0
    # Admitted requests part-way through their prompts: {"request_id", "done", "total"}.
    prefilling: tuple[dict, ...] = ()
    kv_cache: dict = field(default_factory=dict)
    speculative_decoding: dict = field(default_factory=lambda: {"enabled": False})
    # The step profile's totals (a copy); `step_profile` turns them into the report when a
    # reader asks, rather than on every step.
    profile: StepProfile | None = field(default=None, compare=False, repr=False)
    # A vision-language model's encoder: tower calls and images encoded (None: text only).
    vision: dict | None = None

    @property
    def step_profile(self) -> dict | None:
        """Per-phase step timings, where measured."""
        return self.profile.report() if self.profile is not None else None

    @classmethod
    def of(cls, engine) -> EngineStats:
        """The snapshot of `engine` now (its thread: nothing moves while it is taken)."""
        scheduler = engine.scheduler
        counters = engine.counters
        speculator = scheduler.speculator
        profile = getattr(engine, "profile", None)
        inputs = getattr(engine.runner, "vision", None)
        return cls(
            steps=counters.steps,
            prefill_tokens=counters.prefill_tokens,
            generated_tokens=counters.generated_tokens,
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            preemptions=scheduler.num_preemptions,
            prefilling=tuple(engine.prefilling()),
            kv_cache=engine.kv_stats(),
            speculative_decoding=speculator.stats() if speculator is not None else {"enabled": False},
            profile=StepProfile(profile.steps, dict(profile.seconds)) if profile is not None else None,
            vision=None if inputs is None else {"tower_calls": getattr(inputs, "vision_calls", 0),
                                               "images_encoded": getattr(inputs, "images_encoded", 0)},
        )
