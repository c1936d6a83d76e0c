"""Hostile request bodies and the stall they cause, shared by tests/test_hostile_requests.py and
bench/hostile_body_bench.py.

A hostile body is a request far too long for any context window but under the server's body
size limit (20 MiB of text in one message).  The server must answer it with its family's 4xx
quickly and, above all, keep answering everyone else meanwhile: `measure_stall` times a small
chat request alone, then again while `hostile` clients post such bodies back to back.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

WORDS = ("the cat sat on a mat while seven quick zebras jumped over lazy dogs near the river bank "
         "alpha beta gamma delta epsilon 12345 67890 hello world function return value").split()


def filler_text(n_bytes: int, seed: int = 0) -> str:
    """About `n_bytes` of plain words (ASCII: bytes == characters)."""
    rng = random.Random(seed)
    chunk = " ".join(rng.choice(WORDS) for _ in range(4096)) + " "
    return (chunk * (n_bytes // len(chunk) + 1))[:n_bytes]


def hostile_body(route: str, model: str, n_bytes: int = 20 << 20) -> bytes:
    """The JSON body of a request to `route` whose prompt is `n_bytes` of text."""
    text = filler_text(n_bytes)
    if route == "/v1/chat/completions":
        body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    elif route in ("/v1/messages", "/v1/messages/count_tokens"):
        body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    elif route == "/v1/responses":
        body = {"model": model, "max_output_tokens": 16, "input": text}
    elif route == "/v1/completions":
        body = {"model": model, "max_tokens": 8, "prompt": text}
    else:
        raise ValueError(f"no hostile body for {route}")
    return orjson.dumps(body)


# The small request generates this many tokens: on the test's tiny model on a 2-core machine
# it takes about 0.25 s alone, the one-line chat request of issue #24.
SMALL_TOKENS = 48


def many_messages_body(model: str, n_bytes: int = 20 << 20) -> bytes:
    """A chat body of about `n_bytes` made of tiny messages (~600k in 20 MiB): the other way to
    make a body expensive, per message rather than per character."""
    message = {"role": "user", "content": "hi"}
    count = n_bytes // len(orjson.dumps(message))
    messages = [message if i % 2 == 0 else {"role": "assistant", "content": "hi"} for i in range(count)]
    return orjson.dumps({"model": model, "max_tokens": 8, "messages": messages})


def small_body(model: str, max_tokens: int = SMALL_TOKENS) -> bytes:
    return orjson.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                         "messages": [{"role": "user", "content": "Say hello to the cat."}]})


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict, float]:
    """(status, JSON reply, seconds from sending to the whole answer)."""
    start = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        raw = await response.read()
        elapsed = time.perf_counter() - start
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        reply = {"raw": raw[:200].decode(errors="replace")}
    return response.status, reply, elapsed


@dataclass
class StallResult:
    alone_s: list[float]
    during_s: list[float]
    hostile_s: list[float] = field(default_factory=list)  # each hostile body's time to its answer
    hostile_statuses: list[int] = field(default_factory=list)

    @property
    def alone(self) -> float:
        return statistics.median(self.alone_s)

    @property
    def during(self) -> float:
        return statistics.median(self.during_s)

    @property
    def worst_during(self) -> float:
        return max(self.during_s)

    @property
    def ratio(self) -> float:
        return self.during / self.alone


async def measure_stall(root: str, model: str, hostile: int = 8, samples: int = 5,
                        body: bytes | None = None, route: str = "/v1/chat/completions",
                        small_tokens: int = SMALL_TOKENS) -> StallResult:
    """Small chat requests' latency alone and while `hostile` clients keep posting `body`
    (default: a 20 MiB chat body) to `route`, in pairs: each sample times one small request
    alone, then starts the hostile clients, times one more once every hostile client has a
    body in flight, and lets them finish.  Pairs see the same machine state, so the ratio
    holds on a machine whose load from other work comes and goes.  The hostile clients run in
    a process of their own, as other clients would: uploading 160 MiB does not slow the
    measuring client's own event loop."""
    body = body if body is not None else hostile_body(route, model)
    small = small_body(model, small_tokens)
    chat_url = root + "/v1/chat/completions"
    loop = asyncio.get_running_loop()
    result = StallResult([], [])
    with _hostile_process(root + route, body, hostile) as conn:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def small_request() -> float:
                status, reply, elapsed = await post(session, chat_url, small)
                if status != 200:
                    raise AssertionError(f"the small request failed: {status} {reply}")
                return elapsed

            await small_request()  # warm: the model loaded, the first prefill done
            for _ in range(samples):
                result.alone_s.append(await small_request())
                conn.send("attack")
                await loop.run_in_executor(None, conn.recv)  # every hostile client has sent a body
                await asyncio.sleep(0.05)  # the bodies are on their way, the server busy with them
                try:
                    result.during_s.append(await small_request())
                finally:
                    conn.send("stop")
                    times, statuses = await loop.run_in_executor(None, conn.recv)
                    result.hostile_s += times
                    result.hostile_statuses += statuses
    return result


@contextlib.contextmanager
def _hostile_process(url: str, body: bytes, hostile: int):
    """The hostile clients in a process of their own (`_hostile_clients`), for the block's
    length: yields the pipe that drives them ("attack" / "stop"), and ends the process after,
    killing it if it does not end in a minute."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    attackers = context.Process(target=_hostile_clients, args=(child_conn, url, body, hostile), daemon=True)
    attackers.start()
    try:
        yield conn
    finally:
        conn.send("quit")
        attackers.join(timeout=60)
        if attackers.is_alive():
            attackers.kill()


def _hostile_clients(conn, url: str, body: bytes, hostile: int) -> None:
    """The hostile clients' process: on "attack", `hostile` clients post `body` back to back
    (reporting once each has sent one) until "stop"; then their times and statuses go back."""

    async def attack() -> None:
        stop = asyncio.Event()
        started = [asyncio.Event() for _ in range(hostile)]
        times: list[float] = []
        statuses: list[int] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                         connector=aiohttp.TCPConnector(limit=hostile)) as session:

            async def client(sent: asyncio.Event) -> None:
                while not stop.is_set():
                    sent.set()
                    status, _, elapsed = await post(session, url, body)
                    times.append(elapsed)
                    statuses.append(status)

            tasks = [asyncio.create_task(client(e)) for e in started]
            await asyncio.gather(*(e.wait() for e in started))
            conn.send("started")
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        conn.send((times, statuses))

    while conn.recv() == "attack":
        asyncio.run(attack())


@dataclass
class LoopLag:
    alone_s: list[float]
    during_s: list[float]

    @staticmethod
    def quantile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[int(q * (len(ordered) - 1))]


async def measure_loop_lag(root: str, model: str, hostile: int = 8, seconds: float = 6.0,
                           body: bytes | None = None, route: str = "/v1/chat/completions") -> LoopLag:
    """`GET /health` latencies alone, then while `hostile` clients post `body` for `seconds`:
    /health is answered on the event loop with no engine work, so its latency is the loop's
    own lag (a stalled loop shows here first)."""
    body = body if body is not None else hostile_body(route, model)
    loop = asyncio.get_running_loop()
    lag = LoopLag([], [])
    with _hostile_process(root + route, body, hostile) as conn:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def health() -> float:
                start = time.perf_counter()
                async with session.get(root + "/health") as response:
                    await response.read()
                return time.perf_counter() - start

            for _ in range(20):
                lag.alone_s.append(await health())
                await asyncio.sleep(0.02)
            conn.send("attack")
            await loop.run_in_executor(None, conn.recv)
            deadline = time.perf_counter() + seconds
            try:
                while time.perf_counter() < deadline:
                    lag.during_s.append(await health())
                    await asyncio.sleep(0.02)
            finally:
                conn.send("stop")
                await loop.run_in_executor(None, conn.recv)
    return lag
