"""Multi-turn agent sessions: TTFT per turn with the prefix cache in memory, on disk after a
restart, and off.

Each of N sessions (default 16) runs T turns (default 8), one after another, all sessions at
once: every turn re-sends the whole conversation so far (system prompt, earlier user turns and
the assistant's own earlier replies) plus a new user message, as agents do.

- memory:  one omlx server, prefix cache on, disk tier off.
- disk:    the same conversations are first run on a server with the disk tier on (filling
           it), the server is restarted (memory empty), and the recorded conversations are
           replayed turn by turn: what the cache saves now comes from disk.
- off:     `--no-prefix-cache`: every turn recomputes the whole conversation.

    python bench/multiturn_bench.py                 # ~15 minutes on 2 CPU cores
    python bench/multiturn_bench.py --sessions 4 --turns 3 --max-tokens 8   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import (  # noqa: E402  (the bench directory is not a package)
    OMLX,
    WORDS,
    PromptFactory,
    Server,
    ensure_model,
    log,
    percentile,
    proc_status,
    stream_chat,
)

REPO = Path(__file__).resolve().parents[1]


def user_message(rng: random.Random, session: int, turn: int, words: int) -> str:
    return f"session {session} turn {turn}: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def run_sessions(server: Server, args, script: list[list[list[dict]]] | None):
    """Run every session's turns; with `script`, replay recorded conversations instead of
    building them from the replies.  Returns (per-turn TTFTs, the conversations sent)."""
    url = server.base_url + "/v1/chat/completions"
    ttfts: list[list[float]] = [[] for _ in range(args.turns)]
    cached: list[list[int]] = [[] for _ in range(args.turns)]
    sent: list[list[list[dict]]] = [[] for _ in range(args.sessions)]
    system = PromptFactory(args.model_path, seed=1).text(args.system_tokens)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)

    async def session(i: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(1000 + i)
        messages = [{"role": "system", "content": f"Agent {i}. " + system}]
        for turn in range(args.turns):
            if script is not None:
                messages = script[i][turn]
            else:
                messages = messages + [{"role": "user", "content": user_message(rng, i, turn, args.user_words)}]
            result = await stream_chat(http, url, server.model_id, messages, args.max_tokens, i)
            if result.error:
                raise RuntimeError(f"session {i} turn {turn}: {result.error}")
            ttfts[turn].append(result.ttft)
            cached[turn].append(result.cached_tokens or 0)
            sent[i].append(messages)
            messages = messages + [{"role": "assistant", "content": result.text}]

    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(session(i, http) for i in range(args.sessions)))
    return ttfts, cached, sent


def start(args, home: Path, tag: str, *extra: str) -> Server:
    args.omlx_arg = [*extra]
    server = Server(OMLX, args, args.out_dir, tag)
    # Each mode gets its own home; the disk tier is chosen per mode by flag, not by env.
    server.env_overrides = {"OMLX_HOME": str(home), "OMLX_KV_DISK": None}
    server.start()
    server.wait_ready()
    return server


def measure(args, mode: str, home: Path, *extra: str, script=None):
    server = start(args, home, f"multiturn-{mode}", *extra)
    try:
        server.warm_up(PromptFactory(args.model_path, seed=99))  # loads the model
        started = time.monotonic()
        ttfts, cached, sent = asyncio.run(run_sessions(server, args, script))
        log(f"{mode}: {time.monotonic() - started:.1f}s")
        footprints[mode] = {"peak_rss_mib": proc_status(server.proc.pid).get("VmHWM"), **kv_pool_mib(server)}
        return ttfts, cached, sent
    finally:
        server.stop()


footprints: dict[str, dict] = {}  # per mode: the server's peak RSS and its KV pool at the end


def kv_pool_mib(server: Server) -> dict:
    """The model's KV pool as /health reports it: allocated and the most it may grow to."""
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as reply:
        models = json.loads(reply.read())["models"]
    kv = next(iter(models.values()))["kv_cache"]
    return {"kv_pool_mib": kv["bytes"] / 2**20, "kv_max_mib": kv["max_bytes"] / 2**20, "kv_growths": kv["growths"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=REPO / "bench/models/bench-200m")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=200)
    p.add_argument("--user-words", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--kv-cache-gb", type=float, default=1.0,
                   help="KV cap per model; 0: the server's default (the budget left after the weights)")
    p.add_argument("--request-timeout", type=float, default=1800)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.mlx_lm_arg, args.blas_library = [], None
    ensure_model(args.model_path)
    kv = ("--kv-cache-gb", str(args.kv_cache_gb)) if args.kv_cache_gb else ()

    with tempfile.TemporaryDirectory(prefix="omlx-multiturn-") as tmp:
        tmp = Path(tmp)
        memory, memory_cached, script = measure(args, "memory", tmp / "memory", *kv, "--no-kv-disk")
        # Fill the disk tier with the same conversations, restart, replay them.
        measure(args, "disk-fill", tmp / "disk", *kv, script=script)
        disk, disk_cached, _ = measure(args, "disk-after-restart", tmp / "disk", *kv, script=script)
        off, off_cached, _ = measure(args, "off", tmp / "off", *kv, "--no-prefix-cache", script=script)

    lines = [
        f"# Multi-turn agent sessions: {args.sessions} sessions x {args.turns} turns, "
        f"{args.system_tokens}-token system prompt, {args.user_words}-word user turns, "
        f"{args.max_tokens} output tokens, model {args.model_path.name}",
        "",
        "| turn | TTFT p50 memory | TTFT p50 disk (after restart) | TTFT p50 off | cached tokens p50 memory / disk / off |",
        "|---|---|---|---|---|",
    ]
    for turn in range(args.turns):
        row = [percentile(x[turn], 50) for x in (memory, disk, off)]
        hits = [percentile([float(c) for c in x[turn]], 50) for x in (memory_cached, disk_cached, off_cached)]
        lines.append(
            f"| {turn + 1} | " + " | ".join(f"{v * 1000:.0f} ms" for v in row)
            + " | " + " / ".join(f"{h:.0f}" for h in hits) + " |"
        )
    lines += ["", "| mode | peak RSS | KV pool at the end (cap) | pool growths |", "|---|---|---|---|"]
    for mode, m in footprints.items():
        lines.append(f"| {mode} | {m['peak_rss_mib']:.0f} MiB | {m['kv_pool_mib']:.0f} MiB "
                     f"({m['kv_max_mib']:.0f} MiB) | {m['kv_growths']} |")
    report = "\n".join(lines)
    print(report)
    (args.out_dir / "multiturn.md").write_text(report + "\n")
    (args.out_dir / "multiturn.json").write_text(json.dumps(
        {"memory": memory, "disk": disk, "off": off, "cached": [memory_cached, disk_cached, off_cached],
         "footprints": footprints}
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
