"""The admin panel's server side on the real application: login and the session cookie,
CSRF protection of state changes, the keyless (open) panel, statistics kept across restarts,
the live log, the log files, and the downloader against the local fake hub (search, files,
progress, cancel, resume) and against a hub that cannot be reached."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from fake_hub import FakeHub, RunningHub
from omlx.admin.access import FAILED_LOGIN_WINDOW_S, MAX_FAILED_LOGINS, AdminAccess
from omlx.admin.session import COOKIE, Sessions
from omlx.log_files import log_to_files
from omlx.scheduler import EngineConfig
from omlx.server import ServerConfig, create_app
from omlx.testing.tiny_models import TinyModelSpec, build_model

KEY = "sk-admin-main-0123456789"
NAMED = "sk-admin-named-9876543210"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("admin-models")
    build_model(root / "tiny", TinyModelSpec())
    return root


async def start(model_dir: Path, home: Path, api_key: str | None = KEY, more_dirs: tuple[Path, ...] = ()) -> TestServer:
    home.mkdir(parents=True, exist_ok=True)
    if api_key:
        (home / "settings.json").write_text(json.dumps({"api_keys": {"ci": NAMED}}))
    config = ServerConfig(model_dirs=[model_dir, *more_dirs], engine=EngineConfig(block_size=16, num_blocks=64),
                          settings_home=home, api_key=api_key, packaged_models=False)
    server = TestServer(create_app(config))
    await server.start_server()
    return server


@pytest_asyncio.fixture(loop_scope="function")
async def keyed(model_dir, tmp_path):
    server = await start(model_dir, tmp_path / "home")
    try:
        yield server
    finally:
        await server.close()


async def login(session: aiohttp.ClientSession, server, key: str = KEY) -> tuple[int, dict]:
    async with session.post(server.make_url("/admin/api/login"), json={"api_key": key}) as r:
        return r.status, await r.json()


async def test_login_sets_a_signed_httponly_strict_cookie_and_csrf_guards_state_changes(keyed):
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        # The page, its files and the session probe are open; data is not.
        for path in ("/admin", "/admin/static/app.js", "/admin/static/app.css", "/admin/static/markdown.js"):
            async with s.get(keyed.make_url(path)) as r:
                assert r.status == 200, path
        async with s.get(keyed.make_url("/admin/api/session")) as r:
            assert await r.json() == {"auth_required": True, "logged_in": False, "csrf_token": None,
                                      "version": (await r.json())["version"]}
        async with s.get(keyed.make_url("/admin/api/stats")) as r:
            assert r.status == 401
        status, body = await login(s, keyed, "sk-wrong")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        # Named keys are for the API only, as in oMLX.
        assert (await login(s, keyed, NAMED))[0] == 401
        async with s.post(keyed.make_url("/admin/api/login"), json={"api_key": KEY}) as r:
            assert r.status == 200
            csrf = (await r.json())["csrf_token"]
            header = r.headers["Set-Cookie"]
        assert "HttpOnly" in header and "SameSite=Strict" in header and KEY not in header
        # The session opens the API routes the panel uses...
        async with s.get(keyed.make_url("/v1/models/status")) as r:
            assert r.status == 200
        async with s.get(keyed.make_url("/admin/api/stats")) as r:
            assert r.status == 200
        # ...but a state change needs the CSRF token as well.
        async with s.post(keyed.make_url("/v1/models/tiny/load")) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "csrf_failed"
        async with s.post(keyed.make_url("/v1/models/tiny/load"), headers={"X-CSRF-Token": "0" * 64}) as r:
            assert r.status == 403
        async with s.post(keyed.make_url("/v1/models/tiny/load"), headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200 and (await r.json())["loaded"]
        async with s.post(keyed.make_url("/admin/api/logout"), headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with s.get(keyed.make_url("/admin/api/stats")) as r:
            assert r.status == 401
    # An API client with the key in a header needs no cookie and no CSRF token.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        async with s.post(keyed.make_url("/admin/api/stats/clear"), json={}) as r:
            assert r.status == 200


def test_session_cookies_are_bound_to_the_key_and_expire():
    sessions = Sessions(b"s" * 32)
    cookie = sessions.issue("key-one", now=1000.0)
    assert sessions.valid(cookie, "key-one", now=1001.0)
    assert not sessions.valid(cookie, "key-two", now=1001.0)  # the key changed: sessions end
    assert not sessions.valid(cookie, "key-one", now=1000.0 + 2 * 86400)  # expired
    expiry, nonce, signature = cookie.split(".")
    assert not sessions.valid(f"{int(expiry) + 86400}.{nonce}.{signature}", "key-one", now=1001.0)  # tampered
    assert not sessions.valid("garbage", "key-one")
    assert Sessions(b"t" * 32).valid(cookie, "key-one", now=1001.0) is False  # another server's secret


async def test_a_keyless_server_opens_the_panel_but_still_guards_its_state_changes(model_dir, tmp_path):
    server = await start(model_dir, tmp_path / "home", api_key=None)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.make_url("/admin/api/session")) as r:
                session = await r.json()
            assert session["auth_required"] is False and session["logged_in"] and session["csrf_token"]
            async with s.post(server.make_url("/admin/api/stats/clear"), json={}) as r:
                assert r.status == 403
            async with s.post(server.make_url("/admin/api/stats/clear"), json={},
                              headers={"X-CSRF-Token": session["csrf_token"]}) as r:
                assert r.status == 200
    finally:
        await server.close()


async def chat(session, server, content: str, max_tokens: int = 5) -> dict:
    async with session.post(server.make_url("/v1/chat/completions"), headers={"x-api-key": KEY}, json={
            "model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}) as r:
        assert r.status == 200
        return await r.json()


async def stats(session, server) -> dict:
    async with session.get(server.make_url("/admin/api/stats"), headers={"x-api-key": KEY}) as r:
        assert r.status == 200
        return await r.json()


async def test_totals_since_start_and_all_time_survive_a_restart(model_dir, tmp_path):
    home = tmp_path / "home"
    server = await start(model_dir, home)
    async with aiohttp.ClientSession() as s:
        prompt = "Tell me everything about the weather in Paris in the spring, and then in the summer."
        first = await chat(s, server, prompt)
        second = await chat(s, server, prompt)  # the same prompt: its full blocks come from the prefix cache
        body = await stats(s, server)
        tiny = body["session"]["models"]["tiny"]
        assert tiny["requests"] == 2
        assert tiny["prompt_tokens"] == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
        assert tiny["generation_tokens"] == first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"]
        assert tiny["cached_tokens"] == second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert body["all_time"]["models"]["tiny"]["requests"] == 2
        assert body["latency"]["tiny"]["samples"] == 2 and body["latency"]["tiny"]["ttft_s"]["p50"] > 0
        [model] = body["models"]
        assert model["id"] == "tiny" and model["running"] == 0 and model["kv_cache"]["max_blocks"] > 0
        assert model["prefilling"] == []
        assert body["memory"]["holders"] == [{"holder": "model:tiny", "bytes": model["memory_bytes"]}]
    await server.close()
    saved = json.loads((home / "stats.json").read_text())
    assert saved["all_time"]["tiny"]["requests"] == 2

    server = await start(model_dir, home)
    try:
        async with aiohttp.ClientSession() as s:
            await chat(s, server, "Another one")
            body = await stats(s, server)
            assert body["session"]["models"]["tiny"]["requests"] == 1
            assert body["all_time"]["models"]["tiny"]["requests"] == 3
            async with s.post(server.make_url("/admin/api/stats/clear"), json={"all_time": True},
                              headers={"x-api-key": KEY}) as r:
                assert r.status == 200
            body = await stats(s, server)
            assert body["all_time"]["models"] == {} and body["session"]["models"] == {}
    finally:
        await server.close()


async def test_the_log_feed_serves_recent_lines_and_streams_new_ones(keyed, caplog):
    caplog.set_level(logging.INFO)  # as `omlx serve` logs
    headers = {"x-api-key": KEY}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(keyed.make_url("/admin/api/logs?level=loud")) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "level"
        async with s.get(keyed.make_url("/admin/api/logs/stream?level=info")) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            async with s.post(keyed.make_url("/v1/models/tiny/load")) as r:
                assert r.status == 200
            seen = []
            while not any("loaded tiny in" in m for m in seen):
                line = (await asyncio.wait_for(stream.content.readline(), 60)).decode()
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:])["message"])
        async with s.get(keyed.make_url("/admin/api/logs?level=info")) as r:
            records = (await r.json())["records"]
        assert any("loaded tiny in" in rec["message"] and rec["level"] == "info" for rec in records)
        async with s.get(keyed.make_url("/admin/api/logs?level=error")) as r:
            assert all(rec["levelno"] >= logging.ERROR for rec in (await r.json())["records"])


def test_log_files_rotate_daily_and_keep_the_retention(tmp_path, monkeypatch):
    monkeypatch.setenv("OMLX_LOG_RETENTION_DAYS", "3")
    root = logging.getLogger()
    path = log_to_files(tmp_path)
    handler = next(h for h in root.handlers if isinstance(h, TimedRotatingFileHandler)
                   and Path(h.baseFilename) == path)
    try:
        assert path == tmp_path / "logs" / "server.log"
        assert handler.when == "MIDNIGHT" and handler.backupCount == 3
        logging.getLogger("omlx.test").warning("a line for the file")
        handler.flush()
        assert "WARNING omlx.test: a line for the file" in path.read_text()
    finally:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("admin-hub-repo")
    build_model(root, TinyModelSpec(seed=5))
    (root / "pytorch_model.bin").write_bytes(b"\0" * 1000)  # not fetched: serving needs safetensors
    return root


async def wait_for_task(s, server, task_id: str, status: str) -> dict:
    for _ in range(1200):
        async with s.get(server.make_url("/admin/api/hf/tasks")) as r:
            task = {t["id"]: t for t in (await r.json())["tasks"]}[task_id]
        if task["status"] == status:
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"download {task_id} never reached {status}: {task}")


@pytest.mark.slow
async def test_downloader_searches_lists_downloads_cancels_and_resumes(model_dir, hub_repo, tmp_path, monkeypatch):
    hub = FakeHub({"test-org/tiny-download": hub_repo}, held={"model.safetensors"})
    with RunningHub(hub):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        models = tmp_path / "models"
        models.mkdir()
        server = await start(models, tmp_path / "home")
        try:
            async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as s:
                async with s.get(server.make_url("/admin/api/hf/search?q=tiny-down")) as r:
                    found = await r.json()
                assert [m["id"] for m in found["models"]] == ["test-org/tiny-download"]
                async with s.get(server.make_url("/admin/api/hf/files?repo=test-org/tiny-download")) as r:
                    files = {f["path"]: f for f in (await r.json())["files"]}
                weights = (hub_repo / "model.safetensors").stat().st_size
                assert files["model.safetensors"] == {"path": "model.safetensors", "size": weights, "download": True}
                assert files["pytorch_model.bin"]["download"] is False
                async with s.get(server.make_url("/admin/api/hf/files?repo=../etc")) as r:
                    assert r.status == 400
                async with s.get(server.make_url("/admin/api/hf/files?repo=test-org/missing")) as r:
                    assert r.status == 400 and "no model repo" in (await r.json())["error"]["message"]

                async with s.post(server.make_url("/admin/api/hf/download"), json={"repo_id": "test-org/tiny-download"}) as r:
                    task = await r.json()
                assert task["status"] == "downloading" and task["total_bytes"] >= weights
                # The weights' transfer is held by the hub: cancel it mid-way.
                while not any(q.path.endswith("/model.safetensors") and q.method == "GET" for q in hub.requests):
                    await asyncio.sleep(0.05)
                async with s.post(server.make_url(f"/admin/api/hf/cancel/{task['id']}")) as r:
                    assert (await r.json())["status"] == "cancelled"
                assert not (models / "test-org" / "tiny-download" / "model.safetensors").exists()
                hub.held.clear()
                async with s.post(server.make_url(f"/admin/api/hf/resume/{task['id']}")) as r:
                    assert (await r.json())["status"] == "downloading"
                done = await wait_for_task(s, server, task["id"], "done")
                assert done["progress"] == 1.0 and done["downloaded_bytes"] == done["total_bytes"]
                assert (models / "test-org" / "tiny-download" / "model.safetensors").stat().st_size == weights
                assert not (models / "test-org" / "tiny-download" / "pytorch_model.bin").exists()
                # The pool found it without a restart.
                async with s.get(server.make_url("/v1/models/status")) as r:
                    assert "test-org/tiny-download" in [m["id"] for m in (await r.json())["models"]]
                async with s.post(server.make_url("/admin/api/hf/cancel/dl-nope")) as r:
                    assert r.status == 404
        finally:
            await server.close()


@pytest.mark.slow
async def test_a_download_goes_into_the_model_dir_asked_for(hub_repo, tmp_path, monkeypatch):
    hub = FakeHub({"test-org/tiny-download": hub_repo})
    with RunningHub(hub):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        first, second = tmp_path / "models-a", tmp_path / "models-b"
        first.mkdir()
        second.mkdir()
        server = await start(first, tmp_path / "home", more_dirs=(second,))
        try:
            async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as s:
                async with s.get(server.make_url("/admin/api/hf/tasks")) as r:
                    assert (await r.json())["model_dirs"] == [str(first), str(second)]
                async with s.post(server.make_url("/admin/api/hf/download"),
                                  json={"repo_id": "test-org/tiny-download", "model_dir": str(tmp_path)}) as r:
                    body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "model_dir", body
                async with s.post(server.make_url("/admin/api/hf/download"),
                                  json={"repo_id": "test-org/tiny-download", "model_dir": str(second)}) as r:
                    task = await r.json()
                assert task["dest"] == str(second / "test-org" / "tiny-download")
                await wait_for_task(s, server, task["id"], "done")
                assert (second / "test-org" / "tiny-download" / "model.safetensors").exists()
                assert not (first / "test-org").exists()
        finally:
            await server.close()


async def test_an_unreachable_hub_gets_a_clear_message(keyed, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as s:
        for path in ("/admin/api/hf/search?q=qwen", "/admin/api/hf/files?repo=org/name"):
            async with s.get(keyed.make_url(path)) as r:
                body = await r.json()
            assert r.status == 502 and body["error"]["code"] == "hub_unreachable"
            assert f"127.0.0.1:{port} cannot be reached" in body["error"]["message"]
        async with s.post(keyed.make_url("/admin/api/hf/download"), json={"repo_id": "org/name"}) as r:
            assert r.status == 502


async def test_an_open_log_stream_ends_when_the_server_stops(model_dir, tmp_path):
    server = await start(model_dir, tmp_path / "home")
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as s:
        async with s.get(server.make_url("/admin/api/logs/stream")) as stream:
            assert stream.status == 200
            stopping = asyncio.ensure_future(server.close())
            # The stream finishes (rather than holding the stop up until handlers are cancelled).
            while await asyncio.wait_for(stream.content.readline(), 30):
                pass
            await asyncio.wait_for(stopping, 30)


async def test_guessing_the_key_through_the_login_is_throttled(keyed):
    async with aiohttp.ClientSession() as s:
        for _ in range(MAX_FAILED_LOGINS):
            assert (await login(s, keyed, "sk-guess"))[0] == 401
        async with s.post(keyed.make_url("/admin/api/login"), json={"api_key": KEY}) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == "too_many_failed_logins"


def test_failed_logins_are_forgotten_after_the_window():
    access = AdminAccess(Sessions(b"s" * 32))
    for i in range(MAX_FAILED_LOGINS):
        access.login_failed("10.0.0.1", now=100.0 + i)
    assert access.login_blocked_for("10.0.0.1", now=110.0) > 0
    assert access.login_blocked_for("10.0.0.2", now=110.0) == 0  # others are not affected
    assert access.login_blocked_for("10.0.0.1", now=100.0 + FAILED_LOGIN_WINDOW_S + MAX_FAILED_LOGINS) == 0
