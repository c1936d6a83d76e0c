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
- mlx_lm:  the same sessions on `mlx_lm.server` (its LRU prompt cache, `--prompt-cache-size`,
           is what it has for a resent conversation).  Its conversations are built from its
           own replies, as an agent's would be; turn 1 is the same prompt as omlx's.

`--modes` picks which run (default memory,disk,off; mlx_lm only when asked).  The report gives
TTFT p50 per turn and mode, and each mode's later turns against its cold first turn.

    python bench/multiturn_bench.py                 # ~15 minutes on 2 CPU cores
    python bench/multiturn_bench.py --sessions 4 --turns 3 --max-tokens 8   # smoke run
    python bench/multiturn_bench.py --model-path bench/models/bench-qwen3_5 --modes memory,mlx_lm
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
    DEFAULT_BLAS,
    MLX_LM,
    OMLX,
    CpuMeter,
    WORDS,
    PromptFactory,
    Server,
    ensure_model,
    log,
    percentile,
    proc_status,
    stream_chat,
    wait_for_quiet,
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


def start(args, home: Path, tag: str, *extra: str, kind: str = OMLX) -> Server:
    args.omlx_arg = [*extra]
    server = Server(kind, args, args.out_dir, tag)
    # Each mode gets its own home; the disk tier is chosen per mode by flag, not by env.
    server.env_overrides = {"OMLX_HOME": str(home), "OMLX_KV_DISK": None}
    server.start()
    server.wait_ready()
    return server


def measure(args, mode: str, home: Path, *extra: str, script=None, kind: str = OMLX):
    wait_for_quiet(args.quiet_wait)
    server = start(args, home, f"multiturn-{mode}", *extra, kind=kind)
    try:
        server.warm_up(PromptFactory(args.model_path, seed=99))  # loads the model
        started = time.monotonic()
        meter = CpuMeter(server.proc.pid)
        ttfts, cached, sent = asyncio.run(run_sessions(server, args, script))
        wall = time.monotonic() - started
        log(f"{mode}: {wall:.1f}s")
        footprints[mode] = {"peak_rss_mib": proc_status(server.proc.pid).get("VmHWM"),
                            "wall_s": wall, "other_cores": meter.read()["other_cores"],
                            **(kv_pool_mib(server) if kind == OMLX else {})}
        return ttfts, cached, sent
    finally:
        server.stop()


footprints: dict[str, dict] = {}  # per mode: peak RSS, wall time, others' CPU, the KV pool at the end


def kv_pool_mib(server: Server) -> dict:
    """The model's KV pool as /health reports it: allocated and the most it may grow to."""
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as reply:
        health = json.loads(reply.read())
    models = health.get("models_loaded") or health.get("models") or {}
    kv = (models.get(server.model_id) or next(iter(models.values()), {})).get("kv_cache")
    if not kv:
        return {}
    return {"kv_pool_mib": kv["bytes"] / 2**20, "kv_max_mib": kv["max_bytes"] / 2**20, "kv_growths": kv["growths"],
            "prefix_cache_hit_rate": kv.get("prefix_cache_hit_rate"), "state": kv.get("state")}


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
    p.add_argument("--modes", default="memory,disk,off",
                   help="comma-separated, from memory, disk, off, mlx_lm (mlx_lm.server)")
    p.add_argument("--name", default="multiturn", help="report files: OUT_DIR/NAME.md and .json")
    p.add_argument("--quiet-wait", type=float, default=20,
                   help="before each server, wait up to this many seconds for other processes to go idle")
    p.add_argument("--omlx-extra", action="append", default=[], help="extra arg for omlx serve (repeatable)")
    p.add_argument("--mlx-lm-arg", action="append", default=[], help="extra arg for mlx_lm.server (repeatable)")
    p.add_argument("--blas-library", default=DEFAULT_BLAS, help="preloaded for mlx_lm.server")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"memory", "disk", "off", "mlx_lm"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    ensure_model(args.model_path)
    kv = ("--kv-cache-gb", str(args.kv_cache_gb)) if args.kv_cache_gb else ()
    kv = (*kv, *args.omlx_extra)

    ttfts: dict[str, list[list[float]]] = {}
    cached: dict[str, list[list[int]]] = {}
    script = None  # the conversations the first omlx mode sent; later omlx modes replay them
    with tempfile.TemporaryDirectory(prefix="omlx-multiturn-") as tmp:
        tmp = Path(tmp)
        for mode in modes:
            if mode == "memory":
                ttfts[mode], cached[mode], sent = measure(args, "memory", tmp / "memory", *kv, "--no-kv-disk",
                                                          script=script)
            elif mode == "disk":
                # Fill the disk tier with the same conversations, restart, replay them.
                _, _, sent = measure(args, "disk-fill", tmp / "disk", *kv, script=script)
                script = script or sent
                ttfts[mode], cached[mode], _ = measure(args, "disk-after-restart", tmp / "disk", *kv,
                                                       script=script)
            elif mode == "off":
                ttfts[mode], cached[mode], sent = measure(args, "off", tmp / "off", *kv, "--no-prefix-cache",
                                                          script=script)
            else:  # mlx_lm.server, on its own replies
                ttfts[mode], cached[mode], _ = measure(args, "mlx_lm", tmp / "mlx_lm", kind=MLX_LM)
                continue
            script = script or sent

    labels = {"memory": "omlx memory", "disk": "omlx disk (after restart)", "off": "omlx cache off",
              "mlx_lm": "mlx_lm.server"}
    lines = [
        f"# Multi-turn agent sessions: {args.sessions} sessions x {args.turns} turns, "
        f"{args.system_tokens}-token system prompt, {args.user_words}-word user turns, "
        f"{args.max_tokens} output tokens, model {args.model_path.name}",
        "",
        "| turn | " + " | ".join(f"TTFT p50 {labels[m]}" for m in modes)
        + " | cached tokens p50 " + " / ".join(modes) + " |",
        "|---|" + "---|" * len(modes) + "---|",
    ]
    for turn in range(args.turns):
        row = [percentile(ttfts[m][turn], 50) for m in modes]
        hits = [percentile([float(c) for c in cached[m][turn]], 50) for m in modes]
        lines.append(
            f"| {turn + 1} | " + " | ".join(f"{v * 1000:.0f} ms" for v in row)
            + " | " + " / ".join(f"{h:.0f}" for h in hits) + " |"
        )
    if args.turns > 1:
        lines += ["", "Later turns against the cold first turn (TTFT p50 of turn 1 / of turn t):", ""]
        for m in modes:
            first = percentile(ttfts[m][0], 50)
            lines.append(f"- {labels[m]}: " + ", ".join(
                f"turn {t + 1} {first / percentile(ttfts[m][t], 50):.2f}x" for t in range(1, args.turns)))
    lines += ["", "| mode | wall | other processes | peak RSS | KV pool at the end (cap) | pool growths |",
              "|---|---|---|---|---|---|"]
    for mode, m in footprints.items():
        pool = (f"{m['kv_pool_mib']:.0f} MiB ({m['kv_max_mib']:.0f} MiB) | {m['kv_growths']}"
                if "kv_pool_mib" in m else "- | -")
        lines.append(f"| {mode} | {m['wall_s']:.0f} s | {m['other_cores']:.2f} cores | "
                     f"{m['peak_rss_mib']:.0f} MiB | {pool} |")
    report = "\n".join(lines)
    print(report)
    (args.out_dir / f"{args.name}.md").write_text(report + "\n")
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(
        {**ttfts, "cached": cached, "footprints": footprints, "argv": sys.argv}
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
