"""What every engine does with the requests it holds, whatever keeps their caches: register a
new one as a `Sequence`, and answer, from other threads, how far each prompt is."""

from __future__ import annotations

import weakref

from .parallel_sampling import request_finished, request_sequences
from .request import FinishReason, GenerationRequest, RequestRejected, TokenEvent
from .sequence import Sequence


class EngineRequests:
    """Mixed into an engine that has `sequences` (request id -> Sequence), `scheduler.running`,
    `_stepping` (the request ids of the step being run, or None), a `check(request)` and an
    `_end(sequences, reason)` of its own."""

    def check_once(self, request: GenerationRequest) -> None:
        """`check(request)` (RequestRejected if this engine could never serve it), unless this
        engine already found it fits: the API layer checks a request when it builds it, to
        answer a 400 before anything is queued, and add_request then takes it as checked.  A
        request nobody checked (a bench, the distributed rank loop, a test) is checked here."""
        checked_by = request.checked_by
        if checked_by is not None and checked_by() is self:
            return
        self.check(request)
        request.checked_by = weakref.ref(self)

    def _register(self, request: GenerationRequest) -> Sequence:
        self.check_once(request)
        if request.request_id in self.sequences:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        seq = Sequence(request)
        self.sequences[request.request_id] = seq
        return seq

    def abort(self, request_id: str) -> TokenEvent | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None or request_finished(seq):
            return None
        self._end(request_sequences(seq), FinishReason.ABORT)  # every completion of an n > 1 request
        return TokenEvent(token_id=None, finish_reason=FinishReason.ABORT)

    def fail_step(self, message: str) -> list[tuple[str, TokenEvent]]:
        """After a step failed (an allocation MLX could not make): end the requests that were
        in it, releasing their caches; requests still waiting for their turn wait on.  A
        failure while scheduling (no batch yet) ends them all."""
        if self._stepping is None:
            return self.fail_all(message)
        stepping, self._stepping = sorted(self._stepping), None
        return self._fail(stepping, message)

    def fail_all(self, message: str) -> list[tuple[str, TokenEvent]]:
        """After an internal error: end every request with an error, releasing its caches."""
        return self._fail(list(self.sequences), message)

    def _fail(self, request_ids, message: str, code: str | None = None) -> list[tuple[str, TokenEvent]]:
        """End these requests (those the engine still has) with an error, every completion of
        each."""
        out = []
        for request_id in request_ids:
            seq = self.sequences.pop(request_id, None)
            if seq is None:
                continue
            self._end(request_sequences(seq), FinishReason.ERROR)
            out.append((request_id, TokenEvent(None, FinishReason.ERROR, error=message, error_code=code)))
        return out

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
