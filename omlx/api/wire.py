"""JSON in and out of every route, and the field checks every API family's parser shares.

Each check raises an APIError naming the offending field, so bad input becomes a 400 in the
route's own error shape (the server's middleware picks OpenAI's or Anthropic's).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from omlx.serving_limits import limits_of

from .body_spool import BodySpool, read_body
from .errors import APIError, invalid

MISSING = object()


async def read_json(request: web.Request) -> Any:
    # A client that sends its headers and then stalls (or trickles) its body is answered
    # 408 here, before it is admitted anywhere, instead of holding a handler without end.
    limits = limits_of(request.app)
    timeout = limits.client_read_timeout_s
    from .offload import PROCESS_JSON_BYTES, parse_json, parse_json_file

    # A large body goes to a file as it arrives and a worker process parses it from there:
    # neither the read nor the parse holds the event loop (omlx.api.body_spool).
    try:
        received = await asyncio.wait_for(read_body(request, limits.max_request_bytes, PROCESS_JSON_BYTES), timeout)
    except asyncio.TimeoutError:
        raise APIError(f"the request body did not arrive within {timeout:g}s", 408, "invalid_request_error",
                       None, "request_timeout", headers={"Connection": "close"}) from None
    if isinstance(received, BodySpool):
        from .json_child import TooLong
        from .prompt_limits import prompt_limits, too_long_error

        try:
            # The worker refuses a prompt that cannot fit its (loaded) model, so a hostile
            # body never comes back here (omlx.api.prompt_limits).
            limits = await prompt_limits(request)
            parsed, body = await parse_json_file(received.path, MAX_NESTING, limits)
        finally:
            received.discard()
        if not parsed and isinstance(body, TooLong):
            raise too_long_error(body, limits.field)
    else:
        if not received:
            raise invalid("the request body is empty; expected a JSON object")
        # Parsed and depth-checked in a worker process when large: off the event loop.
        parsed, body = await parse_json(received, MAX_NESTING)
    if not parsed:
        raise invalid(body)
    return body


# Deeper than any real request (tool schemas included), and far below where echoing a value
# back (orjson stops at 255 levels) or walking it recursively would fail.
MAX_NESTING = 64


def _too_deep(value: Any, limit: int) -> bool:
    from .json_child import too_deep

    return too_deep(value, limit)


def dumps(obj) -> str:
    return orjson.dumps(obj).decode()


def json_response(body, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def number(body: dict, key: str, lo: float, hi: float, default=MISSING, *, integer=False):
    """`body[key]` checked to lie in [lo, hi]; `default` (None unless given) when absent."""
    value = body.get(key)
    if value is None:
        return None if default is MISSING else default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{key}' must be {kind}, got {type(value).__name__}", key, "invalid_type")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise invalid(f"'{key}' must be an integer, got {value}", key, "invalid_type")
        value = int(value)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}", key, "invalid_value")
    return value


def boolean(body: dict, key: str, default: bool | None = False) -> bool | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean", key, "invalid_type")
    return value


def model_name(body: Any) -> str:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string", "model", "missing_required_parameter")
    return model
