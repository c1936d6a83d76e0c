"""The prefix cache's disk tier: TTFT of a ~1000-token prompt computed from scratch (tier off
and tier on), loaded from disk after a restart, and half loaded from disk.

Drives the real server (`python -m omlx serve`, through bench/serving_bench.py's `Server`),
one server at a time, each request alone (sequential, streaming, temperature 0).  Every
prompt is a chat of a `--system-tokens` system message and a `--user-tokens` user message
of random words (seeded), distinct per repetition, so nothing is shared by accident.

  off         a server with `--no-kv-disk`: the A and B prompts computed from scratch (run
              before and again after `fill`, on fresh servers; both runs are pooled).
  fill        a fresh server with the disk tier on (an empty `--kv-cache-dir`): the same A and
              B prompts, from scratch again, while their blocks are written behind.  Stopped
              gracefully (pending writes land).
  disk        restart (a fresh server on the same directory: nothing in memory): the A prompts
              again, every full block loaded from disk (files in the OS page cache).
  memory hit  the same A prompts once more on that server: now hits in memory.
  half        on the same server: each B prompt's system message with a new user message, so
              the first half of its blocks comes from disk and the rest is computed.
  cold disk   restart again, with the tier's files evicted from the page cache
              (fsync + posix_fadvise DONTNEED, checked with fincore when present) before each
              request: the A prompts loaded from the storage device itself.
  cold half   the B system messages with yet another user message, files evicted likewise.

    python bench/kv_disk_bench.py               # ~8 minutes on 2 CPU cores
    python bench/kv_disk_bench.py --reps 2 --system-tokens 200 --user-tokens 200   # smoke run

Writes bench/results/kv_disk.md and .json (and a timestamped copy of each); server logs go to
bench/results/logs/kvdisk-<timestamp>/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import (  # noqa: E402  (the bench directory is not a package)
    OMLX,
    CpuMeter,
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


def chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def evict_page_cache(directory: Path) -> dict:
    """Drop the tier's files from the OS page cache (no root needed for our own files)."""
    files = [p for p in directory.rglob("*.safetensors") if p.is_file()]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    resident = None
    if files and shutil.which("fincore"):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files[:2000])],
                             capture_output=True, text=True)
        if out.returncode == 0:
            resident = sum(int(x) for x in out.stdout.split() if x.isdigit())
    return {"files": len(files), "resident_bytes_after": resident}


class Phase:
    def __init__(self, name: str):
        self.name = name
        self.ttfts: list[float] = []
        self.cached: list[int] = []
        self.prompt_tokens: list[int] = []
        self.other_cores: float | None = None

    def summary(self) -> dict:
        return {"ttft_p50": percentile(self.ttfts, 50), "ttft_min": min(self.ttfts, default=None),
                "ttft_max": max(self.ttfts, default=None), "ttfts": self.ttfts, "cached_tokens": self.cached,
                "prompt_tokens": self.prompt_tokens, "other_cores": self.other_cores}


async def send_all(server: Server, prompts: list[list[dict]], phase: Phase, args, before=None) -> None:
    url = server.base_url + "/v1/chat/completions"
    meter = CpuMeter(server.proc.pid)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as http:
        for i, messages in enumerate(prompts):
            if before is not None:
                before()
            await asyncio.sleep(args.gap)
            result = await stream_chat(http, url, server.model_id, messages, args.max_tokens, i)
            if result.error or result.ttft is None:
                raise RuntimeError(f"{phase.name} request {i}: {result.error or 'no content'}\n{server.log_tail()}")
            phase.ttfts.append(result.ttft)
            phase.cached.append(result.cached_tokens or 0)
            phase.prompt_tokens.append(result.prompt_tokens or 0)
            log(f"  {phase.name} {i}: TTFT {result.ttft * 1000:.0f} ms, "
                f"{result.cached_tokens} of {result.prompt_tokens} prompt tokens cached")
    phase.other_cores = meter.read()["other_cores"]


def start(args, tag: str, home: Path, *flags: str) -> Server:
    args.omlx_arg = ["--kv-cache-gb", str(args.kv_cache_gb), *flags]
    server = Server(OMLX, args, args.log_dir, tag)
    server.env_overrides = {"OMLX_HOME": str(home), "OMLX_KV_DISK": None}
    wait_for_quiet(args.quiet_wait)
    server.start()
    server.wait_ready()
    server.warm_up(PromptFactory(args.model_path, seed=99))  # loads the model
    return server


def disk_stats(server: Server) -> dict:
    health = server.health() or {}
    model = next(iter((health.get("models") or {}).values()), {})
    return (model.get("kv_cache") or {}).get("disk") or {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=REPO / "bench/models/bench-200m")
    p.add_argument("--reps", type=int, default=5, help="prompts per set (A: full reloads, B: half reloads)")
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--user-tokens", type=int, default=480)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--gap", type=float, default=0.5, help="seconds between requests")
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--quiet-wait", type=float, default=30)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the servers' homes and the disk tier live (default: a fresh folder "
                        "under bench/results/, on the same filesystem as ~/.omlx here; removed after)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    args = p.parse_args(argv)
    args.mlx_lm_arg, args.blas_library = [], None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir = args.out_dir / "logs" / f"kvdisk-{stamp}"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model_path)
    work = args.work_dir or (args.out_dir / f"kvdisk-work-{stamp}")
    keep = args.work_dir is not None
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "kv-cache"

    factory = PromptFactory(args.model_path, seed=2024)
    a = [chat(f"Agent A{i}. " + factory.text(args.system_tokens), factory.text(args.user_tokens))
         for i in range(args.reps)]
    b_systems = [f"Agent B{i}. " + factory.text(args.system_tokens) for i in range(args.reps)]
    b = [chat(s, factory.text(args.user_tokens)) for s in b_systems]
    b_half = [chat(s, "Next question. " + factory.text(args.user_tokens)) for s in b_systems]
    b_half_cold = [chat(s, "Another question. " + factory.text(args.user_tokens)) for s in b_systems]

    phases: dict[str, Phase] = {}
    meta: dict = {"stamp": stamp, "args": {k: str(v) for k, v in vars(args).items()}}

    def run(server, name, prompts, before=None):
        phase = phases.setdefault(name, Phase(name))  # a second run of a phase adds samples
        other = phase.other_cores
        asyncio.run(send_all(server, prompts, phase, args, before))
        phase.other_cores = max(phase.other_cores, other or 0.0)

    def tier_off():
        server = start(args, "off", work / f"home-off-{len(phases.get('off', Phase('')).ttfts)}", "--no-kv-disk")
        try:
            run(server, "off", a + b)
            meta.setdefault("peak_rss_mib_off", []).append(proc_status(server.proc.pid).get("VmHWM"))
        finally:
            server.stop()

    try:
        tier_off()
        disk_flags = ("--kv-cache-dir", str(cache_dir))
        server = start(args, "fill", work / "home-on", *disk_flags)
        try:
            run(server, "fill", a + b)
            meta["peak_rss_mib_fill"] = proc_status(server.proc.pid).get("VmHWM")
        finally:
            server.stop()
        files = list(cache_dir.rglob("*.safetensors"))
        meta["disk_files_after_fill"] = len(files)
        meta["disk_bytes_after_fill"] = sum(f.stat().st_size for f in files)
        log(f"disk tier after fill: {len(files)} block files, {meta['disk_bytes_after_fill'] / 2**20:.0f} MiB")
        tier_off()  # before and after the fill: machine load drifts on a shared box

        server = start(args, "restart", work / "home-on", *disk_flags)
        try:
            run(server, "disk", a)
            run(server, "memory hit", a)
            run(server, "half", b_half)
            meta["disk_stats_restart"] = disk_stats(server)
        finally:
            server.stop()

        evictions = []

        def evict():
            evictions.append(evict_page_cache(cache_dir))

        evict()
        server = start(args, "restart-cold", work / "home-on", *disk_flags)
        try:
            run(server, "cold disk", a, before=evict)
            run(server, "cold half", b_half_cold, before=evict)
            meta["disk_stats_restart_cold"] = disk_stats(server)
        finally:
            server.stop()
        meta["evictions"] = evictions[-3:]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    result = {"meta": meta, "phases": {k: v.summary() for k, v in phases.items()}}
    text = report(result, args)
    print(text)
    for name in ("kv_disk", f"kv_disk-{stamp}"):
        (args.out_dir / f"{name}.md").write_text(text + "\n")
        (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


ROWS = [
    ("off", "from scratch, disk tier off (two runs)", "A+B, twice"),
    ("fill", "from scratch, disk tier on (blocks written behind)", "A+B"),
    ("disk", "after a restart: all full blocks from disk (page cache warm)", "A"),
    ("cold disk", "after a restart: all full blocks from disk, page cache evicted", "A"),
    ("half", "after a restart: first half of the blocks from disk, rest computed", "B'"),
    ("cold half", "the same, page cache evicted", "B''"),
    ("memory hit", "all full blocks in memory (same server, second time)", "A"),
]


def report(result: dict, args) -> str:
    ph = result["phases"]
    base = ph["off"]["ttft_p50"]
    lines = [
        f"# Disk tier: TTFT of a ~{args.system_tokens + args.user_tokens}-token chat prompt, "
        f"{args.model_path.name}, through `omlx serve` ({result['meta']['stamp']})", "",
        f"{args.reps} prompts per set, one request at a time; p50 over the set's requests.", "",
        "| case | prompts | TTFT p50 | min - max | cached / prompt tokens (p50) | speed-up vs from scratch (tier off) | other processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label, prompts in ROWS:
        s = ph.get(key)
        if not s:
            continue
        cached = percentile([float(c) for c in s["cached_tokens"]], 50)
        total = percentile([float(c) for c in s["prompt_tokens"]], 50)
        lines.append(
            f"| {label} | {prompts} | {s['ttft_p50'] * 1000:.0f} ms | {s['ttft_min'] * 1000:.0f} - "
            f"{s['ttft_max'] * 1000:.0f} ms | {cached:.0f} / {total:.0f} | {base / s['ttft_p50']:.2f}x | "
            f"{s['other_cores']:.2f} cores |")
    m = result["meta"]
    lines += ["", f"Tier on / tier off, from scratch: {ph['fill']['ttft_p50'] / base:.3f}x TTFT p50. "
              f"Disk tier after the fill: {m['disk_files_after_fill']} block files, "
              f"{m['disk_bytes_after_fill'] / 2**20:.0f} MiB."]
    ev = m.get("evictions") or []
    if ev and ev[-1].get("resident_bytes_after") is not None:
        lines.append(f"After each eviction fincore reported {ev[-1]['resident_bytes_after']} bytes of the "
                     f"{ev[-1]['files']} files still resident.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
