"""A stream with nothing to say for longer than its client's idle timeout (a long prefill, a
wait in the queue) stays open: each family sends, at the keepalive interval, an event of its
own stream that its clients count as activity and ignore (an empty chat delta, an empty text
completion, Anthropic's `ping`, the Responses `response.in_progress`); never an SSE comment
alone, which Codex CLI's idle timer does not count.  Next to each, a `: keepalive N/M` comment
reports the prompt's prefill progress as mlx_lm.server does.

The wait here is a real one: the request queues behind a stream holding the model's only
slot, and the SDK clients run with a 1 s timeout, well short of the wait.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from omlx_process import omlx_server
from robust_helpers import ENDLESS, EventStream, build_endless_dir, is_content, stream_body

HELD_S = 2.5  # how long the request waits; 2.5x the clients' idle timeout
CLIENT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_endless_dir(tmp_path_factory.mktemp("endless"))
    with omlx_server(root, tmp_path_factory.mktemp("keepalive"), "--max-num-seqs", "1", "--sse-keepalive", "0.2",
                     "--kv-cache-gb", "0.2", failure=pytest.fail) as running:
        yield running


async def _hold_slot(server, session: aiohttp.ClientSession) -> EventStream:
    path, body = stream_body("chat", 30000)
    response = await session.post(server.root + path, json=body)
    stream = EventStream(response)
    while not is_content("chat", await stream.next()):
        pass
    return stream


async def _release_later(blocker: EventStream) -> None:
    await asyncio.sleep(HELD_S)
    blocker.response.close()


async def _run_held(server, client_call):
    """Run `client_call()` while the model's only slot is held for HELD_S seconds."""
    async with aiohttp.ClientSession() as session:
        blocker = await _hold_slot(server, session)
        release = asyncio.ensure_future(_release_later(blocker))
        try:
            return await client_call()
        finally:
            await release


async def test_openai_chat_stream_outlives_the_client_idle_timeout(server):
    import openai

    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                  timeout=CLIENT_TIMEOUT_S) as client:
        async def chat():
            chunks = []
            stream = await client.chat.completions.create(
                model=ENDLESS, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)
            async for chunk in stream:
                chunks.append(chunk)
            return chunks

        chunks = await _run_held(server, chat)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "length"
    idle = [c for c in chunks if c.choices and c.choices[0].delta.content is None and c.choices[0].finish_reason is None
            and c.choices[0].delta.role is None]
    assert len(idle) >= 3  # the keepalive chunks, empty deltas the SDK passes through harmlessly


async def test_openai_completions_stream_outlives_the_client_idle_timeout(server):
    import openai

    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                  timeout=CLIENT_TIMEOUT_S) as client:
        async def complete():
            stream = await client.completions.create(model=ENDLESS, prompt="hi", max_tokens=6, temperature=0, stream=True)
            return [chunk async for chunk in stream]

        chunks = await _run_held(server, complete)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].text == "" and c.choices[0].finish_reason is None) >= 3


async def test_openai_responses_stream_outlives_the_client_idle_timeout(server):
    import openai

    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                  timeout=CLIENT_TIMEOUT_S) as client:
        async def respond():
            stream = await client.responses.create(model=ENDLESS, input="hi", max_output_tokens=6, temperature=0,
                                                   stream=True)
            return [event async for event in stream]

        events = await _run_held(server, respond)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert kinds.count("response.in_progress") >= 3
    # The repeats carry the same in-progress response: nothing in the output changes.
    assert {e.response.id for e in events if e.type == "response.in_progress"} == {events[0].response.id}
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_anthropic_stream_outlives_the_client_idle_timeout(server):
    import anthropic

    async with anthropic.AsyncAnthropic(base_url=server.root, api_key="x", max_retries=0,
                                        timeout=CLIENT_TIMEOUT_S) as client:
        async def message():
            stream = await client.messages.create(model=ENDLESS, max_tokens=6, stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
            return [event async for event in stream]

        events = await _run_held(server, message)
    kinds = [e.type for e in events]
    # The SDK swallows `ping` events (the raw stream's are counted in the last test); that it
    # waited out more than two of its timeouts without raising is the point here.
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds


async def test_every_family_keeps_sending_events_not_only_comments(server):
    """What Codex's idle timer sees: events (comments do not count) while the request waits."""
    async with aiohttp.ClientSession() as session:
        blocker = await _hold_slot(server, session)
        release = asyncio.ensure_future(_release_later(blocker))
        streams = {}
        for family in ("chat", "completions", "messages", "responses"):
            path, body = stream_body(family, 2)
            streams[family] = EventStream(await session.post(server.root + path, json=body))
        # Before the slot frees, each stream has already sent several events and no text.
        for family, stream in streams.items():
            for _ in range(3):
                event = await stream.next()
                assert event is not None and not is_content(family, event), (family, stream.events)
        await release
        for stream in streams.values():
            await stream.rest()
    assert all(any(is_content(f, e) for e in s.events) for f, s in streams.items())


async def test_keepalives_report_prompt_progress_in_mlx_lm_server_comments(server):
    """While queued: `: keepalive 0/M`, M the request's prompt tokens (what its usage says);
    the count never goes back."""
    async with aiohttp.ClientSession() as session:
        blocker = await _hold_slot(server, session)
        release = asyncio.ensure_future(_release_later(blocker))
        streams = {}
        for family in ("chat", "completions", "messages", "responses"):
            path, body = stream_body(family, 2)
            if family == "chat":
                body["stream_options"] = {"include_usage": True}
            streams[family] = EventStream(await session.post(server.root + path, json=body))
        await release
        for stream in streams.values():
            await stream.rest()
    for family, stream in streams.items():
        progress = [re.fullmatch(r"keepalive (\d+)/(\d+)", c) for c in stream.comments]
        assert progress and all(progress), (family, stream.comments)
        totals = {int(m.group(2)) for m in progress}
        assert len(totals) == 1 and totals.pop() > 0, (family, stream.comments)
        done = [int(m.group(1)) for m in progress]
        # Queued first (0 done); a slow step later on may add one with the prompt done.
        assert done[0] == 0 and done == sorted(done) and done[-1] <= int(progress[0].group(2)), (family, done)
    usage = [data for _, data in streams["chat"].events if isinstance(data, dict) and data.get("usage")]
    assert f"keepalive 0/{usage[-1]['usage']['prompt_tokens']}" in streams["chat"].comments
