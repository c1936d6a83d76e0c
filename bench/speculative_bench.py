#!/usr/bin/env python
"""Speculative decoding: omlx with prompt lookup, omlx without, and mlx_lm.server, one run.

Workloads (greedy, streamed):
- edit: the prompt holds a ~300-line source file and asks for it back with one change (what
  coding agents do all day); each client gets its own file.
- chat: a plain question with nothing to copy (speculation must not cost anything here).
Each at 1 and 8 concurrent clients.  Reported per server: decode tok/s per stream (tokens
after the first over the time since the first), aggregate tok/s, TTFT, and omlx's draft
acceptance from /health.  `mlx_lm.server --draft-model` does not apply: no smaller model with
SmolLM2's tokenizer is available offline, and mlx_lm.server has no prompt lookup.

    python bench/speculative_bench.py [--model-path bench/models/smollm2-135m-f32] [--clients 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import (  # noqa: E402  (the bench directory is not a package)
    DEFAULT_BLAS,
    MLX_LM,
    OMLX,
    WORDS,
    PromptFactory,
    Server,
    ensure_model,
    log,
    percentile,
    stream_chat,
    wait_for_quiet,
)

REPO = Path(__file__).resolve().parents[1]
OMLX_OFF = "omlx (no speculation)"


def source_file(seed: int, lines: int = 300) -> str:
    """A plausible Python module: classes, methods, config dicts, string literals."""
    rng = random.Random(seed)
    nouns = ["request", "session", "block", "table", "cache", "token", "model", "stream", "queue", "batch"]
    out = ["import json", "import logging", "", "log = logging.getLogger(__name__)", ""]
    while len(out) < lines:
        noun = rng.choice(nouns)
        other = rng.choice(nouns)
        n = rng.randrange(2, 64)
        out += [
            f"class {noun.title()}{other.title()}Handler:",
            f"    \"\"\"Keeps the {noun} of each {other} and writes it back when asked.\"\"\"",
            "",
            f"    def __init__(self, {noun}_id: int, limit: int = {n}):",
            f"        self.{noun}_id = {noun}_id",
            "        self.limit = limit",
            f"        self.{other}s = []",
            "",
            f"    def add(self, {other}) -> bool:",
            f"        if len(self.{other}s) >= self.limit:",
            f"            log.warning(\"{noun} %d is full\", self.{noun}_id)",
            "            return False",
            f"        self.{other}s.append({other})",
            "        return True",
            "",
            "    def dump(self) -> str:",
            f"        return json.dumps({{\"id\": self.{noun}_id, \"{other}s\": self.{other}s}})",
            "",
            "",
        ]
    return "\n".join(out[:lines])


def edit_conversation(client: int) -> list[dict]:
    code = source_file(100 + client)
    return [{"role": "user", "content": (
        "Here is a Python file:\n```python\n" + code + "\n```\n"
        "Rewrite the whole file exactly as it is, except rename the logger variable `log` to "
        "`logger`. Output only the code.")}]


def chat_conversation(client: int) -> list[dict]:
    rng = random.Random(200 + client)
    topic = " ".join(rng.choice(WORDS) for _ in range(12))
    return [{"role": "user", "content": f"Write a short story about {topic}."}]


async def gather(server: Server, conversations: list[list[dict]], max_tokens: int, timeout: float):
    url = server.base_url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        results = await asyncio.gather(*(stream_chat(http, url, server.model_id, c, max_tokens, i)
                                         for i, c in enumerate(conversations)))
    for r in results:
        if r.error:
            raise RuntimeError(f"{server.kind}: {r.error}\n{server.log_tail()}")
    return results


def speculation_stats(server: Server) -> dict | None:
    health = server.health() or {}
    for stats in (health.get("models_loaded") or {}).values():
        return stats.get("speculative_decoding")
    return None


def measure(server: Server, workload: str, clients: int, args) -> dict:
    make = edit_conversation if workload == "edit" else chat_conversation
    conversations = [make(i) for i in range(clients)]
    before = speculation_stats(server) or {}
    started = time.perf_counter()
    results = asyncio.run(gather(server, conversations, args.max_tokens, args.timeout))
    wall = time.perf_counter() - started
    after = speculation_stats(server) or {}
    drafted = after.get("drafted_tokens", 0) - before.get("drafted_tokens", 0)
    accepted = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
    decode = [r.decode_tps for r in results if r.decode_tps]
    return {
        "decode_tps": statistics.mean(decode) if decode else None,
        "agg_tps": sum(r.tokens for r in results) / wall,
        "ttft_p50": percentile([r.ttft for r in results], 50),
        "tokens": sum(r.tokens for r in results),
        "acceptance": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
    }


def run_server(kind: str, args, factory: PromptFactory) -> dict:
    wait_for_quiet(args.quiet_wait)
    base = OMLX if kind != MLX_LM else MLX_LM
    extra = list(args.omlx_arg) + (["--no-speculative-decoding"] if kind == OMLX_OFF else [])
    server_args = argparse.Namespace(**{**vars(args), "omlx_arg": extra})
    server = Server(base, server_args, args.out_dir, f"speculative-{kind.split()[0]}-{len(extra)}")
    server.start()
    rows = {}
    try:
        server.wait_ready()
        server.warm_up(factory)
        for workload in args.workloads.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                log(f"{kind}: {workload} x{clients}")
                rows[(workload, clients)] = measure(server, workload, clients, args)
                log(f"{kind}: {workload} x{clients}: {rows[(workload, clients)]}")
    finally:
        server.stop()
    return rows


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=REPO / "bench/models/smollm2-135m-f32")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--workloads", default="edit,chat")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--quiet-wait", type=float, default=20)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    p.add_argument("--blas-library", default=DEFAULT_BLAS)
    p.add_argument("--omlx-arg", action="append", default=[])
    p.add_argument("--mlx-lm-arg", action="append", default=[])
    p.add_argument("--servers", default=f"{OMLX},{OMLX_OFF},{MLX_LM}")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model_path)
    factory = PromptFactory(args.model_path, seed=3)
    kinds = args.servers.split(",")
    table = {kind: run_server(kind, args, factory) for kind in kinds}

    print(f"\n# Speculative decoding: {args.model_path.name}, greedy, max_tokens {args.max_tokens}\n")
    print("| workload | clients | server | decode tok/s per stream | aggregate tok/s | TTFT p50 s | acceptance |")
    print("|---|---|---|---|---|---|---|")
    for (workload, clients) in table[kinds[0]]:
        for kind in kinds:
            row = table[kind][(workload, clients)]
            print(f"| {workload} | {clients} | {kind} | {fmt(row['decode_tps'])} | {fmt(row['agg_tps'])} | "
                  f"{fmt(row['ttft_p50'], 2)} | {fmt(row['acceptance'], 2) if row['acceptance'] is not None else '-'} |")
    if OMLX in table:
        print("\n| workload | clients | decode: spec / no spec | decode: spec / mlx_lm.server | aggregate: spec / mlx_lm.server |")
        print("|---|---|---|---|---|")
        for key in table[OMLX]:
            on = table[OMLX][key]
            off = table.get(OMLX_OFF, {}).get(key)
            peer = table.get(MLX_LM, {}).get(key)

            def ratio(a, b, field):
                return fmt(a[field] / b[field], 2) if b and a[field] and b[field] else "-"

            print(f"| {key[0]} | {key[1]} | {ratio(on, off, 'decode_tps')} | {ratio(on, peer, 'decode_tps')} | "
                  f"{ratio(on, peer, 'agg_tps')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
