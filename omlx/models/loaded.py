"""A resident LLM as the API sees it: its tokenizer, its context window, and a narrow facade
over its engine.

The API layer submits requests, checks them and reads statistics only through these methods,
never through the engine's internals (`loaded.engine.engine...`), so the scheduler can be
reorganised without touching a route.
"""

from __future__ import annotations

from dataclasses import dataclass

from omlx.scheduler import AsyncEngine, GenerationRequest

from .discovery import DiscoveredModel


@dataclass
class LoadedModel:
    """A generating model (LLM, vision-language, OCR, LLM reranker): implements
    omlx.models.resident.Resident with an engine behind it."""

    generates = True  # (a class attribute: not a dataclass field)

    info: DiscoveredModel
    tokenizer: object  # mlx_lm TokenizerWrapper
    engine: AsyncEngine
    context_window: int
    loaded_at: float
    weights_bytes: int = 0
    # A vision-language model's image side (omlx.vision.loader.VisionSide); None: text only.
    vision: object | None = None

    @property
    def takes_images(self) -> bool:
        return self.vision is not None

    @property
    def takes_audio(self) -> bool:
        return self.vision is not None and getattr(self.vision, "takes_audio", False)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def adapter_path(self) -> str | None:
        return self.info.adapter_path

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)

    # ------------------------------------------------------------------ the engine facade
    def check(self, request: GenerationRequest) -> None:
        """Raise RequestRejected if the engine could never run this request (too long for
        its KV pool or context); the engine takes a request checked here as it is."""
        self.engine.engine.check_once(request)

    def generate(self, request: GenerationRequest):
        """The request's TokenEvents (an async iterator; closing it aborts the request)."""
        return self.engine.generate(request)

    def prompt_progress(self, request_id: str) -> tuple[int, int] | None:
        """(prompt tokens prefilled, prompt tokens) of a request in flight, else None."""
        return self.engine.engine.prompt_progress(request_id)

    @property
    def queued_requests(self) -> int:
        """Requests submitted or admitted that the scheduler has not started yet."""
        return self.engine.queued_requests

    def reserve_queue_place(self, request_id: str, queue_deadline: float | None) -> None:
        self.engine.reserve(request_id, queue_deadline)

    def release_queue_place(self, request_id: str) -> None:
        self.engine.release(request_id)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pool could ever hold for one sequence, grown to its cap."""
        blocks = self.engine.engine.blocks
        return blocks.max_usable_blocks * blocks.block_size

    @property
    def kv_bytes(self) -> int:
        return self.engine.engine.kv_bytes

    @property
    def kv_pool_grown(self) -> bool:
        return self.engine.engine.pool_grown

    def shrink_kv_pool(self):
        """A future of the bytes freed by shrinking the KV pool back (on the engine thread)."""
        return self.engine.shrink_pool()

    @property
    def requests_in_flight(self) -> int:
        return self.engine.requests_in_flight

    def fail_all(self) -> None:
        """End every request in flight with the server's shutdown error (a graceful stop)."""
        self.engine.fail_all()

    def health(self) -> dict:
        """Its line in /health: the engine's statistics."""
        return self.engine_stats()

    def engine_settings(self) -> dict:
        config = self.engine.engine.config
        return {"max_num_batched_tokens": config.max_num_batched_tokens, "max_num_seqs": config.max_num_seqs}

    def serving_info(self) -> dict | None:
        """Which engine serves the model and what it cannot do ({"engine": "paged" or
        "fallback", "reason", "layer_kinds", "limits"}); None from an engine that does not say."""
        engine = self.engine.engine
        return engine.serving_info() if hasattr(engine, "serving_info") else None

    def engine_stats(self) -> dict:
        """Queue lengths, counters and KV statistics for /health: the engine's last published
        snapshot (omlx.scheduler.engine_stats), never a read of its scheduler from this thread."""
        snapshot = self.engine.engine.stats
        stats = {
            "context_window": self.context_window,
            "running": snapshot.running,
            "waiting": snapshot.waiting,
            "queued": self.queued_requests,  # waiting, plus admitted and not yet submitted
            "preemptions": snapshot.preemptions,
            "prefilling": list(snapshot.prefilling),
            "steps": snapshot.steps,
            "prefill_tokens": snapshot.prefill_tokens,
            "generated_tokens": snapshot.generated_tokens,
            "kv_cache": snapshot.kv_cache,
        }
        serving = self.serving_info()
        if serving is not None:
            stats["serving"] = serving
        stats["speculative_decoding"] = snapshot.speculative_decoding
        if snapshot.step_profile is not None:  # per-phase step timings, where measured
            stats["step_profile"] = snapshot.step_profile
        if self.adapter_path:
            stats["adapter_path"] = self.adapter_path
        stats["vision"] = self.takes_images
        if self.takes_images:
            stats["vision_stats"] = {"family": self.vision.family, "ocr": self.vision.ocr is not None,
                                     **(snapshot.vision or {"tower_calls": 0, "images_encoded": 0})}
        return stats

    @property
    def memory_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def shutdown(self) -> None:
        self.engine.shutdown()
