"""`omlx serve` stops cleanly on SIGTERM and SIGINT: exit status 0 and no abort at exit
(MLX's thread-local compile cache used to kill the process with "terminate called without
an active exception"), streams in flight finish within the grace period or end with their
API's own final event, nothing half-written, no process left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import aiohttp
import pytest

from omlx_process import omlx_server
from robust_helpers import EventStream, build_endless_dir, is_content, stream_body

FAMILIES = ("chat", "completions", "messages", "responses")


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory):
    return build_endless_dir(tmp_path_factory.mktemp("endless"))


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _open_streams(root: str, session: aiohttp.ClientSession, max_tokens: int) -> dict[str, EventStream]:
    """One stream per family, each read until its first generated text arrived."""
    streams = {}
    for family in FAMILIES:
        path, body = stream_body(family, max_tokens)
        response = await session.post(root + path, json=body)
        assert response.status == 200, await response.text()
        stream = EventStream(response)
        while True:
            event = await stream.next()
            assert event is not None, f"{family} ended before any text: {stream.events}"
            if is_content(family, event):
                break
        streams[family] = stream
    return streams


def _stop(server, sig: int) -> tuple[int, str]:
    children = _children(server.process.pid)
    server.process.send_signal(sig)
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not stop within 60s:\n{server.log_tail()}")
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"processes left behind: {left}"
    return code, server.log_path.read_text(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stop_under_load_ends_every_stream_with_its_final_event_and_exits_0(endless_dir, tmp_path, sig):
    with omlx_server(endless_dir, tmp_path, "--shutdown-grace", "1", "--kv-cache-gb", "0.2") as server:
        async with aiohttp.ClientSession() as session:
            # Endless greedy streams: the grace period runs out before any of them could finish.
            streams = await _open_streams(server.root, session, 30000)
            loop = asyncio.get_running_loop()
            stopping = loop.run_in_executor(None, _stop, server, sig)
            ends = {family: await stream.rest() for family, stream in streams.items()}
            code, log = await stopping
    assert code == 0, log[-3000:]
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    assert "the grace period is over; ending 4 request(s)" in log

    # Each stream's last event is its API's own error event, never a cut-off stream.
    chat_end = ends["chat"][-1][1]
    assert chat_end["error"]["code"] == "server_shutting_down"
    assert ends["completions"][-1][1]["error"]["code"] == "server_shutting_down"
    name, data = ends["messages"][-1]
    assert name == "error" and data["type"] == "error" and data["error"]["type"] == "overloaded_error"
    kinds = [name for name, _ in ends["responses"][-2:]]
    assert kinds == ["error", "response.failed"]
    failed = ends["responses"][-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_shutting_down"


async def test_streams_that_finish_within_the_grace_period_complete_and_are_stored(endless_dir, tmp_path):
    with omlx_server(endless_dir, tmp_path, "--shutdown-grace", "120", "--kv-cache-gb", "0.2") as server:
        async with aiohttp.ClientSession() as session:
            streams = await _open_streams(server.root, session, 200)
            loop = asyncio.get_running_loop()
            stopping = loop.run_in_executor(None, _stop, server, signal.SIGTERM)
            ends = {family: await stream.rest() for family, stream in streams.items()}
            # Nothing new is accepted once the stop has begun (the server logs that it has, after
            # closing its listener): waited for as an event, not guessed with a sleep.
            deadline = loop.time() + 60
            while "stopping: no new connections" not in server.log_path.read_text(errors="replace"):
                assert loop.time() < deadline, server.log_tail()
                await asyncio.sleep(0.05)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(server.root + "/health") as response:
                    await response.read()
            code, log = await stopping
    assert code == 0, log[-3000:]
    assert "terminate called" not in log and "ending" not in log, log[-3000:]
    assert ends["chat"][-1][1] == "[DONE]" and ends["completions"][-1][1] == "[DONE]"
    assert ends["messages"][-1][0] == "message_stop"
    assert ends["responses"][-1][0] == "response.incomplete"  # max_output_tokens reached
    completed = ends["responses"][-1][1]["response"]
    # The response store holds the finished response whole (written before the exit).
    files = list((tmp_path / "home" / "responses").rglob("*.json"))
    assert not [p for p in files if p.name.startswith(".tmp-")], "a half-written response file"
    stored = [p for p in files if not p.name.startswith(".tmp-")]
    assert stored, "the response was not stored"
    assert any(json.loads(p.read_text())["response"]["id"] == completed["id"] for p in stored)


def test_idle_server_exits_0_on_sigint_after_serving(endless_dir, tmp_path):
    with omlx_server(endless_dir, tmp_path, "--kv-cache-gb", "0.2") as server:
        import urllib.request

        body = json.dumps({"model": "tiny-endless", "prompt": "hi", "max_tokens": 4}).encode()
        request = urllib.request.Request(server.base_url + "/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
        code, log = _stop(server, signal.SIGINT)
    assert code == 0 and "terminate called" not in log, log[-3000:]
