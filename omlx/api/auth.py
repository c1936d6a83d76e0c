"""API keys: `Authorization: Bearer KEY` or `x-api-key: KEY` on every route but /health.

Keys are named (`{"default": "...", "ci-bot": "..."}`) so a key can be revoked by name and
logs can say which client called without ever printing a key.  Every configured key is
compared, in constant time, whatever matched first, so response timing says nothing about
how much of a guess was right.  A rejected request gets 401 in its route family's error
shape (omlx.api.errors): Anthropic's on /v1/messages*, OpenAI's everywhere else.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping

from aiohttp import web

from .errors import APIError

log = logging.getLogger("omlx.auth")

OPEN_PATHS = frozenset({"/health"})
# request[KEY_NAME]: which named key authenticated the request (typed key where aiohttp has them).
KEY_NAME = web.RequestKey("omlx.api_key_name", str) if hasattr(web, "RequestKey") else "omlx.api_key_name"


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def match_key(presented: str, keys: Mapping[str, str]) -> str | None:
    """The name of the key equal to `presented`, or None; compares against all of them."""
    given = presented.encode()
    matched = None
    for name, key in keys.items():
        if hmac.compare_digest(given, key.encode()) and matched is None:
            matched = name
    return matched


def unauthorized(request: web.Request, message: str) -> web.Response:
    response = APIError(message, 401, "invalid_request_error", None, "invalid_api_key").response(request.path)
    response.headers["WWW-Authenticate"] = 'Bearer realm="omlx"'
    return response


def auth_middleware(current_keys: Callable[[], Mapping[str, str]]):
    """Middleware checking requests against `current_keys()` (read per request, so keys
    edited in settings.json apply without a restart); no keys means auth is off."""

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        keys = current_keys()
        if not keys or request.path in OPEN_PATHS:
            return await handler(request)
        presented = presented_key(request)
        if presented is None:
            return unauthorized(request, "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
        name = match_key(presented, keys)
        if name is None:
            log.info("rejected a request to %s %s: unknown API key", request.method, request.path)
            return unauthorized(request, "Invalid API key.")
        request[KEY_NAME] = name
        return await handler(request)

    return require_api_key


def configured_keys(cli_key: str | None, settings_global: Mapping) -> dict[str, str]:
    """The keys in force: `--api-key` (or settings.json `api_key`) as "default", plus the
    named `api_keys` from settings.json.  Non-string or empty entries are ignored."""
    keys = {}
    named = settings_global.get("api_keys") or {}
    if isinstance(named, Mapping):
        keys.update({str(n): k for n, k in named.items() if isinstance(k, str) and k})
    default = cli_key or settings_global.get("api_key")
    if isinstance(default, str) and default:
        keys["default"] = default
    return keys
