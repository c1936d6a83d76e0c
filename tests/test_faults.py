"""Faults around a running server: each is logged, degrades only its own feature, and every
request either completes or gets a clear error.

- the disk tier's directory full (or read-only): writes pause with one warning, the cache
  goes on in memory, outputs are unchanged, no half-written file;
- the disk tier's directory unusable at start: the model serves without it;
- the response store unwritable: responses still answer; lookups say what is wrong;
- a model folder deleted while loaded: requests in flight finish, the model is unloaded,
  later requests get 404; a folder corrupted while loaded: its reload is a clear error;
- a tokenizer that raises on some token: that request ends with a clear error;
- a streaming client that stops reading: dropped after the write timeout, its request aborted.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import shutil
import socket
import time

import aiohttp
import pytest
from mlx_lm import load

from omlx.scheduler import EngineConfig, FinishReason, GenerationRequest, LLMEngine, TokenEvent
from omlx.scheduler.disk import block_file
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model
from omlx_process import omlx_server
from robust_helpers import ENDLESS, EventStream, build_endless_dir, is_content, stream_body
from sse_client import call

BLOCK = 16


# ---------------------------------------------------------------------------- disk tier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("disk") / "m", TinyModelSpec(seed=4))
    model, tokenizer = load(str(path))
    return model, frozenset(tokenizer.eos_token_ids)


def _generate(engine: LLMEngine, prompt: list[int], eos, rid: str) -> list[int]:
    engine.add_request(GenerationRequest(rid, prompt, 8, stop_token_ids=eos))
    tokens = []
    while engine.has_work:
        for _, event in engine.step():
            if event.token_id is not None:
                tokens.append(event.token_id)
    return tokens


@pytest.mark.slow
def test_a_full_disk_pauses_the_tier_with_one_warning_and_changes_no_output(tiny, tmp_path, monkeypatch, caplog):
    model, eos = tiny
    config = EngineConfig(block_size=BLOCK, num_blocks=64, max_num_batched_tokens=64,
                          kv_cache_dir=str(tmp_path), kv_disk_bytes=1 << 30)
    engine = LLMEngine(model, config, context_window=4096, scope=b"full-disk")
    real_write = block_file.write

    def full(path, *args):
        # A partial file first, as a real ENOSPC leaves one, then the failure.
        tmp = path.with_name(f".{path.name}.partial.tmp")
        tmp.write_bytes(b"x" * 10)
        tmp.unlink()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(block_file, "write", full)
    prompts = [[(7 * i + j) % 400 + 5 for j in range(100)] for i in range(3)]  # 6 full blocks each
    with caplog.at_level(logging.WARNING, logger="omlx.disk_cache"):
        for i, prompt in enumerate(prompts):
            assert _generate(engine, prompt, eos, f"r{i}") == greedy_reference(model, prompt, 8, eos)
            engine.disk.flush()
    stats = engine.disk.stats()
    assert stats["write_failures"] >= 1 and stats["writes_paused"] and stats["written_blocks"] == 0
    warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)  # no traceback per block
    assert engine.blocks.leaked_blocks() == []
    # Space again: once the pause is over, blocks are written as before.
    monkeypatch.setattr(block_file, "write", real_write)
    engine.disk._writes_paused_until = 0.0
    fresh = [(11 * j) % 300 + 9 for j in range(100)]
    assert _generate(engine, fresh, eos, "after") == greedy_reference(model, fresh, 8, eos)
    engine.disk.flush()
    assert engine.disk.stats()["written_blocks"] > 0
    assert not list(tmp_path.rglob("*.tmp"))
    engine.close()


# ---------------------------------------------------------------------------- tokenizer


class _Detokenizer:
    """Streams token ids as text; token 13 is one this tokenizer cannot decode."""

    def __init__(self):
        self.last_segment = ""

    def reset(self):
        self.last_segment = ""

    def add_token(self, token_id):
        if token_id == 13:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        self.last_segment = f"<{token_id}>"

    def finalize(self):
        self.last_segment = ""


class _Tokenizer:
    _detokenizer = _Detokenizer()


class _Model:
    """The slice of a LoadedModel a GenerationStream uses, with scripted engine events."""

    model_id = "scripted"
    tokenizer = _Tokenizer()

    def __init__(self, tokens):
        self.tokens = tokens
        self.closed = False

    async def generate(self, request):
        try:
            for token in self.tokens:
                yield TokenEvent(token)
            yield TokenEvent(None, FinishReason.LENGTH)
        finally:
            self.closed = True  # the consumer left: the engine would abort the request here


async def test_a_tokenizer_that_raises_ends_only_that_request_with_a_clear_error():
    from omlx.api.generation import EngineFailure, GenerationStream

    good = GenerationStream(_Model([1, 2, 3]), GenerationRequest("ok", [1], 3), [])
    assert [d async for d in good] == ["<1>", "<2>", "<3>"]

    broken_model = _Model([1, 13, 2])
    broken = GenerationStream(broken_model, GenerationRequest("bad", [1], 3), [])
    seen = []
    with pytest.raises(EngineFailure) as raised:
        async for delta in broken:
            seen.append(delta)
    assert seen == ["<1>"] and broken_model.closed
    error = raised.value.api_error()
    assert error.code == "tokenizer_error" and "token 13" in error.message and error.status == 500


# ---------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_endless_dir(tmp_path_factory.mktemp("models"))
    for name, seed in (("doomed", 5), ("corrupted", 6)):
        build_model(root / name, TinyModelSpec(seed=seed))
    work = tmp_path_factory.mktemp("faults")
    home = work / "home"
    home.mkdir()
    (home / "responses").write_text("a file where the response store's directory should be")
    blocker = work / "not-a-dir"
    blocker.write_text("")
    with omlx_server(root, work, "--kv-cache-dir", str(blocker / "cache"), "--kv-cache-gb", "0.2",
                     "--client-write-timeout", "1", failure=pytest.fail) as running:
        yield running


def test_an_unusable_disk_tier_directory_leaves_the_model_serving(server):
    status, body, _ = call(server.base_url + "/completions", "POST", {"model": "corrupted", "prompt": "hi", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert "KV disk cache disabled" in server.log_path.read_text()


async def test_an_unwritable_response_store_still_answers(server):
    body = {"model": ENDLESS, "input": "hi", "max_output_tokens": 4}
    status, answer, _ = call(server.base_url + "/responses", "POST", body)
    assert status == 200 and answer["status"] == "incomplete" and answer["output"], answer
    async with aiohttp.ClientSession() as session:
        path, streamed = stream_body("responses", 4)
        events = await EventStream(await session.post(server.root + path, json=streamed)).rest()
    assert events[-1][0] == "response.incomplete"
    status, lookup, _ = call(server.base_url + f"/responses/{answer['id']}")
    assert status == 404, lookup  # it could not be stored
    status, deleted, _ = call(server.base_url + f"/responses/{answer['id']}", "DELETE")
    assert status == 503 and deleted["error"]["code"] == "response_store_unavailable", deleted
    assert "cannot store response" in server.log_path.read_text()


async def test_a_model_folder_deleted_while_loaded_finishes_its_streams_then_unloads(server):
    folder = server.model_path("doomed")
    async with aiohttp.ClientSession() as session:
        body = {"model": "doomed", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stream": True}
        stream = EventStream(await session.post(server.root + "/v1/completions", json=body))
        while not is_content("completions", await stream.next()):
            pass
        shutil.rmtree(folder)  # mid-stream
        events = await stream.rest()
    assert events[-1][1] == "[DONE]"  # the request in flight completed
    deadline = time.monotonic() + 30
    while "doomed" in server.health()["models_loaded"]:
        assert time.monotonic() < deadline, "the vanished model stayed loaded"
        await asyncio.sleep(0.2)
    status, body, _ = call(server.base_url + "/completions", "POST", {"model": "doomed", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "was removed while it was loaded" in server.log_path.read_text()
    status, _, _ = call(server.base_url + "/completions", "POST", {"model": ENDLESS, "prompt": "hi", "max_tokens": 2})
    assert status == 200


def test_a_model_corrupted_while_loaded_serves_until_reloaded_then_errors_clearly(server):
    ask = {"model": "corrupted", "prompt": "hi", "max_tokens": 2}
    assert call(server.base_url + "/completions", "POST", ask)[0] == 200
    weights = server.model_path("corrupted") / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 100)
    assert call(server.base_url + "/completions", "POST", ask)[0] == 200  # still in memory
    status, _, _ = call(server.base_url + "/models/corrupted/unload", "POST")
    assert status == 200
    status, body, _ = call(server.base_url + "/completions", "POST", ask)
    assert status == 500 and body["error"]["code"] == "model_load_failed", body
    assert "corrupted" in body["error"]["message"]
    status, _, _ = call(server.base_url + "/completions", "POST", {"model": ENDLESS, "prompt": "hi", "max_tokens": 2})
    assert status == 200  # everyone else is served


# ---------------------------------------------------------------------------- out of memory


async def test_an_allocation_failure_in_a_step_fails_that_step_only_and_the_engine_serves_on(tiny, monkeypatch):
    from omlx.api.generation import EngineFailure
    from omlx.scheduler import AsyncEngine

    model, eos = tiny
    # One sequence per step: of three requests sent together, the first runs (and fails)
    # while the other two wait in the queue.
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=64, max_num_batched_tokens=64,
                                           max_num_seqs=1), context_window=4096)
    real_forward = engine.runner.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("[malloc] Unable to allocate 68719476736 bytes.")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", forward)
    running = AsyncEngine(engine)
    try:
        async def events_of(rid, prompt):
            return [e async for e in running.generate(GenerationRequest(rid, prompt, 6, stop_token_ids=eos))]

        prompts = [[5 + i, 9, 33, 70 + i] for i in range(3)]
        results = await asyncio.gather(*(events_of(f"oom{i}", p) for i, p in enumerate(prompts)))
        failed = [i for i, events in enumerate(results) if events[-1].error is not None]
        assert len(failed) == 1, [r[-1] for r in results]  # only the failed step's request
        events = results[failed[0]]
        assert events[-1].error_code == "out_of_memory" and "Unable to allocate" in events[-1].error
        error = EngineFailure(events[-1].error, "out_of_memory").api_error()
        assert error.status == 507 and error.code == "insufficient_memory" and "Retry-After" in error.headers
        # The queued requests carry on, token-exact.
        for i, events in enumerate(results):
            if i != failed[0]:
                assert [e.token_id for e in events if e.token_id is not None] == greedy_reference(model, prompts[i], 6, eos)
        # The engine goes on: the next request runs, token-exact, and nothing is held.
        after = await events_of("after", prompts[0])
        assert [e.token_id for e in after if e.token_id is not None] == greedy_reference(model, prompts[0], 6, eos)
        assert engine.blocks.leaked_blocks() == []
    finally:
        running.shutdown()


def test_a_client_that_stops_reading_is_dropped_and_its_request_aborted(server):
    host, port = server.root.removeprefix("http://").split(":")
    body = json.dumps({"model": ENDLESS, "messages": [{"role": "user", "content": "go"}], "max_tokens": 30000,
                       "temperature": 0, "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    sock.connect((host, int(port)))
    try:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 120
        seen_running = False
        while True:  # never read: the server's buffers fill, its write times out
            running = server.health()["models_loaded"].get(ENDLESS, {}).get("running", 0)
            seen_running |= running > 0
            if seen_running and running == 0:
                break
            assert time.monotonic() < deadline, "the stalled reader's request was never aborted"
            time.sleep(0.2)
    finally:
        sock.close()
    stats = server.health()["models_loaded"][ENDLESS]
    assert stats["kv_cache"]["used_blocks"] == 0 and stats["generated_tokens"] < 30000
