"""Stored Responses (`store: true`) on disk, so GET, DELETE and `previous_response_id` work
across server restarts.

One JSON file per response under OMLX_HOME/responses/, written atomically (a temporary file
renamed over the target, so a crash never leaves half a file).  The store is bounded: past
`max_entries` the least recently written responses are deleted.  Each entry holds the
response object the client sees and the conversation up to and including it (canonical chat
messages), which is what a follow-up continues from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

import orjson

log = logging.getLogger("omlx.api.response_store")

DEFAULT_MAX_ENTRIES = 2000
_ID = re.compile(r"^resp_[A-Za-z0-9_-]{1,100}$")


class ResponseStore:
    def __init__(self, directory: Path, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.directory = Path(directory)
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def _path(self, response_id: str) -> Path | None:
        # Ids come from clients: only our own format may name a file.
        return self.directory / f"{response_id}.json" if _ID.match(response_id) else None

    def get(self, response_id: str) -> dict | None:
        """{"response": ..., "messages": [...]} or None when unknown (or unreadable)."""
        path = self._path(response_id)
        if path is None:
            return None
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("stored response %s is unreadable: %s", response_id, exc)
            return None

    def put(self, response: dict, messages: list[dict]) -> None:
        path = self._path(response["id"])
        if path is None:
            raise ValueError(f"not a response id: {response['id']!r}")
        data = orjson.dumps({"response": response, "messages": messages})
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):  # vanished or untouchable meanwhile
                    os.unlink(tmp)
                raise
            self._evict()

    def delete(self, response_id: str) -> bool:
        path = self._path(response_id)
        if path is None:
            return False
        with self._lock:
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return False

    def _evict(self) -> None:
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith("resp_") and entry.name.endswith(".json"):
                with contextlib.suppress(OSError):  # vanished or untouchable meanwhile
                    entries.append((entry.stat().st_mtime_ns, entry.path))
        excess = len(entries) - self.max_entries
        if excess <= 0:
            return
        for _, path in sorted(entries)[:excess]:
            with contextlib.suppress(OSError):  # vanished or untouchable meanwhile
                os.unlink(path)
