"""Raw HTTP for tests that check wire formats byte-level: a POST whose server-sent events come
back as (event name, parsed data) pairs, and a plain JSON call."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post_events(url: str, body: dict, headers: dict | None = None) -> list[tuple[str | None, object]]:
    """Every SSE event of a streamed POST: (the `event:` name or None, the `data:` JSON)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200, response.status
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = []
    for block in raw.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        if data:
            payload = "\n".join(data)
            events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


def call(url: str, method: str = "GET", body=None, headers: dict | None = None) -> tuple[int, dict | None, dict]:
    """(status, JSON body or None, headers) of one request; error statuses are returned."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None, dict(exc.headers)
