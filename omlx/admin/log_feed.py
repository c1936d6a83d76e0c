"""The server log as the admin panel shows it: the latest records, and new ones as they come.

A logging handler on the root logger keeps the last few thousand records and hands each new
one to every listening stream (the panel's SSE connection), from whatever thread logged it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
KEEP = 2000
# The panel's own polling would otherwise fill the log it shows.
QUIET_LOGGERS = ("aiohttp.access",)


class LogFeed(logging.Handler):
    def __init__(self, capacity: int = KEEP):
        super().__init__(level=logging.DEBUG)
        self.records: deque[dict] = deque(maxlen=capacity)
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self._next = 0
        self._guard = threading.Lock()
        self.setFormatter(logging.Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(QUIET_LOGGERS):
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatter.formatException(record.exc_info)
        except Exception:  # a bad format string must not break whoever logged
            message = str(record.msg)
        with self._guard:
            self._next += 1
            entry = {"seq": self._next, "time": record.created, "level": record.levelname.lower(),
                     "levelno": record.levelno, "logger": record.name, "message": message}
            self.records.append(entry)
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(_offer, queue, entry)
            except RuntimeError:  # that loop has closed
                pass

    def recent(self, min_level: int = logging.DEBUG, limit: int = 500) -> list[dict]:
        with self._guard:
            return [r for r in self.records if r["levelno"] >= min_level][-limit:]

    def listen(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=10000)
        with self._guard:
            self._listeners.add((asyncio.get_running_loop(), queue))
        return queue

    def stop_listening(self, queue: asyncio.Queue) -> None:
        with self._guard:
            self._listeners = {(loop, q) for loop, q in self._listeners if q is not queue}

    def end_streams(self) -> None:
        """Tell every listening stream to finish (the server is stopping: an endless log
        stream must not hold up its graceful stop)."""
        with self._guard:
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(_offer, queue, None)
            except RuntimeError:
                pass

    def install(self) -> None:
        logging.getLogger().addHandler(self)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self)


def _offer(queue: asyncio.Queue, entry: dict) -> None:
    try:
        queue.put_nowait(entry)
    except asyncio.QueueFull:  # a stalled reader loses lines rather than growing without bound
        pass
