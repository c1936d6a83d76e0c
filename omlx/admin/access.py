"""Who may use the admin panel: logging in with the API key, and requests under its session."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from omlx.api.auth import match_key
from omlx.api.errors import APIError

from .session import COOKIE, CSRF_HEADER, OPEN_SESSION, Sessions

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def login_keys(keys: Mapping[str, str]) -> dict[str, str]:
    """Keys that may open a session: the main key (as in oMLX, named keys are for the API
    only); every key when only named ones are configured."""
    return {"default": keys["default"]} if "default" in keys else dict(keys)


def csrf_failure() -> APIError:
    return APIError(f"this request changes state and needs the panel's {CSRF_HEADER} header", 403,
                    "invalid_request_error", None, "csrf_failed")


class AdminAccess:
    def __init__(self, sessions: Sessions):
        self.sessions = sessions

    def login(self, presented: str, keys: Mapping[str, str]) -> str | None:
        """A new session cookie if `presented` is a key that may log in."""
        allowed = login_keys(keys)
        name = match_key(presented, allowed)
        return None if name is None else self.sessions.issue(allowed[name])

    def session_of(self, request: web.Request, keys: Mapping[str, str]) -> str | None:
        """The request's valid session cookie, or None; OPEN_SESSION on a keyless server."""
        if not keys:
            return OPEN_SESSION
        cookie = request.cookies.get(COOKIE)
        if cookie and any(self.sessions.valid(cookie, key) for key in login_keys(keys).values()):
            return cookie
        return None

    def authenticate(self, request: web.Request, keys: Mapping[str, str]) -> str | None:
        """For auth_middleware: the session stands for the key that opened it; a state
        change under it needs the CSRF token."""
        session = self.session_of(request, keys)
        if session is None:
            return None
        self.check_csrf(request, session)
        return "admin-session"

    def check_csrf(self, request: web.Request, session: str) -> None:
        if request.method not in SAFE_METHODS and not self.sessions.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            raise csrf_failure()
