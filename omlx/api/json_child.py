"""JSON parsing in a worker process (omlx.api.offload.parse_json): a leaf module, so a
spawned worker imports nothing but orjson."""

from __future__ import annotations

import orjson


def loads(raw: bytes):
    """(True, value) or (False, the parser's message): the message, not the exception, crosses
    the process boundary."""
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return False, str(exc)
