"""Who may use the admin panel: logging in with the API key, and requests under its session."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Mapping

from aiohttp import web

from omlx.api.auth import match_key
from omlx.api.errors import APIError

from .session import COOKIE, CSRF_HEADER, OPEN_SESSION, Sessions

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Guessing the key through the login form: this many failures from one address within the
# window, and that address gets 429s until the window has passed.
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW_S = 60.0


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
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def login_blocked_for(self, client: str, now: float | None = None) -> float:
        """Seconds `client` must wait before trying again (0: it may try now)."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(client)
        if not failures:
            return 0.0
        while failures and now - failures[0] > FAILED_LOGIN_WINDOW_S:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        return FAILED_LOGIN_WINDOW_S - (now - failures[0]) if len(failures) >= MAX_FAILED_LOGINS else 0.0

    def login_failed(self, client: str, now: float | None = None) -> None:
        self._failures[client].append(time.monotonic() if now is None else now)

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
