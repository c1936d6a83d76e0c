"""Hostile input against a live server: schemathesis from /openapi.json for a bounded time,
and hypothesis-made malformed bodies per API family (wrong types, deep nesting, unicode,
huge numbers, huge strings).  Nothing may answer 5xx, every error must be in its family's
shape, and the server must serve normally afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omlx_process import omlx_server
from omlx.testing.tiny_models import TinyModelSpec, build_model
from omlx.testing.tiny_rerankers import build_cross_encoder_folder

MODEL = "tiny"
RERANKER = "tiny-reranker"
FUZZ_SECONDS = 30  # schemathesis' time budget in CI; run it longer by hand with OMLX_FUZZ_SECONDS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_model(root / MODEL, TinyModelSpec())
    build_cross_encoder_folder(root / RERANKER)  # so /v1/rerank is fuzzed with a model behind it
    workdir = tmp_path_factory.mktemp("fuzz")
    # A real MCP server, so the /v1/mcp routes are fuzzed working (without a config they
    # answer 503 by design); its tools are not offered to the model (--no-mcp-tools), which
    # would not fit the short context.
    mcp_config = workdir / "mcp.json"
    mcp_config.write_text(json.dumps({"servers": {"tools": {
        "command": sys.executable, "args": [str(Path(__file__).parent / "mcp_servers" / "tools_server.py"), "stdio"],
        "timeout": 5}}}))
    # A short context keeps every generated request cheap (longer asks are a 400).
    with omlx_server(root, workdir, "--max-model-len", "128", "--kv-cache-gb", "0.05",
                     "--mcp-config", str(mcp_config), "--no-mcp-tools", failure=pytest.fail) as running:
        yield running


def _post(server, path: str, raw: bytes) -> tuple[int, object]:
    request = urllib.request.Request(server.root + path, data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body  # a stream: its events are checked by the stream tests


def _assert_family_error(path: str, status: int, body) -> None:
    assert status < 500, (path, status, body)
    if status < 400:
        return
    if path.startswith("/v1/messages"):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str), body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body


# ---------------------------------------------------------------------------- /openapi.json


def test_openapi_document_describes_every_route(server):
    with urllib.request.urlopen(server.root + "/openapi.json", timeout=30) as response:
        doc = json.loads(response.read())
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/messages", "post"),
                         ("/v1/messages/count_tokens", "post"), ("/v1/responses", "post"),
                         ("/v1/responses/{response_id}", "get"), ("/v1/responses/{response_id}", "delete"),
                         ("/v1/embeddings", "post"), ("/v1/rerank", "post"), ("/v2/rerank", "post"),
                         ("/v1/models", "get"), ("/v1/models/{model_id}", "get"),
                         ("/health", "get")]:
        assert method in paths.get(path, {}), (path, method)
    chat = paths["/v1/chat/completions"]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["model"] == {"enum": [MODEL]}
    assert schema["properties"]["temperature"]["maximum"] == 2.0  # OpenAI's range, from the parser's table
    rerank = paths["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert rerank["properties"]["model"] == {"enum": [RERANKER]}
    assert rerank["required"] == ["query", "documents"]
    messages = paths["/v1/messages"]["post"]
    assert messages["responses"]["529"]["content"]["application/json"]["schema"]["$ref"].endswith("AnthropicError")
    assert messages["requestBody"]["content"]["application/json"]["schema"]["properties"]["temperature"]["maximum"] == 1.0


def test_schemathesis_finds_no_server_error_and_the_server_serves_afterwards(server, tmp_path):
    import os

    seconds = int(os.environ.get("OMLX_FUZZ_SECONDS", FUZZ_SECONDS))
    st_cli = Path(sys.executable).parent / "st"
    run = subprocess.run(
        [str(st_cli), "run", server.root + "/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
         "--max-time", str(seconds), "--workers", "1", "--request-timeout", "60", "--continue-on-failure",
         "--generation-database", "none", "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=seconds + 240,
    )
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "passed" in report and "generated" in report, report
    # Still serving: a model loads and answers.
    status, body = _post(server, "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body
    assert server.health()["status"] == "ok"


# ---------------------------------------------------------------------------- hypothesis

BASES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    "/v1/messages": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 2},
    "/v1/rerank": {"model": RERANKER, "query": "hi", "documents": ["a", {"text": "b"}]},
}
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                             "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
                             "stream_options", "chat_template_kwargs", "max_completion_tokens", "presence_penalty"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "echo", "logprobs", "stop", "n", "top_k"],
    "/v1/messages": ["model", "messages", "max_tokens", "system", "stop_sequences", "tools", "tool_choice",
                     "thinking", "temperature", "top_k", "metadata"],
    "/v1/responses": ["model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "text",
                      "reasoning", "previous_response_id", "store", "temperature", "metadata"],
    "/v1/rerank": ["model", "query", "documents", "top_n", "top_k", "return_documents", "max_chunks_per_doc",
                   "max_tokens_per_doc", "instruction"],
}

_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),  # past int64 and float range alike
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),  # any unicode, surrogates excluded (JSON cannot carry them)
    st.sampled_from(["", "\x00", "user", "assistant", "system", "tool", "function", "text", "\u202e\ufeff"]),
)
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                     max_leaves=20)


def _deep(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value] if depth % 2 else {"a": value}
    return value


_hostile = st.one_of(_json, st.integers(min_value=1, max_value=400).map(_deep),
                     st.sampled_from(["y" * (300 << 10), ["z" * 1000] * 200]))


@st.composite
def malformed(draw):
    path = draw(st.sampled_from(sorted(BASES)))
    body = dict(BASES[path])
    kind = draw(st.sampled_from(["field", "field", "nested", "body"]))
    if kind == "body":  # not an object at all, or a random one
        return path, json.dumps(draw(_hostile)).encode()
    field = draw(st.sampled_from(FIELDS[path]))
    value = draw(_hostile)
    if kind == "nested" and isinstance(body.get(field), list) and body[field] and isinstance(body[field][0], dict):
        inner = dict(body[field][0])
        inner[draw(st.sampled_from(sorted(inner) + ["content", "role", "type"]))] = value
        value = [inner]
    body[field] = value
    return path, json.dumps(body).encode()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=malformed())
def test_malformed_bodies_get_a_family_shaped_4xx_never_a_5xx(server, case):
    path, raw = case
    status, body = _post(server, path, raw)
    _assert_family_error(path, status, body)


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
    b'"max_tokens": 1e999}', b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": '
    b'"\\ud800"}]}', b'{"model": "tiny", "prompt": "hi", "max_tokens": 123456789012345678901234567890}',
])
@pytest.mark.parametrize("path", sorted(BASES))
def test_broken_json_gets_a_family_shaped_400(server, path, raw):
    status, body = _post(server, path, raw)
    assert 400 <= status < 500, (status, body)
    _assert_family_error(path, status, body)


def test_top_p_zero_keeps_the_most_likely_token(server):
    """top_p 0 keeps only the top token (it once kept none, and speculative verification
    crashed on the empty distribution): sampled output equals greedy output."""
    def ask(**sampling):
        status, body = _post(server, "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "one two three", "max_tokens": 12, **sampling}).encode())
        assert status == 200, body
        return body["choices"][0]["text"]

    assert ask(temperature=1.0, top_p=0.0, seed=7) == ask(temperature=0.0)


def test_a_vanishing_temperature_decodes_greedily(server):
    """A temperature that underflows float32 once meant dividing logits by zero (a 500)."""
    def ask(**sampling):
        status, body = _post(server, "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "one two three", "max_tokens": 12, **sampling}).encode())
        assert status == 200, body
        return body["choices"][0]["text"]

    assert ask(temperature=3.8e-219, top_k=5) == ask(temperature=1e-9) == ask(temperature=0.0)
