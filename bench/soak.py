"""Soak test: many clients for a fixed time, then check the server is as it was.

Each client loops until the time is up, picking at random: an API family (chat, completions,
messages, responses), streaming or not, `n` > 1, a JSON constraint, stop strings, a sampling
temperature and seed, and a fate: read to the end, disconnect after a few events, or cancel
before the answer.  A canary client asks the same greedy question throughout; its answer must
never change.  Afterwards the engine must go idle with no sequence left and no KV block held
(blocks kept by the prefix cache are free), no request may have got a 5xx or a broken stream,
and the server's RSS must be back within a margin of what it was after warm-up (less the KV
pools, which grow up to their configured cap when the prefix cache fills them; both figures
read after `SETTLE_S` of quiet).  The report follows the memory along the way (RSS, MLX's
arrays and cache, malloc's free chunks: `memory_timeline_mib`).

    python bench/soak.py --minutes 30 --clients 32           # builds a tiny model, starts omlx
    python bench/soak.py --minutes 10 --clients 64 --shape llama-85m
    python bench/soak.py --url http://127.0.0.1:8000 --model M --minutes 60

Prints a JSON report (and writes it with --out); exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CANARY_PROMPT = "List three colours."
RSS_MARGIN = 0.25  # end RSS may exceed the post-warm-up RSS by this fraction...
RSS_SLACK_BYTES = 64 << 20  # ...plus this much (allocator and interpreter noise)
SETTLE_S = 10.0  # quiet time before the end RSS is read (the server trims its heap after 4-6 s)


def kv_pool_bytes(state: dict) -> int:
    """Bytes of the loaded models' KV pools.  A pool starts at half its cap and doubles when
    the prefix cache fills it (`--kv-cache-gb` bounds it); that growth is the cache working as
    configured, so the RSS check leaves it out and counts only what else the process holds."""
    return sum(m.get("kv_cache", {}).get("bytes", 0) for m in state["models_loaded"].values())


@dataclass
class Tally:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list = field(default_factory=list)  # (what, status, body) of each 5xx
    broken_streams: list = field(default_factory=list)  # streams that ended without their final event
    disconnects: int = 0
    cancellations: int = 0
    stream_errors: Counter = field(default_factory=Counter)  # in-stream error events by code


# ---------------------------------------------------------------------------- requests


def _request(rng: random.Random, model: str) -> tuple[str, str, dict, bool]:
    """(family, path, body, stream) of one random request."""
    family = rng.choice(["chat", "completions", "messages", "responses"])
    stream = rng.random() < 0.8
    max_tokens = rng.randint(1, 48)
    sampling = {"temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
    text = rng.choice(["Tell me a story.", "What is 2+2?", "Write JSON about a cat.", "Count to ten. " * rng.randint(1, 20)])
    stop = rng.sample(["e", " the", ".", "\n", "}"], rng.randint(1, 2)) if rng.random() < 0.2 else None
    if family == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "stream": stream, **sampling}
        if rng.random() < 0.2:
            body["n"] = rng.randint(2, 3)
        if rng.random() < 0.15:
            body["response_format"] = {"type": "json_object"}
        if stop:
            body["stop"] = stop
        return family, "/v1/chat/completions", body, stream
    if family == "completions":
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "stream": stream, **sampling}
        if rng.random() < 0.2:
            body["n"] = rng.randint(2, 3)
        if stop:
            body["stop"] = stop
        return family, "/v1/completions", body, stream
    if family == "messages":
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "stream": stream, "temperature": min(sampling["temperature"], 1.0)}
        if stop:
            body["stop_sequences"] = stop
        return family, "/v1/messages", body, stream
    body = {"model": model, "input": text, "max_output_tokens": max_tokens, "stream": stream, "store": False,
            **sampling}
    if rng.random() < 0.15:
        body["text"] = {"format": {"type": "json_object"}}
    return family, "/v1/responses", body, stream


def _final(family: str, name: str | None, data) -> bool:
    """Whether an SSE event ends its family's stream normally."""
    if family in ("chat", "completions"):
        return data == "[DONE]"
    if family == "messages":
        return name == "message_stop"
    return name in ("response.completed", "response.incomplete")


def _error_code(family: str, name: str | None, data) -> str | None:
    if not isinstance(data, dict):
        return None
    if family == "messages" and name == "error":
        return data["error"]["type"]
    if family == "responses" and name in ("error", "response.failed"):
        return data.get("code") or "failed"
    if "error" in data and family in ("chat", "completions"):
        return data["error"].get("code") or data["error"].get("type")
    return None


async def _events(response: aiohttp.ClientResponse):
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            name, data = None, []
            for line in block.decode().splitlines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            if data:
                payload = "\n".join(data)
                yield name, payload if payload == "[DONE]" else json.loads(payload)


async def one_request(session: aiohttp.ClientSession, root: str, rng: random.Random, model: str, tally: Tally) -> None:
    family, path, body, stream = _request(rng, model)
    fate = rng.random()
    tally.requests += 1
    cancel_after = rng.uniform(0.01, 0.5) if fate < 0.1 else None
    disconnect_after = rng.randint(1, 8) if stream and 0.1 <= fate < 0.35 else None

    async def run() -> None:
        async with session.post(root + path, json=body) as response:
            tally.statuses[response.status] += 1
            if response.status >= 500:
                tally.server_errors.append((path, response.status, (await response.text())[:500]))
                return
            if not stream or response.status != 200:
                await response.read()
                return
            seen, ended = 0, False
            async for name, data in _events(response):
                seen += 1
                code = _error_code(family, name, data)
                if code is not None:
                    tally.stream_errors[code] += 1
                    ended = True  # an error event is a stream's proper end (a timeout, overload)
                if _final(family, name, data):
                    ended = True
                if disconnect_after is not None and seen >= disconnect_after:
                    tally.disconnects += 1
                    return  # leaving the context manager closes the connection mid-stream
            if not ended:
                tally.broken_streams.append((path, seen))

    if cancel_after is None:
        await run()
        return
    try:
        await asyncio.wait_for(run(), cancel_after)
    except asyncio.TimeoutError:
        tally.cancellations += 1


async def client(session, root: str, model: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            await one_request(session, root, rng, model, tally)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tally.broken_streams.append(("connection", repr(exc)))


async def canary(session, root: str, model: str, deadline: float, answers: list[str]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": CANARY_PROMPT}], "max_tokens": 16,
            "temperature": 0.0}
    while True:
        async with session.post(root + "/v1/chat/completions", json=body) as response:
            data = await response.json()
            answers.append(data["choices"][0]["message"]["content"] if response.status == 200 else f"HTTP {response.status}")
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(1.0)


# ---------------------------------------------------------------------------- the run


def health(root: str) -> dict:
    with urllib.request.urlopen(root + "/health", timeout=30) as response:
        return json.loads(response.read())


def wait_idle(root: str, limit_s: float = 120.0) -> dict:
    deadline = time.monotonic() + limit_s
    while True:
        state = health(root)
        models = state["models_loaded"].values()
        if all(m["running"] == 0 and m["waiting"] == 0 and m.get("queued", 0) == 0 for m in models):
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def memory_sample(state: dict, elapsed: float, requests: int) -> dict:
    """One point of the memory timeline, in MiB: RSS, RSS less the KV pools, MLX's arrays
    and buffer cache, malloc's free chunks (where /health reports them)."""
    process, kv = state["process"], kv_pool_bytes(state)
    caches = process.get("allocator_caches", {})
    mib = lambda n: None if n is None else round(n / 2**20, 1)  # noqa: E731
    return {"s": round(elapsed, 1), "requests": requests, "rss": mib(process["rss_bytes"]),
            "rss_less_kv": mib(process["rss_bytes"] - kv), "kv_pools": mib(kv),
            "mlx_active": mib(caches.get("mlx", {}).get("active_bytes")),
            "mlx_cache": mib(caches.get("mlx", {}).get("cache_bytes")),
            "malloc_free": mib(caches.get("malloc", {}).get("free_bytes"))}


async def soak(root: str, model: str, clients: int, seconds: float, seed: int, sample_s: float = 30.0,
               settle_s: float = SETTLE_S) -> dict:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        # Warm-up: every family once, so the model, its grammar engine and pools are loaded
        # before the reference RSS is taken.
        warm = Tally()
        rng = random.Random(seed)
        for _ in range(8):
            await one_request(session, root, rng, model, warm)
        wait_idle(root)
        time.sleep(settle_s)  # settled like the end figure, so the two compare
        state = health(root)
        start, kv_start = state["process"]["rss_bytes"], kv_pool_bytes(state)
        tally, answers = Tally(), []
        deadline = time.monotonic() + seconds
        peak = start
        tasks = [asyncio.ensure_future(client(session, root, model, seed + 1 + i, deadline, tally)) for i in range(clients)]
        tasks.append(asyncio.ensure_future(canary(session, root, model, deadline, answers)))
        pending = set(tasks)
        began, timeline = time.monotonic(), [memory_sample(state, 0.0, 0)]
        while pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
            now = health(root)
            peak = max(peak, now["process"]["rss_bytes"])
            elapsed = time.monotonic() - began
            if elapsed - timeline[-1]["s"] >= sample_s:
                timeline.append(memory_sample(now, elapsed, tally.requests))
        for task in tasks:
            task.result()  # a client that crashed is the soak's bug: let it show
    wait_idle(root)
    # The server gives its freed heap back once it has been quiet a few seconds
    # (omlx.allocator_caches.HeapTrimmer): the end figure is the settled one.
    time.sleep(settle_s)
    idle = wait_idle(root)
    end, kv_end = idle["process"]["rss_bytes"], kv_pool_bytes(idle)
    timeline.append(memory_sample(idle, time.monotonic() - began, tally.requests) | {"idle": True})
    models = idle["models_loaded"]
    report = {
        "clients": clients,
        "seconds": seconds,
        "requests": tally.requests,
        "statuses": dict(sorted(tally.statuses.items())),
        "server_errors": len(tally.server_errors),
        "server_error_samples": tally.server_errors[:5],
        "broken_streams": len(tally.broken_streams),
        "broken_stream_samples": tally.broken_streams[:5],
        "stream_errors": dict(tally.stream_errors),
        "disconnects": tally.disconnects,
        "cancellations": tally.cancellations,
        "canary_answers": len(answers),
        "canary_distinct": sorted(set(answers)),
        "sequences_left": sum(m["running"] + m["waiting"] for m in models.values()),
        "leaked_blocks": sum(m["kv_cache"]["used_blocks"] for m in models.values()),
        "rss_bytes": {"start": start, "peak": peak, "end": end},
        "kv_pool_bytes": {"start": kv_start, "end": kv_end},
        "rss_without_kv_pool_bytes": {"start": start - kv_start, "end": end - kv_end},
        # Where the memory was along the way (MiB): what grew, and when.
        "memory_timeline_mib": timeline,
        "allocator_caches": {"start": state["process"].get("allocator_caches"),
                             "end": idle["process"].get("allocator_caches")},
    }
    report["checks"] = {
        "no_5xx": report["server_errors"] == 0,
        "no_broken_streams": report["broken_streams"] == 0,
        "no_sequences_left": report["sequences_left"] == 0,
        "no_leaked_blocks": report["leaked_blocks"] == 0,
        "canary_unchanged": len(report["canary_distinct"]) == 1 and not report["canary_distinct"][0].startswith("HTTP"),
        "rss_back": end - kv_end <= (start - kv_start) * (1 + RSS_MARGIN) + RSS_SLACK_BYTES,
    }
    report["passed"] = all(report["checks"].values())
    return report


# Models the soak can build and serve (--shape), by name (their model id).  The 85M llama
# (GPT-2-small-sized, float32 weights of 343 MB) is where the RSS growth of issue #24 was seen:
# its activations and KV layer arrays are big enough to meet glibc's mmap threshold.
SHAPES = {
    "tiny": dict(max_position_embeddings=8192),
    "llama-85m": dict(model_type="llama", hidden_size=768, num_hidden_layers=12, intermediate_size=2304,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, vocab_size=2048,
                      max_position_embeddings=8192, logit_scale=4.0),
}


def start_server(work: Path, port: int, shape: str = "tiny", kv_cache_gb: float = 0.5) -> subprocess.Popen:
    """A server on a freshly built model of `shape` (repo checkout on PYTHONPATH)."""
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from omlx.testing.tiny_models import TinyModelSpec, build_model

    models = work / "models"
    build_model(models / shape, TinyModelSpec(**SHAPES[shape]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    env.update(OMLX_HOME=str(work / "home"), PYTHONPATH=str(repo))
    log = open(work / "omlx.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "omlx", "serve", "--model-dir", str(models), "--port", str(port),
                                "--no-demo", "--no-hf-cache", "--kv-cache-gb", str(kv_cache_gb)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            health(root)
            return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    raise SystemExit(f"omlx did not start; see {work / 'omlx.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one on a tiny model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="the model to build and serve when no --url is given")
    parser.add_argument("--kv-cache-gb", type=float, default=0.5,
                        help="the started server's KV cap (its pool starts at half and doubles once the prefix cache fills it)")
    parser.add_argument("--model", help="the model id to ask for (default: the --shape's name)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, help="instead of --minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=18555)
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between memory timeline points")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    process = None
    with tempfile.TemporaryDirectory(prefix="omlx-soak-") as work:
        root = args.url
        if root is None:
            process = start_server(Path(work), args.port, args.shape, args.kv_cache_gb)
            root = f"http://127.0.0.1:{args.port}"
        try:
            report = asyncio.run(soak(root.rstrip("/"), args.model or args.shape, args.clients, seconds, args.seed,
                                      args.sample_s))
        finally:
            if process is not None:
                process.terminate()
                report_exit = process.wait(timeout=120)
        if process is not None:
            report["server_exit_status"] = report_exit
            report["checks"]["clean_exit"] = report_exit == 0
            report["passed"] = all(report["checks"].values())
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
