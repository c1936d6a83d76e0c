"""Admission control and hostile clients: a bounded queue answered with 503 (OpenAI shape,
`code: overloaded`) or 529 (Anthropic `overloaded_error`) and Retry-After, a queue timeout
that ends the same way, 413 for oversized bodies, 408 for a client that stalls its body;
none of them holds an engine slot, and the server keeps serving."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from omlx_process import omlx_server
from robust_helpers import ENDLESS, EventStream, build_endless_dir, is_content, stream_body
from sse_client import call

QUEUE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_endless_dir(tmp_path_factory.mktemp("endless"))
    with omlx_server(
        root, tmp_path_factory.mktemp("admission"),
        "--max-num-seqs", "1", "--max-waiting-requests", "1", "--queue-timeout", str(QUEUE_TIMEOUT_S),
        "--max-request-size", "1MB", "--client-read-timeout", "1", "--kv-cache-gb", "0.2",
        failure=pytest.fail,
    ) as running:
        yield running


def _model_stats(server) -> dict:
    return server.health()["models_loaded"].get(ENDLESS, {})


async def _blocker(server, session: aiohttp.ClientSession) -> EventStream:
    """A stream holding the model's only slot until closed."""
    path, body = stream_body("chat", 30000)
    response = await session.post(server.root + path, json=body)
    assert response.status == 200
    stream = EventStream(response)
    while not is_content("chat", await stream.next()):
        pass
    return stream


async def _until(condition, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def _quiet(server) -> None:
    """The engine back to idle: nothing running, nothing queued."""
    await _until(lambda: _model_stats(server).get("running") == 0 and _model_stats(server).get("queued") == 0,
                 "the engine idle again")


def _assert_retry_after(headers: dict) -> None:
    retry = {k.lower(): v for k, v in headers.items()}.get("retry-after")
    assert retry is not None and int(retry) >= 1, headers


async def test_a_full_queue_answers_503_or_529_with_retry_after_and_a_queued_request_times_out(server):
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        blocker = await _blocker(server, session)
        # One request waits (the per-model cap is 1)...
        waiting = loop.run_in_executor(None, call, server.base_url + "/completions", "POST",
                                       {"model": ENDLESS, "prompt": "queued", "max_tokens": 4})
        await _until(lambda: _model_stats(server).get("queued") == 1, "one request queued")
        # ...so the next is turned away at once, in its family's shape.
        status, body, headers = await loop.run_in_executor(
            None, call, server.base_url + "/chat/completions", "POST",
            {"model": ENDLESS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert status == 503, body
        assert body["error"]["code"] == "overloaded" and body["error"]["type"] == "server_error"
        _assert_retry_after(headers)
        status, body, headers = await loop.run_in_executor(
            None, call, server.root + "/v1/messages", "POST",
            {"model": ENDLESS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert status == 529, body
        assert body == {"type": "error", "error": {"type": "overloaded_error", "message": body["error"]["message"]}}
        _assert_retry_after(headers)
        # The queued one gives up after the queue timeout, with the same answer.
        status, body, headers = await waiting
        assert status == 503 and body["error"]["code"] == "overloaded", body
        _assert_retry_after(headers)
        await blocker.response.release()
        blocker.response.close()
    await _quiet(server)
    status, body, _ = call(server.base_url + "/completions", "POST", {"model": ENDLESS, "prompt": "after", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


async def test_the_sdks_see_overload_as_their_own_errors(server):
    import anthropic
    import openai

    async with aiohttp.ClientSession() as session:
        blocker = await _blocker(server, session)
        waiting = asyncio.ensure_future(session.post(
            server.root + "/v1/messages", json={**stream_body("messages", 4)[1], "stream": False}))
        await _until(lambda: _model_stats(server).get("queued") == 1, "one request queued")
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as raised:
                await client.chat.completions.create(model=ENDLESS, messages=[{"role": "user", "content": "x"}])
            assert raised.value.status_code == 503 and raised.value.code == "overloaded"
        async with anthropic.AsyncAnthropic(base_url=server.root, api_key="x", max_retries=0) as client:
            with pytest.raises(anthropic.APIStatusError) as raised:
                await client.messages.create(model=ENDLESS, max_tokens=4, messages=[{"role": "user", "content": "x"}])
            assert raised.value.status_code == 529
            assert raised.value.body["error"]["type"] == "overloaded_error"
        response = await waiting  # the queued one timed out: 529 on Anthropic's route
        assert response.status == 529 and (await response.json())["error"]["type"] == "overloaded_error"
        assert "Retry-After" in response.headers
        blocker.response.close()
    await _quiet(server)


async def test_a_stream_that_times_out_in_the_queue_ends_with_an_overload_event(server):
    async with aiohttp.ClientSession() as session:
        blocker = await _blocker(server, session)
        path, body = stream_body("messages", 4)
        response = await session.post(server.root + path, json=body)
        assert response.status == 200  # the stream opened while the request queued
        events = await EventStream(response).rest()
        name, data = events[-1]
        assert name == "error" and data["error"]["type"] == "overloaded_error", events
        assert not any(is_content("messages", e) for e in events)
        blocker.response.close()
    await _quiet(server)


def test_a_body_over_the_size_limit_gets_413_in_each_family_shape(server):
    big = {"model": ENDLESS, "messages": [{"role": "user", "content": "x" * (2 << 20)}], "max_tokens": 4}
    status, body, _ = call(server.base_url + "/chat/completions", "POST", big)
    assert status == 413 and body["error"]["type"] == "invalid_request_error", body
    status, body, _ = call(server.root + "/v1/messages", "POST", big)
    assert status == 413 and body["type"] == "error" and body["error"]["type"] == "request_too_large", body


def _stalled_request(server, path: str, sent: bytes) -> bytes:
    """Headers promising a 1000-byte body, `sent` of it, then nothing: what comes back."""
    host, port = server.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n".encode() + sent)
        reply = b""
        while True:  # until the whole answer is in (the server may linger before closing)
            head, sep, body = reply.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    return reply
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_client_that_stalls_its_body_gets_408_and_holds_no_slot(server, path):
    reply = _stalled_request(server, path, b'{"model": "tiny-endless", ')
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:500]
    if path == "/v1/messages":
        assert b'"type":"error"' in body and b"timeout_error" in body
    else:
        assert b'"code":"request_timeout"' in body
    stats = _model_stats(server)
    assert stats.get("queued", 0) == 0 and stats.get("running", 0) == 0
    status, _, _ = call(server.base_url + "/completions", "POST", {"model": ENDLESS, "prompt": "ok", "max_tokens": 2})
    assert status == 200


def test_a_client_that_stalls_its_headers_is_disconnected(server):
    host, port = server.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Ty".encode())
        assert sock.recv(65536) == b""  # closed by the server (a timeout here would raise)
