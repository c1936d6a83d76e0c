"""API keys on every route of the real application (routes enumerated from the router, so
routes added later are covered too): 401 in the route family's error shape without a valid
key, both header styles accepted, /health open, and keys never written to the log."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio

from omlx.api.auth import is_open_path, match_key
from omlx.api.errors import is_anthropic_route
from omlx.scheduler import EngineConfig
from omlx.server import ServerConfig
from omlx.testing.tiny_models import TinyModelSpec, build_model
from in_process_server import running_app

MAIN_KEY = "sk-main-0123456789abcdef"
NAMED_KEY = "sk-ci-fedcba9876543210"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("auth-models")
    build_model(root / "tiny", TinyModelSpec())
    return root


@pytest_asyncio.fixture(loop_scope="function")
async def app_server(model_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "settings.json").write_text(json.dumps({"api_keys": {"ci": NAMED_KEY}}))
    config = ServerConfig(model_dirs=[model_dir], engine=EngineConfig(block_size=16, num_blocks=64),
                          settings_home=home, api_key=MAIN_KEY, packaged_models=False)
    async with running_app(config) as server:
        yield server


def routes(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every registered route, path parameters filled in."""
    out = []
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS", "*"):
            continue
        path = route.resource.canonical
        out.append((route.method, re.sub(r"\{[^}]*\}", "tiny", path)))
    return out


async def fetch(server, method, path, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.make_url(path), headers=headers or {}, data=b"{}") as response:
            if response.content_type == "text/event-stream":  # a live stream (the admin log): never ends
                return response.status, None, response.headers
            # Errors are JSON; /metrics answers Prometheus text, the admin panel's shell HTML.
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else text
            return response.status, body, response.headers


@pytest.mark.slow
async def test_every_route_but_health_requires_a_key(app_server):
    checked = routes(app_server.app)
    assert ("POST", "/v1/chat/completions") in checked and ("GET", "/v1/models/status") in checked
    for method, path in checked:
        status, body, headers = await fetch(app_server, method, path)
        if path == "/health":
            assert status == 200
            continue
        if is_open_path(path):  # the admin panel's page, files and login: nothing to read there
            assert path.startswith("/admin") and status != 401, (method, path, status)
            continue
        assert status == 401, (method, path, status)
        if is_anthropic_route(path):
            assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        else:
            assert body["error"]["code"] == "invalid_api_key"
        assert "Missing API key" in body["error"]["message"]
        assert headers["WWW-Authenticate"].startswith("Bearer")

        for bad in ({"Authorization": "Bearer nope"}, {"x-api-key": MAIN_KEY[:-1]}, {"Authorization": MAIN_KEY}):
            status, body, _ = await fetch(app_server, method, path, bad)
            assert status == 401, (method, path, bad)

        for good in ({"Authorization": f"Bearer {MAIN_KEY}"}, {"x-api-key": MAIN_KEY},
                     {"Authorization": f"bearer {NAMED_KEY}"}):
            status, body, _ = await fetch(app_server, method, path, good)
            assert status != 401, (method, path, good, body)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_anthropic_routes_get_anthropic_shaped_401(app_server, path):
    status, body, _ = await fetch(app_server, "POST", path + "?beta=true", {"x-api-key": "wrong"})
    assert status == 401
    assert body == {"type": "error", "error": {"type": "authentication_error", "message": "Invalid API key."}}


async def test_openai_sdk_with_and_without_the_key(app_server):
    base = str(app_server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.models.list()
        assert info.value.status_code == 401
        assert info.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=base, api_key=NAMED_KEY, max_retries=0) as client:
        models = await client.models.list()
        assert "tiny" in {m.id for m in models.data}
        reply = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage.completion_tokens >= 1


async def test_named_keys_apply_without_restart_and_keys_are_never_logged(app_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    assert (await fetch(app_server, "GET", "/v1/models", {"x-api-key": "sk-late-key"}))[0] == 401
    (tmp_path / "home" / "settings.json").write_text(json.dumps({"api_keys": {"late": "sk-late-key"}}))
    assert (await fetch(app_server, "GET", "/v1/models", {"x-api-key": "sk-late-key"}))[0] == 200
    # The revoked named key no longer works; the --api-key one still does.
    assert (await fetch(app_server, "GET", "/v1/models", {"x-api-key": NAMED_KEY}))[0] == 401
    assert (await fetch(app_server, "GET", "/v1/models", {"x-api-key": MAIN_KEY}))[0] == 200
    assert "rejected a request" in caplog.text
    for key in (MAIN_KEY, NAMED_KEY, "sk-late-key"):
        assert key not in caplog.text


def test_match_key_names_the_key_and_rejects_near_misses():
    keys = {"default": "abc123", "ci": "xyz789"}
    assert match_key("xyz789", keys) == "ci"
    assert match_key("abc123", keys) == "default"
    assert match_key("abc12", keys) is None
    assert match_key("abc1234", keys) is None
    assert match_key("", keys) is None
