"""What one sampled token does to its sequence: the rules every engine applies alike.

A stop token ends the request without being output; any other token is appended, and then
the request ends when its grammar is complete, when it has `max_tokens` tokens, or when the
context window is full.  The paged scheduler and the fallback engine both emit through here,
so a request ends at the same token whichever engine serves its model.
"""

from __future__ import annotations

from .request import FinishReason, TokenEvent
from .sequence import Sequence


def emit_token(seq: Sequence, token: int, logprobs, max_model_len: int) -> TokenEvent:
    """The event for one token `seq` produced; appends it to the sequence unless it stops
    it.  A finish reason on the event means the caller must now finish the sequence."""
    event = TokenEvent(token_id=token, index=seq.index)
    if logprobs is not None:
        event.logprob, event.top_logprobs = logprobs
    if not seq.reported_cache_hit:
        event.cached_prompt_tokens = seq.cached_prompt_tokens
        event.queue_s = (seq.scheduled_at or seq.arrived_at) - seq.arrived_at
        seq.reported_cache_hit = True
    request = seq.request
    if token in request.stop_token_ids:
        event.token_id = None
        event.finish_reason = FinishReason.STOP
    else:
        seq.token_ids.append(token)
        if seq.constraint is not None and seq.constraint.finished:
            event.finish_reason = FinishReason.STOP  # its grammar is complete
        elif seq.num_output_tokens >= request.max_tokens or seq.num_tokens >= max_model_len:
            event.finish_reason = FinishReason.LENGTH
    return event
