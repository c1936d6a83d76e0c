"""Parsing a request body's JSON, in a worker process for a large one (omlx.api.offload): a
leaf module, so a spawned worker imports nothing but orjson.  The depth check runs here too,
so the walk over a body of many small values never touches the event loop either."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, NamedTuple

import orjson


# The most messages (or input items) one request may carry: Anthropic's documented limit for
# /v1/messages, far above any context window's worth of turns.  Checked here, where a large
# body is parsed, so a body of hundreds of thousands of tiny messages is refused before it is
# handed back to the server (unpickling them would hold the event loop's GIL).
MAX_ITEMS = 100_000
ITEM_LISTS = ("messages", "input")


def loads(raw: bytes, max_depth: int, limits: "PromptLimits | None" = None):
    """(True, value), or (False, what the client is told): a message, not an exception,
    crosses the process boundary; or (False, a TooLong) for a prompt that `limits` shows
    cannot fit its model, so that a hostile body is never handed back to the server."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return False, f"the request body is not valid JSON: {exc}"
    if isinstance(value, dict):
        for key in ITEM_LISTS:
            items = value.get(key)
            if isinstance(items, list) and len(items) > MAX_ITEMS:
                return False, f"'{key}' has {len(items)} items; a request may carry at most {MAX_ITEMS}"
    if too_deep(value, max_depth):
        return False, f"the request body nests JSON deeper than {max_depth} levels"
    if limits is not None and isinstance(value, dict):
        too_long = limits.refuse(value)
        if too_long is not None:
            return False, too_long
    return True, value


def loads_file(path: str, max_depth: int, limits: "PromptLimits | None" = None):
    """`loads` of a body spooled to `path` (omlx.api.body_spool): read here, in the worker,
    so the body never crosses the pipe from the server."""
    with open(path, "rb") as f:
        raw = f.read()
    return loads(raw, max_depth, limits)


class TooLong(NamedTuple):
    """A prompt of at least `at_least` tokens, for a model whose context holds `window`."""

    model: str
    at_least: int
    window: int


class PromptLimits(NamedTuple):
    """What the worker needs to refuse a prompt that cannot fit (omlx.api.prompt_limits
    builds it): where the route's prompt is ("messages", "input" or "prompt") and, for each
    loaded model, (context window, the most characters one token stands for, whether its
    chat template renders a user's text as it is)."""

    field: str
    models: dict[str, tuple[int, int, bool]]

    def refuse(self, body: dict) -> TooLong | None:
        model = body.get("model")
        fit = self.models.get(model) if isinstance(model, str) else None
        if fit is None:
            return None
        window, longest, renders_user_text = fit
        prompt = body.get(self.field)
        if self.field == "prompt":  # a completion prompt is tokenized as it is
            chars = len(prompt) if isinstance(prompt, str) else 0
        elif not renders_user_text:
            return None
        elif isinstance(prompt, str):  # a Responses input string: one user message
            chars = trimmed_length(prompt)
        elif isinstance(prompt, list):
            chars = user_text_chars(prompt)
        else:
            return None
        at_least = -(-chars // longest)
        return TooLong(model, at_least, window) if at_least >= window else None


def user_text_chars(messages: list) -> int:
    """Characters of the users' text messages that a template rendering them as they are puts
    in the prompt: leading and trailing whitespace aside (a template may trim it)."""
    return sum(trimmed_length(m["content"]) for m in messages
               if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str))


def trimmed_length(text: str) -> int:
    """len(text.strip()), without copying a text that has no whitespace to trim (strip copies
    all 20 MiB of a hostile one, holding the GIL)."""
    if text[:1].isspace() or text[-1:].isspace():
        return len(text.strip())
    return len(text)


def too_deep(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


# Niceness of a worker: parsing a hostile body must not take the CPU from the engine's
# decoding and the event loop (the worker's work is a client's, theirs everyone's).
WORKER_NICENESS = 10


def start_worker(parent_pid: int) -> None:
    """A worker's initializer: a lower CPU priority than the server, and a watch on it."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    watch_parent(parent_pid)


def watch_parent(parent_pid: int) -> None:
    """End the worker when the server that started it is gone (killed without a chance to
    shut its pool down), instead of living on as an orphan."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="omlx-parent-watch", daemon=True).start()
