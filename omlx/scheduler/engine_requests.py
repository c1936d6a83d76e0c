"""What every engine does with the requests it holds, whatever keeps their caches: register a
new one as a `Sequence`, and answer, from other threads, how far each prompt is."""

from __future__ import annotations

from .request import GenerationRequest, RequestRejected
from .sequence import Sequence


class EngineRequests:
    """Mixed into an engine that has `sequences` (request id -> Sequence), `scheduler.running`
    and a `check(request)` of its own."""

    def _register(self, request: GenerationRequest) -> Sequence:
        self.check(request)
        if request.request_id in self.sequences:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        seq = Sequence(request)
        self.sequences[request.request_id] = seq
        return seq

    def prompt_progress(self, request_id: str) -> tuple[int, int] | None:
        """(prompt tokens in the cache, prompt tokens) of a request, or None when the engine
        does not know it (not added yet, or finished).  Read from other threads: two ints of
        one sequence, each current at some moment of the step."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        total = seq.num_prompt_tokens
        return min(seq.num_computed_tokens, total), total

    def prefilling(self) -> list[dict]:
        """The admitted requests part-way through their prompts: id, prompt tokens in the
        cache, prompt tokens (a snapshot from another thread: a copy of the running list)."""
        return [{"request_id": s.request_id, "done": s.num_computed_tokens, "total": s.num_prompt_tokens}
                for s in list(self.scheduler.running) if s.num_computed_tokens < s.num_prompt_tokens]
