#!/usr/bin/env python
"""Serving benchmark: omlx against mlx_lm.server on the same model, prompts and concurrency.

Each round starts one server (never two at once), warms it up, runs one workload through
its streaming OpenAI chat endpoint with N concurrent clients, reads the server's peak RSS
and stops it again.  The servers alternate round by round.  A single-stream in-process
`mlx_lm.stream_generate` run gives the no-server baseline.  See bench/README.md.

    python bench/serving_bench.py --quick          # smoke run, a couple of minutes
    python bench/serving_bench.py                  # full run (~20 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from omlx.testing.tiny_models import WORDS as FIXTURE_WORDS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_MODEL = HERE / "models" / "bench-200m"
DEFAULT_OUT = HERE / "results"
DEFAULT_BLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

OMLX = "omlx"
MLX_LM = "mlx_lm.server"
BASELINE = "mlx_lm.stream_generate (in-process)"

# Prompt text is random words; most of these are single tokens in the fixture tokenizer, so
# token counts track word counts closely (the exact count is measured, not assumed).
WORDS = FIXTURE_WORDS

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- prompts


class PromptFactory:
    """Seeded random-word texts of a target token length, measured with the model's tokenizer."""

    def __init__(self, model_path: Path, seed: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self.rng = random.Random(seed)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def text(self, n_tokens: int) -> str:
        words = [self.rng.choice(WORDS) for _ in range(n_tokens)]
        # Trim or grow until the tokenized length is right (usually it already is).
        while len(words) > 1 and self.count(" ".join(words)) > n_tokens:
            words.pop()
        while self.count(" ".join(words)) < n_tokens:
            words.append(self.rng.choice(WORDS))
        return " ".join(words)


@dataclass
class Workload:
    name: str  # "chat" or "shared-prefix"
    concurrency: int
    # requests[client] = list of message lists, sent one after the other by that client
    requests: list[list[list[dict]]]
    max_tokens: int
    variant: str = ""  # label suffix, e.g. "distinct prefixes"

    @property
    def num_requests(self) -> int:
        return sum(len(r) for r in self.requests)


def chat_workload(factory: PromptFactory, concurrency: int, per_client: int, max_tokens: int,
                  lo: int, hi: int) -> Workload:
    requests = [
        [[{"role": "user", "content": factory.text(factory.rng.randint(lo, hi))}] for _ in range(per_client)]
        for _ in range(concurrency)
    ]
    return Workload("chat", concurrency, requests, max_tokens)


def shared_prefix_workloads(factory: PromptFactory, clients: int, system_tokens: int,
                            user_tokens: int, max_tokens: int) -> tuple[Workload, Workload]:
    """The same system prompt for every client, and a copy whose system prompts differ in
    their first words (so no two requests share a prefix block: the cache is defeated)."""
    system = factory.text(system_tokens)
    users = [factory.text(user_tokens) for _ in range(clients)]
    shared = [[[{"role": "system", "content": system}, {"role": "user", "content": u}]] for u in users]

    words = system.split(" ")
    distinct = []
    seen = set()
    for i in range(clients):
        # Replace the first two words with a pair unique to this client: same length,
        # different first tokens, hence different hashes for every prefix block.
        a, b = WORDS[i % len(WORDS)], WORDS[(i // len(WORDS) + 7 * i + 1) % len(WORDS)]
        while (a, b) in seen:
            b = factory.rng.choice(WORDS)
        seen.add((a, b))
        text = " ".join([a, b] + words[2:])
        distinct.append([[{"role": "system", "content": text}, {"role": "user", "content": users[i]}]])
    firsts = {tuple(factory.tokenizer.encode(r[0][0]["content"]).ids[:4]) for r in distinct}
    if len(firsts) != clients:
        raise RuntimeError("could not make every system prompt start differently")
    return (
        Workload("shared-prefix", clients, shared, max_tokens, "prefix cache on"),
        Workload("shared-prefix", clients, distinct, max_tokens, "distinct prefixes, cache defeated"),
    )


# ----------------------------------------------------------------------------- stats


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestResult:
    client: int
    start: float
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    content_chunks: int = 0
    completion_tokens: int | None = None  # from usage, when reported
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    error: str | None = None
    text: str = ""  # the streamed content (multi-turn workloads send it back)

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks

    @property
    def decode_tps(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None or self.tokens < 2:
            return None
        span = self.last_token_at - self.first_token_at
        return (self.tokens - 1) / span if span > 0 else None


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    decode = [r.decode_tps for r in ok if r.decode_tps is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "output_tokens": tokens,
        "agg_tok_s": tokens / wall if wall > 0 else None,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(itls, 50),
        "itl_p99": percentile(itls, 99),
        "decode_tok_s_per_stream_p50": percentile(decode, 50),
        "prompt_tokens_mean": (
            sum(r.prompt_tokens for r in ok if r.prompt_tokens is not None) / len(ok)
            if ok and all(r.prompt_tokens is not None for r in ok) else None
        ),
        "cached_prompt_tokens": sum(r.cached_tokens or 0 for r in ok),
        "usage_reported": all(r.completion_tokens is not None for r in ok) if ok else None,
        "finish_reasons": _counts(r.finish_reason for r in ok),
    }


def _counts(items) -> dict:
    out: dict = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# ----------------------------------------------------------------------------- client


async def stream_chat(session, url: str, model: str, messages: list[dict], max_tokens: int,
                      client: int) -> RequestResult:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(client=client, start=time.perf_counter())
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                result.error = f"HTTP {resp.status}: {text}"
                return result
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ': keepalive' comments
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    result.error = f"bad SSE payload: {payload[:200]}"
                    break
                if "error" in event:
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    break
                usage = event.get("usage")
                if usage:
                    result.completion_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        result.text += delta["content"]
                        result.content_chunks += 1
                        if last is None:
                            result.ttft = now - result.start
                            result.first_token_at = now
                        else:
                            result.itls.append(now - last)
                        last = now
                        result.last_token_at = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except asyncio.TimeoutError:
        result.error = "client timeout"
    except Exception as exc:  # noqa: BLE001 - recorded, reported, never hidden
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.perf_counter()
    return result


async def run_workload(base_url: str, model: str, workload: Workload, request_timeout: float,
                       force_close: bool = False) -> dict:
    """`force_close`: a new connection per request, for servers that close a connection after
    a streamed response without saying so (llama.cpp's llama-server): reusing it fails the
    next request with "Can not write request body"."""
    import aiohttp

    url = base_url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    connector = aiohttp.TCPConnector(limit=workload.concurrency + 4, force_close=force_close)
    results: list[RequestResult] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(i: int) -> None:
            for messages in workload.requests[i]:
                results.append(await stream_chat(session, url, model, messages, workload.max_tokens, i))

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(workload.concurrency)))
        wall = time.perf_counter() - start
    summary = summarize(results, wall)
    summary["per_request"] = [
        {**{k: v for k, v in asdict(r).items() if k not in ("itls",)},
         "itls": [round(x, 6) for x in r.itls], "start": r.start - start, "end": r.end - start}
        for r in results
    ]
    return summary


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return out


def mapped_blas(pid: int) -> list[str]:
    libs = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and ("openblas" in parts[-1].lower() or "libblas" in parts[-1].lower()):
                    libs.add(parts[-1])
    except OSError:
        pass
    return sorted(libs)


_CLK = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK


def proc_cpu_s(pid: int) -> float:
    """CPU seconds used by one process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return 0.0


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """How much CPU others (not the server under test, not this bench) used over a span."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.t0, self.busy0, self.self0 = time.monotonic(), cpu_busy_s(), self_cpu_s()
        self.proc0 = proc_cpu_s(pid) if pid else 0.0

    def read(self) -> dict:
        wall = max(time.monotonic() - self.t0, 1e-6)
        busy = cpu_busy_s() - self.busy0
        server = (proc_cpu_s(self.pid) - self.proc0) if self.pid else 0.0
        mine = self_cpu_s() - self.self0
        return {"server_cores": server / wall, "bench_client_cores": mine / wall,
                "other_cores": max(0.0, busy - server - mine) / wall}


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most max_wait s) until other processes use less than `threshold` cores;
    other engineers' test runs share this machine.  Returns the load seen last."""
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        meter = CpuMeter(None)
        time.sleep(1.0)
        other = meter.read()["other_cores"]
        if other < threshold or time.monotonic() >= deadline:
            if announced or other >= threshold:
                log(f"  machine load from other processes: {other:.2f} cores"
                    + (" (gave up waiting)" if other >= threshold else ""))
            return other
        if not announced:
            log(f"  waiting for a quiet machine (other processes use {other:.2f} cores)")
            announced = True


def http_get_json(url: str, timeout: float = 5.0):
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # 127.0.0.1 only
        return resp.status, json.loads(resp.read() or b"null")


class Server:
    def __init__(self, kind: str, args, log_dir: Path, tag: str):
        self.kind = kind
        self.args = args
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{tag}.log"
        self.proc: subprocess.Popen | None = None
        self.env_overrides: dict[str, str | None] = {}  # applied last; None removes a variable
        self.model_path = args.model_path.resolve()
        if kind == OMLX:
            self.model_id = self.model_path.name
        else:
            self.model_id = str(self.model_path)  # mlx_lm.server lists the resolved path

    def command(self) -> tuple[list[str], dict]:
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"
        env["TOKENIZERS_PARALLELISM"] = "false"
        if self.kind == OMLX:
            cmd = [sys.executable, "-m", "omlx", "serve", "--model-dir", str(self.model_path.parent),
                   "--host", "127.0.0.1", "--port", str(self.port), "--no-demo", *self.args.omlx_arg]
            # omlx re-execs itself with the optimized BLAS preloaded; leave LD_PRELOAD alone.
            # Rounds must not hit KV blocks an earlier round or run left on disk (mlx_lm.server
            # has no such tier); OMLX_KV_DISK=1 in the environment turns it back on.
            env.setdefault("OMLX_KV_DISK", "0")
        else:
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(self.model_path),
                   "--host", "127.0.0.1", "--port", str(self.port), *self.args.mlx_lm_arg]
            env["LD_PRELOAD"] = " ".join(filter(None, [self.args.blas_library, env.get("LD_PRELOAD")]))
            # Its /v1/models scans the Hugging Face cache and fails with a 500 when that
            # folder does not exist; an empty one keeps the listing working offline.
            hf_cache = self.args.out_dir / "empty-hf-cache"
            hf_cache.mkdir(parents=True, exist_ok=True)
            env["HF_HUB_CACHE"] = str(hf_cache)
        for name, value in self.env_overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return cmd, env

    def start(self) -> None:
        cmd, env = self.command()
        log(f"starting {self.kind}: {' '.join(cmd)}")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = http_get_json(self.base_url + "/health", timeout=2)
                if status == 200:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{self.kind} did not answer /health within {timeout}s:\n{self.log_tail()}")
        _, models = http_get_json(self.base_url + "/v1/models", timeout=10)
        ids = [m.get("id") for m in (models or {}).get("data", [])]
        if self.model_id not in ids:
            raise RuntimeError(f"{self.kind}: model id {self.model_id!r} not in /v1/models {ids}")

    def warm_up(self, factory: PromptFactory) -> None:
        """Load the model (omlx loads on first use) and run a couple of requests, one then two
        at once, with prompts that share nothing with the measured ones."""
        rng = random.Random(12345)
        texts = [" ".join(rng.choice(WORDS[::-1]) for _ in range(120)) for _ in range(3)]
        wl_one = Workload("warmup", 1, [[[{"role": "user", "content": "warm up " + texts[0]}]]], 8)
        wl_two = Workload("warmup", 2, [[[{"role": "user", "content": f"warm {i} " + texts[i]}]] for i in (1, 2)], 8)
        for wl in (wl_one, wl_two):
            summary = asyncio.run(run_workload(self.base_url, self.model_id, wl, 600))
            if summary["errors"]:
                raise RuntimeError(f"{self.kind} warm-up failed: {summary['error_samples']}\n{self.log_tail()}")
        self.ready_s = time.monotonic() - self.started_at

    def health(self) -> dict | None:
        try:
            return http_get_json(self.base_url + "/health", timeout=10)[1]
        except Exception:  # noqa: BLE001
            return None

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(pid, sig)  # our own session: the server and nothing else
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self.log_file.close()
        # The port must be free before the next server starts on this 2-core box.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    break
            time.sleep(0.2)
        self.proc = None


def omlx_fingerprint() -> str:
    """Hash of the omlx sources: other people edit them while the bench runs, so each row
    records which code it measured."""
    import hashlib

    import omlx

    digest = hashlib.sha1()
    root = Path(omlx.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def measure_round(server, row: dict, workload: Workload, args, factory, *, ready_line, result_line, after=None,
                  ready_timeout: float = 300.0, force_close: bool = False) -> dict:
    """One measured round on `server`, filling `row`: start it, warm it up, wait for a quiet
    machine, run `workload` under a CPU meter, then the server's memory and the errors.  The
    callers' own parts: `ready_line(pid)` logs (and may note in `row`) what is about to run,
    `after(pid)` adds their fields once the workload is done, `result_line()` is the summary
    logged.  A failure is recorded in the row rather than raised (one broken round must not
    lose the others), and the server is stopped whatever happens."""
    try:
        server.start()
        server.wait_ready(timeout=ready_timeout)
        server.warm_up(factory)
        pid = server.proc.pid
        row["other_load_before"] = round(wait_for_quiet(args.quiet_wait), 2)
        log(ready_line(pid))
        meter = CpuMeter(pid)
        row.update(asyncio.run(run_workload(server.base_url, server.model_id, workload, args.request_timeout,
                                            force_close=force_close)))
        row["cpu"] = {k: round(v, 2) for k, v in meter.read().items()}
        mem = proc_status(pid)
        row["peak_rss_mib"] = mem.get("VmHWM")
        row["rss_end_mib"] = mem.get("VmRSS")
        if after is not None:
            after(pid)
        log(result_line())
        if row["errors"]:
            log(f"  !! errors from {server.kind}: {row['error_samples']}\n--- server log tail ---\n{server.log_tail()}")
    except Exception as exc:  # noqa: BLE001 - one broken round must not lose the others
        row["failed"] = f"{type(exc).__name__}: {exc}"
        log(f"  !! round failed: {row['failed']}")
    finally:
        server.stop()
    return row


def run_round(kind: str, workload: Workload, args, factory: PromptFactory, log_dir: Path, index: int,
              attempt: int = 1) -> dict:
    label = workload.name + (f" ({workload.variant})" if workload.variant else "")
    tag = f"{index:02d}-{kind.replace('.', '_')}-{workload.name}-c{workload.concurrency}" + (
        "-distinct" if "distinct" in workload.variant else "") + (f"-attempt{attempt}" if attempt > 1 else "")
    server = Server(kind, args, log_dir, tag)
    row = {"workload": label, "concurrency": workload.concurrency, "server": kind,
           "requests": workload.num_requests, "max_tokens": workload.max_tokens, "log": str(server.log_path)}
    if kind == OMLX:
        row["omlx_source"] = omlx_fingerprint()

    def ready_line(pid: int) -> str:
        row["blas_mapped"] = mapped_blas(pid)
        row["ready_s"] = round(server.ready_s, 1)
        return (f"{kind} ready in {server.ready_s:.1f}s (pid {pid}, BLAS {row['blas_mapped'] or 'none mapped!'});"
                f" running {label} c={workload.concurrency}, {workload.num_requests} requests")

    def after(pid: int) -> None:
        if kind == OMLX:
            health = server.health() or {}
            row["omlx_health"] = (health.get("models_loaded") or {}).get(server.model_id)
            row["omlx_compute"] = health.get("compute")
        if not server.alive():
            row["server_died"] = True

    def result_line() -> str:
        return (f"  -> {fmt(row.get('agg_tok_s'), 1)} tok/s, TTFT p50 {fmt_ms(row.get('ttft_p50'))},"
                f" ITL p50 {fmt_ms(row.get('itl_p50'))}, peak RSS {fmt(row['peak_rss_mib'], 0)} MiB,"
                f" {row['errors']} errors, wall {row['wall_s']:.1f}s, CPU: server {row['cpu']['server_cores']:.2f}"
                f" / bench client {row['cpu']['bench_client_cores']:.2f} / others {row['cpu']['other_cores']:.2f} cores")

    return measure_round(server, row, workload, args, factory, ready_line=ready_line, after=after,
                         result_line=result_line)


def _other_load(row: dict) -> float:
    return (row.get("cpu") or {}).get("other_cores", 0.0)


def run_round_retrying(kind: str, workload: Workload, args, factory, log_dir: Path, index: int) -> dict:
    """Run a round; if other processes took a noticeable share of the CPU during it (this box
    is shared), run it again on a fresh server and keep the attempt that was disturbed least.
    Long rounds are not repeated, to bound the total time."""
    row = run_round(kind, workload, args, factory, log_dir, index)
    attempts = [row]
    while (not row.get("failed") and _other_load(row) > args.noisy_threshold
           and len(attempts) <= args.noisy_retries and row.get("wall_s", 1e9) <= args.retry_max_wall):
        log(f"  other processes used {_other_load(row):.2f} cores during the round: running it again")
        row = run_round(kind, workload, args, factory, log_dir, index, attempt=len(attempts) + 1)
        attempts.append(row)
    best = min((r for r in attempts if not r.get("failed")), key=_other_load, default=attempts[-1])
    best["attempts"] = len(attempts)
    best["other_load_per_attempt"] = [round(_other_load(r), 2) for r in attempts]
    return best


# ----------------------------------------------------------------------------- baseline


def run_baseline(args, workload: Workload, out_dir: Path) -> dict:
    """mlx_lm.stream_generate in a fresh process with the optimized BLAS preloaded."""
    job = out_dir / "baseline_in.json"
    result_path = out_dir / "baseline_out.json"
    job.write_text(json.dumps({
        "model": str(args.model_path.resolve()),
        "messages": [m for client in workload.requests for m in client],
        "max_tokens": workload.max_tokens,
    }))
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [args.blas_library, env.get("LD_PRELOAD")]))
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_baseline-worker", str(job), str(result_path)]
    log(f"baseline: {BASELINE}, {len(workload.requests[0])} prompt(s), LD_PRELOAD={env['LD_PRELOAD']}")
    row = {"workload": "single-stream baseline", "concurrency": 1, "server": BASELINE,
           "requests": workload.num_requests, "max_tokens": workload.max_tokens}
    row["other_load_before"] = round(wait_for_quiet(args.quiet_wait), 2)
    meter = CpuMeter(None)
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=args.request_timeout)
    cpu = meter.read()
    # The worker is our child: its CPU time counts as ours once it has exited.
    row["cpu"] = {"server_cores": round(cpu["bench_client_cores"], 2), "bench_client_cores": 0.0,
                  "other_cores": round(cpu["other_cores"], 2)}
    if proc.returncode != 0:
        row["failed"] = f"exit {proc.returncode}: {proc.stderr[-2000:]}"
        log(f"  !! baseline failed: {row['failed']}")
        return row
    data = json.loads(result_path.read_text())
    results = [RequestResult(**r) for r in data["results"]]
    row.update(summarize(results, data["wall_s"]))
    row["peak_rss_mib"] = data["peak_rss_mib"]
    row["blas_mapped"] = data["blas_mapped"]
    row["generation_tps_mlx_lm"] = data["generation_tps"]
    row["per_request"] = data["results"]
    log(f"  -> decode {fmt(row['decode_tok_s_per_stream_p50'], 1)} tok/s per stream,"
        f" TTFT p50 {fmt_ms(row['ttft_p50'])}, BLAS {row['blas_mapped'] or 'none mapped!'}")
    return row


def baseline_worker(job_path: str, out_path: str) -> None:
    from mlx_lm import load, stream_generate

    job = json.loads(Path(job_path).read_text())
    model, tokenizer = load(job["model"])
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in job["messages"]]
    # Warm-up, like the servers get.
    for _ in stream_generate(model, tokenizer, prompts[0][:64], max_tokens=8):
        pass
    results, gen_tps = [], []
    start_all = time.perf_counter()
    for prompt in prompts:
        r = RequestResult(client=0, start=time.perf_counter())
        last, final = None, None
        for resp in stream_generate(model, tokenizer, prompt, max_tokens=job["max_tokens"]):
            now = time.perf_counter()
            final = resp
            if resp.text:
                r.content_chunks += 1
                if last is None:
                    r.ttft, r.first_token_at = now - r.start, now
                else:
                    r.itls.append(now - last)
                last = r.last_token_at = now
        r.end = time.perf_counter()
        r.completion_tokens = final.generation_tokens
        r.prompt_tokens = final.prompt_tokens
        r.finish_reason = final.finish_reason
        gen_tps.append(final.generation_tps)
        results.append(asdict(r))
    wall = time.perf_counter() - start_all
    Path(out_path).write_text(json.dumps({
        "results": results, "wall_s": wall, "generation_tps": gen_tps,
        "peak_rss_mib": proc_status(os.getpid()).get("VmHWM"), "blas_mapped": mapped_blas(os.getpid()),
    }))


# ----------------------------------------------------------------------------- report


def fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


COLUMNS = ["workload", "concurrency", "server", "agg tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
           "peak RSS MiB", "decode tok/s/stream", "reqs (err)"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    for r in rows:
        if r.get("failed"):
            cells = [r["workload"], str(r["concurrency"]), r["server"], "FAILED: " + r["failed"].splitlines()[0][:80]]
            cells += [""] * (len(COLUMNS) - len(cells))
        else:
            cells = [r["workload"], str(r["concurrency"]), r["server"], fmt(r.get("agg_tok_s")),
                     fmt_ms(r.get("ttft_p50")), fmt_ms(r.get("ttft_p99")), fmt_ms(r.get("itl_p50")),
                     fmt_ms(r.get("itl_p99")), fmt(r.get("peak_rss_mib"), 0),
                     fmt(r.get("decode_tok_s_per_stream_p50")), f"{r['requests']} ({r['errors']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ratios(rows: list[dict]) -> str:
    good = [r for r in rows if not r.get("failed")]

    def find(workload, conc, server):
        for r in good:
            if r["workload"] == workload and r["concurrency"] == conc and r["server"] == server:
                return r
        return None

    lines = ["| workload | concurrency | compared | tok/s ratio (omlx / other) | TTFT p50 ratio (other / omlx) |",
             "|---|---|---|---|---|"]
    for r in good:
        if r["server"] != OMLX:
            continue
        other = find(r["workload"], r["concurrency"], MLX_LM)
        if other is None and r["workload"].startswith("shared-prefix"):
            other = next((o for o in good if o["server"] == MLX_LM and o["workload"].startswith("shared-prefix")
                          and o["concurrency"] == r["concurrency"]), None)
        if other is None:
            continue
        lines.append(f"| {r['workload']} | {r['concurrency']} | omlx vs {MLX_LM} ({other['workload']}) | "
                     f"{fmt(_ratio(r.get('agg_tok_s'), other.get('agg_tok_s')), 2)}x | "
                     f"{fmt(_ratio(other.get('ttft_p50'), r.get('ttft_p50')), 2)}x |")
    on = next((r for r in good if r["server"] == OMLX and "cache on" in r["workload"]), None)
    off = next((r for r in good if r["server"] == OMLX and "cache defeated" in r["workload"]), None)
    if on and off:
        lines.append(f"| shared-prefix | {on['concurrency']} | omlx prefix cache on vs distinct prefixes | "
                     f"{fmt(_ratio(on.get('agg_tok_s'), off.get('agg_tok_s')), 2)}x | "
                     f"{fmt(_ratio(off.get('ttft_p50'), on.get('ttft_p50')), 2)}x |")
    base = next((r for r in good if r["server"] == BASELINE), None)
    c1 = find("chat", 1, OMLX)
    c1_mlx = find("chat", 1, MLX_LM)
    extra = []
    if base:
        for name, row in ((OMLX, c1), (MLX_LM, c1_mlx)):
            if row:
                extra.append(
                    f"- single stream, {name} at concurrency 1 vs in-process stream_generate: decode tok/s per stream "
                    f"{fmt(row.get('decode_tok_s_per_stream_p50'))} vs {fmt(base.get('decode_tok_s_per_stream_p50'))}"
                    f" ({fmt(_ratio(row.get('decode_tok_s_per_stream_p50'), base.get('decode_tok_s_per_stream_p50')), 2)}x);"
                    f" end-to-end tok/s {fmt(row.get('agg_tok_s'))} vs {fmt(base.get('agg_tok_s'))}"
                    f" ({fmt(_ratio(row.get('agg_tok_s'), base.get('agg_tok_s')), 2)}x);"
                    f" TTFT p50 {fmt_ms(row.get('ttft_p50'))} vs {fmt_ms(base.get('ttft_p50'))}")
    return "\n".join(lines + ([""] + extra if extra else []))


def notes(rows: list[dict]) -> str:
    out = []
    sources = sorted({r["omlx_source"] for r in rows if r.get("omlx_source")})
    if len(sources) > 1:
        out.append(f"- WARNING: the omlx sources changed during the run ({len(sources)} versions: {', '.join(sources)});"
                   " rows name the one they measured")
    for r in rows:
        bits = [f"{r['max_tokens']} max tokens"] if r.get("max_tokens") else []
        if r.get("prompt_tokens_mean") is not None:
            bits.append(f"mean prompt {r['prompt_tokens_mean']:.0f} tok")
        if r.get("output_tokens") is not None:
            bits.append(f"{r['output_tokens']} output tok in {r['wall_s']:.1f}s")
        if r.get("cached_prompt_tokens"):
            bits.append(f"{r['cached_prompt_tokens']} prompt tok reported cached")
        if r.get("finish_reasons"):
            bits.append("finish " + ", ".join(f"{k}={v}" for k, v in r["finish_reasons"].items()))
        if r.get("usage_reported") is False:
            bits.append("token counts from content chunks (no usage in stream)")
        h = r.get("omlx_health")
        if h:
            kv = h.get("kv_cache", {})
            bits.append(f"omlx preemptions {h.get('preemptions')}, prefix-cache hit rate "
                        f"{kv.get('prefix_cache_hit_rate', 0):.2f}, KV pool {kv.get('bytes', 0) / 2**20:.0f} MiB")
        if r.get("omlx_source"):
            bits.append(f"omlx sources {r['omlx_source']}")
        if r.get("cpu"):
            c = r["cpu"]
            who = "process" if r["server"] == BASELINE else "server"
            bits.append(f"CPU cores used: {who} {c['server_cores']:.2f}, bench client {c['bench_client_cores']:.2f},"
                        f" other processes {c['other_cores']:.2f}")
        if r.get("attempts", 1) > 1:
            bits.append(f"{r['attempts']} attempts (other-process load {r['other_load_per_attempt']} cores;"
                        " the least disturbed is shown)")
        if r.get("ready_s") is not None:
            bits.append(f"ready+warm-up {r['ready_s']}s")
        if "blas_mapped" in r and not r["blas_mapped"]:
            bits.append("WARNING: no OpenBLAS mapped")
        if r.get("errors"):
            bits.append(f"ERRORS {r['errors']}: {r['error_samples']}")
        if r.get("server_died"):
            bits.append("SERVER DIED during the round")
        if r.get("failed"):
            bits.append("FAILED: " + r["failed"][:500])
        out.append(f"- {r['workload']} c={r['concurrency']} {r['server']}: " + "; ".join(bits))
    return "\n".join(out)


def report(rows: list[dict], meta: dict) -> str:
    header = [
        "# omlx vs mlx_lm.server serving benchmark",
        "",
        f"- date: {meta['date']}, host: {meta['machine']}, {meta['cpus']} CPUs, python {meta['python']}",
        f"- model: {meta['model']} ({meta['model_size_mib']:.0f} MiB safetensors)",
        f"- versions: {meta['versions']}",
        f"- settings: max_tokens {meta['max_tokens']}, temperature 0, chat prompts {meta['prompt_range']} tokens,"
        f" shared-prefix: {meta['shared']}",
        f"- requests per client: {meta['requests_per_client']} (at least {meta['min_requests']} requests per round)",
        f"- omlx extra args: {meta['omlx_args'] or 'none'}; mlx_lm.server extra args: {meta['mlx_lm_args'] or 'none'}",
        "- agg tok/s = output tokens of all requests / wall time of the round (prefill included);"
        " TTFT = request sent to first content chunk; ITL = gap between content chunks;"
        " decode tok/s/stream = median over requests of (tokens - 1) / (last - first content chunk)",
        "- 'distinct prefixes, cache defeated': omlx has no switch to turn prefix caching off, so every client's"
        " system prompt starts with different words (same length); no prefix block can be shared.",
        f"- total bench time: {meta['total_s']:.0f}s; server logs in {meta['log_dir']}",
        "",
        "## Results",
        "",
        table(rows),
        "",
        "## Ratios",
        "",
        ratios(rows),
        "",
        "## Notes per row",
        "",
        notes(rows),
        "",
    ]
    return "\n".join(header)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=DEFAULT_MODEL,
                   help="model folder; built if missing (bench-qwen3_5 and bench-gemma3 by their names, else the"
                        " bench-200m preset). Its name is omlx's model id.")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default 64)")
    p.add_argument("--requests-per-client", type=int, default=None, help="requests each client sends (default 1)")
    p.add_argument("--min-requests", type=int, default=None,
                   help="at least this many requests per round: clients send more when needed (default 4)")
    p.add_argument("--prompt-tokens", default=None, help="chat prompt length range LO,HI (default 100,300)")
    p.add_argument("--shared-clients", type=int, default=None, help="clients in the shared-prefix workload (32)")
    p.add_argument("--shared-system-tokens", type=int, default=None, help="shared system prompt tokens (1500)")
    p.add_argument("--shared-user-tokens", type=int, default=None, help="per-client user message tokens (24)")
    p.add_argument("--skip-shared", action="store_true", help="skip the shared-system-prompt workload")
    p.add_argument("--skip-baseline", action="store_true", help="skip the in-process stream_generate baseline")
    p.add_argument("--skip-mlx-lm", action="store_true", help="run omlx only")
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run (~2 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="before each round, wait up to this many seconds for other processes to go idle"
                        " (default 30; 5 with --quick)")
    p.add_argument("--noisy-threshold", type=float, default=0.3,
                   help="a round during which other processes used more CPU cores than this is repeated")
    p.add_argument("--noisy-retries", type=int, default=None,
                   help="how often a disturbed round is repeated (default 1; 0 with --quick)")
    p.add_argument("--retry-max-wall", type=float, default=120.0,
                   help="rounds longer than this many seconds are never repeated")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request (and baseline)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--blas-library", default=DEFAULT_BLAS,
                   help="preloaded (LD_PRELOAD) for mlx_lm.server and the in-process baseline")
    p.add_argument("--omlx-arg", action="append", default=[], help="extra arg for omlx serve (repeatable)")
    p.add_argument("--mlx-lm-arg", action="append", default=[], help="extra arg for mlx_lm.server (repeatable)")
    p.add_argument("--_baseline-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    quick = args.quick
    defaults = {
        "concurrency": "1,4" if quick else "1,8,32",
        "max_tokens": 16 if quick else 64,
        "requests_per_client": 1,
        "min_requests": 2 if quick else 4,
        "prompt_tokens": "100,200" if quick else "100,300",
        "shared_clients": 4 if quick else 32,
        "shared_system_tokens": 300 if quick else 1500,
        "shared_user_tokens": 16 if quick else 24,
        "quiet_wait": 5.0 if quick else 30.0,
        "noisy_retries": 0 if quick else 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    lo, hi = (int(x) for x in args.prompt_tokens.split(","))
    args.prompt_range = (lo, hi)
    return args


def ensure_model(path: Path) -> None:
    """Build the bench model at `path` if it is missing: by the folder's name, one of the
    bench-sized family models (bench-qwen3_5: hybrid Gated DeltaNet + attention; bench-gemma3:
    sliding windows; omlx.testing.tiny_families.BENCH_FAMILIES), else the qwen3 bench-200m."""
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return
    from omlx.testing.tiny_families import BENCH_FAMILIES, build_bench_family

    if path.name in BENCH_FAMILIES:
        log(f"building the bench model at {path} (omlx.testing.tiny_families {path.name})")
        build_bench_family(path, path.name)
        return
    log(f"building the bench model at {path} (omlx.testing.tiny_models BENCH_200M)")
    from omlx.testing.tiny_models import BENCH_200M, build_model

    build_model(path, BENCH_200M)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("omlx", "mlx", "mlx-lm", "aiohttp"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} ?")
    return ", ".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._baseline_worker:
        baseline_worker(*args._baseline_worker)
        return 0

    started = time.monotonic()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = args.out_dir / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model_path)
    factory = PromptFactory(args.model_path, args.seed)
    servers = [OMLX] if args.skip_mlx_lm else [OMLX, MLX_LM]

    # Build every workload first, so both servers see exactly the same prompts.
    plan: list[tuple[Workload, list[str]]] = []
    for i, c in enumerate(args.concurrency):
        per_client = max(args.requests_per_client, -(-args.min_requests // c))
        wl = chat_workload(factory, c, per_client, args.max_tokens, *args.prompt_range)
        order = servers if i % 2 == 0 else servers[::-1]  # alternate who goes first
        plan.append((wl, order))
    if not args.skip_shared:
        shared, distinct = shared_prefix_workloads(factory, args.shared_clients, args.shared_system_tokens,
                                                   args.shared_user_tokens, args.max_tokens)
        plan.append((shared, [OMLX] + ([MLX_LM] if MLX_LM in servers else [])))
        plan.append((distinct, [OMLX]))

    n_rounds = sum(len(o) for _, o in plan)
    log(f"plan: {n_rounds} server rounds + {'no ' if args.skip_baseline else ''}baseline;"
        f" concurrency {args.concurrency}, max_tokens {args.max_tokens}")
    rows: list[dict] = []
    index = 0
    try:
        for wl, order in plan:
            for kind in order:
                index += 1
                log(f"=== round {index}/{n_rounds}: {wl.name} {wl.variant} c={wl.concurrency} on {kind}")
                rows.append(run_round_retrying(kind, wl, args, factory, log_dir, index))
        if not args.skip_baseline:
            c1 = next((wl for wl, _ in plan if wl.name == "chat" and wl.concurrency == 1), None)
            if c1 is None:
                c1 = chat_workload(factory, 1, args.min_requests, args.max_tokens, *args.prompt_range)
            rows.append(run_baseline(args, c1, args.out_dir))
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "model": str(args.model_path),
        "model_size_mib": (args.model_path / "model.safetensors").stat().st_size / 2**20,
        "versions": versions(),
        "max_tokens": args.max_tokens,
        "prompt_range": f"{args.prompt_range[0]}-{args.prompt_range[1]}",
        "shared": "skipped" if args.skip_shared else
                  f"{args.shared_clients} clients, {args.shared_system_tokens}-token system prompt +"
                  f" {args.shared_user_tokens}-token user message",
        "requests_per_client": args.requests_per_client,
        "min_requests": args.min_requests,
        "omlx_args": " ".join(args.omlx_arg),
        "mlx_lm_args": " ".join(args.mlx_lm_arg),
        "total_s": time.monotonic() - started,
        "log_dir": str(log_dir),
        "argv": sys.argv,
    }
    md = report(rows, meta)
    (args.out_dir / "latest.md").write_text(md)
    (args.out_dir / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    # A copy per run, so a later (e.g. --quick) run does not overwrite this one.
    (args.out_dir / f"run-{stamp}.md").write_text(md)
    (args.out_dir / f"run-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(md)
    log(f"wrote {args.out_dir / 'latest.md'} and latest.json")
    failed = [r for r in rows if r.get("failed") or r.get("errors")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
