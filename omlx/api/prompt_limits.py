"""What the JSON worker needs to refuse a large body's prompt that cannot fit its model.

A 20 MiB prompt parsed in the worker process would otherwise come back to the server whole
(tens of milliseconds of unpickling and pipe reads per body, GIL held) only to be refused
there from its length.  With the route's prompt field and each loaded model's context window,
longest token and whether its chat template renders a user's text as it is
(omlx.api.json_child.PromptLimits), the worker refuses it with the same lower bound the
server would apply (omlx.api.prompt_bound), and only the numbers come back.  A model that is
not loaded (or named by an alias) is not in the table: its prompt takes the usual path.
"""

from __future__ import annotations

from aiohttp import web

from omlx.app_keys import POOL

from .json_child import PromptLimits, TooLong
from .prompt_bound import PromptTooLong, longest_token_chars, renders_user_text

# Where each generating route's prompt is (its parameter name in that route's errors).
ROUTE_PROMPTS = {
    "/v1/chat/completions": "messages",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "messages",
    "/v1/responses": "input",
    "/v1/completions": "prompt",
}


def pool_of(app: web.Application):
    return app.get(POOL)


async def prompt_limits(request: web.Request) -> PromptLimits | None:
    """The table for this request's route, or None (a route without a prompt, no pool, no
    generating model loaded).  Built off the event loop: the first time for a model, its
    template renders once (renders_user_text)."""
    from .offload import offload

    field = ROUTE_PROMPTS.get(request.path)
    pool = pool_of(request.app) if field is not None else None
    if pool is None:
        return None
    residents = [(model_id, resident) for model_id, resident in pool.loaded.items()
                 if resident.generates and getattr(resident, "tokenizer", None) is not None]
    if not residents:
        return None
    return await offload(_limits, field, residents)


def _limits(field: str, residents: list) -> PromptLimits:
    return PromptLimits(field, {
        model_id: (resident.context_window, longest_token_chars(resident.tokenizer), renders_user_text(resident.tokenizer))
        for model_id, resident in residents
    })


def too_long_error(refused: TooLong, field: str):
    """The route's context_length_exceeded for a prompt the worker refused."""
    from .conversation import context_too_long

    return context_too_long(PromptTooLong(refused.at_least, exact=False), refused.window, field)
