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
# The admin panel's shell, its static files and its login: a browser gets these before it has
# a session (they carry no data; everything they show comes from authenticated routes).
ADMIN_OPEN_PATHS = frozenset({"/admin", "/admin/", "/admin/api/login", "/admin/api/session"})
ADMIN_OPEN_PREFIX = "/admin/static/"


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path in ADMIN_OPEN_PATHS or path.startswith(ADMIN_OPEN_PREFIX)
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


def auth_middleware(current_keys: Callable[[], Mapping[str, str]], session_auth=None):
    """Middleware checking requests against `current_keys()` (read per request, so keys
    edited in settings.json apply without a restart); no keys means auth is off.
    `session_auth(request, keys)` may accept a request without a key header (the admin
    panel's session cookie): it returns the key name it stands for, or None."""

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        keys = current_keys()
        if not keys or is_open_path(request.path):
            return await handler(request)
        presented = presented_key(request)
        if presented is None and session_auth is not None:
            name = session_auth(request, keys)
            if name is not None:
                request[KEY_NAME] = name
                return await handler(request)
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
