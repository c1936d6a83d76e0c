"""Large request bodies are streamed to a spool file and parsed there by the JSON worker
(omlx.api.body_spool): the same value as an in-memory parse, the file gone afterwards, and a
declared Content-Length over the limit refused before any of the body is read."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from omlx.api import body_spool
from omlx.api.errors import APIError
from omlx.api.offload import PROCESS_JSON_BYTES
from omlx.api.wire import read_json
from omlx.serving_limits import LIMITS, ServingLimits
from omlx.testing.hostile_bodies import filler_text

LIMIT = 4 * PROCESS_JSON_BYTES


class SpoolDir:
    """Spool files go to a test's own directory, and each one made is counted."""

    def __init__(self, path):
        self.path = path
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        return str(self.path)

    def left(self) -> list:
        body_spool._writer.submit(lambda: None).result()  # the removals queued behind writes
        return list(self.path.iterdir())


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    spool = SpoolDir(tmp_path)
    monkeypatch.setattr(body_spool, "spool_dir", spool)
    return spool


async def echo_app() -> web.Application:
    """A route that answers what read_json made of its body (or its APIError)."""

    async def echo(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except APIError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application(client_max_size=LIMIT)
    app[LIMITS] = dataclasses.replace(ServingLimits(), max_request_bytes=LIMIT)
    app.router.add_post("/echo", echo)
    return app


async def test_a_large_body_is_spooled_parsed_and_its_file_removed(spool_dir):
    body = {"model": "m", "messages": [{"role": "user", "content": filler_text(PROCESS_JSON_BYTES + 10)}],
            "nested": {"a": [1, 2.5, None, "é 日本"]}}
    async with TestClient(TestServer(await echo_app())) as client:
        reply = await client.post("/echo", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
        assert reply.status == 200
        assert orjson.loads(await reply.read()) == body
        broken = await client.post("/echo", data=orjson.dumps(body)[:-1])
        assert broken.status == 400 and "not valid JSON" in (await broken.json())["error"]
        small = await client.post("/echo", data=b'{"model": "m"}')
        assert await small.json() == {"model": "m"}
    assert spool_dir.made == 2  # the two large bodies, not the small one
    assert spool_dir.left() == []  # every spool file removed once parsed


async def test_a_chunked_body_is_spooled_once_it_grows_large(spool_dir):
    """No Content-Length: held in memory while small, spooled past PROCESS_JSON_BYTES, and
    refused with 413 past the limit like any other body."""
    body = orjson.dumps({"model": "m", "prompt": filler_text(2 * PROCESS_JSON_BYTES)})

    def chunked(data: bytes, size: int = 64 << 10):
        async def chunks():
            for start in range(0, len(data), size):
                yield data[start:start + size]
        return chunks()

    async with TestClient(TestServer(await echo_app())) as client:
        reply = await client.post("/echo", data=chunked(body))
        assert reply.status == 200 and await reply.read() == body
        assert spool_dir.made == 1
        small = await client.post("/echo", data=chunked(b'{"model": "m"}', 4))
        assert await small.json() == {"model": "m"} and spool_dir.made == 1
        too_large = await client.post("/echo", data=chunked(body * 3))
        assert too_large.status == 413
    assert spool_dir.left() == []


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(spool_dir):
    """Headers only, never the body: the 413 comes at once (a server that read first would
    wait for bytes that never come)."""
    async with TestServer(await echo_app()) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {LIMIT + 1}\r\n\r\n{{\"model\"".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
    assert status_line.split()[1] == b"413", status_line
    assert spool_dir.made == 0 and spool_dir.left() == []  # nothing was spooled


# ---------------------------------------------------------------------------- the worker's refusal

WINDOW, LONGEST = 4096, 20
CHARS = WINDOW * LONGEST  # the fewest characters that prove a prompt cannot fit


@pytest.mark.parametrize("field, body, refused", [
    ("messages", {"messages": [{"role": "system", "content": "x" * CHARS}, {"role": "user", "content": "hi"}]}, False),
    ("messages", {"messages": [{"role": "user", "content": "x" * (CHARS // 2)}] * 2}, True),
    ("messages", {"messages": [{"role": "user", "content": "x" * (CHARS - LONGEST)}]}, False),  # 4095 tokens at least
    ("messages", {"messages": [{"role": "user", "content": " " * CHARS + "x" * (CHARS - LONGEST)}]}, False),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * CHARS}]}]}, False),
    ("input", {"input": "x" * CHARS}, True),
    ("input", {"input": [{"type": "message", "role": "user", "content": "x" * CHARS}]}, True),
    ("prompt", {"prompt": "x" * CHARS}, True),
    ("prompt", {"prompt": [5] * CHARS}, False),  # token ids: the server counts them itself
])
def test_the_worker_refuses_only_what_the_server_would(field, body, refused):
    from omlx.api.json_child import PromptLimits, TooLong

    limits = PromptLimits(field, {"m": (WINDOW, LONGEST, True)})
    result = limits.refuse({"model": "m", **body})
    assert (result is not None) == refused
    if refused:
        assert result == TooLong("m", WINDOW, WINDOW)
    assert limits.refuse({"model": "other", **body}) is None  # a model not loaded: the usual path


def test_a_template_that_drops_user_text_bounds_only_completion_prompts():
    from omlx.api.json_child import PromptLimits

    drops = {"m": (WINDOW, LONGEST, False)}
    assert PromptLimits("messages", drops).refuse({"model": "m", "messages": [{"role": "user", "content": "x" * CHARS}]}) is None
    assert PromptLimits("prompt", drops).refuse({"model": "m", "prompt": "x" * CHARS}) is not None


def test_a_refused_body_comes_back_from_the_worker_as_numbers(tmp_path):
    from omlx.api.json_child import PromptLimits, TooLong
    from omlx.api.offload import OffloadPool

    path = tmp_path / "body.json"
    body = {"model": "m", "messages": [{"role": "user", "content": filler_text(PROCESS_JSON_BYTES)}]}
    path.write_bytes(orjson.dumps(body))
    pool = OffloadPool(large_workers=1, small_workers=1)

    async def scenario():
        limits = PromptLimits("messages", {"m": (WINDOW, LONGEST, True)})
        parsed, refused = await pool.parse_json_file(str(path), 64, limits)
        assert not parsed and refused == TooLong("m", -(-PROCESS_JSON_BYTES // LONGEST), WINDOW)
        assert await pool.parse_json_file(str(path), 64) == (True, body)
        assert pool._processes is not None  # parsed (and refused) in the worker process

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
