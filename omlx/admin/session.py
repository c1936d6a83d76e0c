"""Admin panel sessions: a signed cookie after logging in with the API key, and a CSRF token.

The cookie holds `expiry.nonce.signature`, signed with HMAC-SHA256 under a secret kept in
`$OMLX_HOME/admin_secret` (made on first use, mode 0600) and the API key it was opened with,
so changing or revoking that key ends its sessions.  It is HttpOnly (scripts cannot read it)
and SameSite=Strict (other sites' pages do not send it).  Requests that change state must
also carry the session's CSRF token in `X-CSRF-Token`: a page on another origin cannot read
it, and cannot send a custom header cross-site without a CORS preflight we never answer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

COOKIE = "omlx_admin_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 24 * 3600
# Without an API key the panel is open (as the API is); state changes still need this
# token, which only a page from the server itself can read.
OPEN_SESSION = "open"


def load_secret(home: Path) -> bytes:
    path = home / "admin_secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    secret = secrets.token_bytes(32)
    home.mkdir(parents=True, exist_ok=True)
    # Written whole under a name of this call's own, then linked into place: link never
    # replaces, so when two processes start on a fresh home at once the first secret wins and
    # the other reads it (complete) instead of signing with one that is not on disk.
    tmp = path.with_name(f"admin_secret.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink(missing_ok=True)
    return secret


class Sessions:
    def __init__(self, secret: bytes):
        self.secret = secret

    def _sign(self, message: str, key: str) -> str:
        material = self.secret + hashlib.sha256(key.encode()).digest()
        return hmac.new(material, message.encode(), hashlib.sha256).hexdigest()

    def issue(self, key: str, now: float | None = None) -> str:
        expiry = int((now or time.time()) + SESSION_SECONDS)
        message = f"{expiry}.{secrets.token_hex(16)}"
        return f"{message}.{self._sign(message, key)}"

    def valid(self, cookie: str | None, key: str, now: float | None = None) -> bool:
        if not cookie or cookie.count(".") != 2:
            return False
        expiry, nonce, signature = cookie.split(".")
        if not expiry.isdigit() or int(expiry) < (now or time.time()):
            return False
        return hmac.compare_digest(signature, self._sign(f"{expiry}.{nonce}", key))

    def csrf_token(self, session: str) -> str:
        """The token bound to one session (or to the open panel, OPEN_SESSION)."""
        return hmac.new(self.secret, b"csrf:" + session.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented, self.csrf_token(session))
