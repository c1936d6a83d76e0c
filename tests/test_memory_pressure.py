"""A machine short of memory: generation requests are refused with 503 (529 on Anthropic's
route) and Retry-After before any model is loaded, /health says so, and nothing crashes.
The shortage is made by asking the server to keep more memory free than the machine has."""

from __future__ import annotations

import pytest

from omlx_process import omlx_server
from omlx.testing.tiny_models import TinyModelSpec, build_model
from sse_client import call


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_model(root / "tiny", TinyModelSpec())
    with omlx_server(root, tmp_path_factory.mktemp("pressure"), "--memory-reserve", "100TB",
                     failure=pytest.fail) as running:
        yield running


def test_generation_is_refused_before_loading_and_health_reports_the_pressure(server):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, body, headers = call(server.base_url + "/chat/completions", "POST", chat)
    assert status == 503 and body["error"]["code"] == "insufficient_memory", body
    assert int(headers["Retry-After"]) >= 1
    status, body, headers = call(server.root + "/v1/messages", "POST", chat)
    assert status == 529 and body["error"]["type"] == "overloaded_error", body
    status, body, _ = call(server.base_url + "/responses", "POST", {"model": "tiny", "input": "hi"})
    assert status == 503 and body["error"]["code"] == "insufficient_memory", body
    health = server.health()
    assert health["machine_memory"]["pressure"] is True
    assert health["machine_memory"]["available_bytes"] < health["machine_memory"]["reserve_bytes"]
    assert health["models_loaded"] == {}  # refused before anything was loaded
    assert health["process"]["rss_bytes"] > 0 and health["process"]["pid"] == server.process.pid
    # Listing and counting still work: only what would allocate is refused.
    status, body, _ = call(server.base_url + "/models")
    assert status == 200 and any(m["id"] == "tiny" for m in body["data"])
