"""Shared by the robustness tests: a model whose replies never end by themselves, streams read
event by event with aiohttp, and the three families' streaming request bodies."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from omlx.testing.tiny_models import TinyModelSpec, build_endless_model

ENDLESS = "tiny-endless"
# A long context, so that one greedy stream can run for many seconds on any machine.
ENDLESS_SPEC = TinyModelSpec(max_position_embeddings=32768, seed=3)


def build_endless_dir(root: Path) -> Path:
    build_endless_model(root / ENDLESS, ENDLESS_SPEC)
    return root


def stream_body(family: str, max_tokens: int, text: str = "Tell me everything.") -> tuple[str, dict]:
    """(path, body) of a greedy streaming request of `family`: chat, completions, messages, responses."""
    if family == "chat":
        return "/v1/chat/completions", {"model": ENDLESS, "messages": [{"role": "user", "content": text}],
                                        "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if family == "completions":
        return "/v1/completions", {"model": ENDLESS, "prompt": text, "max_tokens": max_tokens,
                                   "temperature": 0, "stream": True}
    if family == "messages":
        return "/v1/messages", {"model": ENDLESS, "messages": [{"role": "user", "content": text}],
                                "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if family == "responses":
        return "/v1/responses", {"model": ENDLESS, "input": text, "max_output_tokens": max_tokens,
                                 "temperature": 0, "stream": True}
    raise ValueError(family)


class EventStream:
    """An open SSE response read one event at a time: (event name or None, data)."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.events: list[tuple[str | None, object]] = []
        self.comments: list[str] = []  # SSE comment lines, without the leading ':'
        self._buffer = b""

    async def next(self) -> tuple[str | None, object] | None:
        """The next event (comments skipped), or None at the end of the stream."""
        while True:
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                text = block.decode()
                self.comments += [line[1:].strip() for line in text.splitlines() if line.startswith(":")]
                event = _parse(text)
                if event is not None:
                    self.events.append(event)
                    return event
            chunk = await self.response.content.readany()
            if not chunk:
                return None
            self._buffer += chunk

    async def rest(self) -> list[tuple[str | None, object]]:
        while await self.next() is not None:
            pass
        return self.events


def _parse(block: str) -> tuple[str | None, object] | None:
    name, data = None, []
    for line in block.splitlines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
    if not data:
        return None
    payload = "\n".join(data)
    return name, payload if payload == "[DONE]" else json.loads(payload)


def is_content(family: str, event: tuple[str | None, object]) -> bool:
    """Whether an event carries generated text."""
    name, data = event
    if family == "chat":
        return isinstance(data, dict) and bool(data.get("choices")) and bool(data["choices"][0]["delta"].get("content"))
    if family == "completions":
        return isinstance(data, dict) and bool(data.get("choices")) and bool(data["choices"][0].get("text"))
    if family == "messages":
        return name == "content_block_delta"
    return name == "response.output_text.delta"
