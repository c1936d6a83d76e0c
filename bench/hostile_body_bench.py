"""Hostile bodies: how fast a prompt far too long for the context is refused, and how much it
slows everyone else (issue #24).

Starts `omlx serve` on a freshly built tiny model (or uses --url) and measures:
  * one 20 MiB body alone, per route (chat, Anthropic messages, Responses, completions):
    the seconds to its 4xx;
  * a small chat request (48 tokens) alone, then while 1 and 8 clients keep posting 20 MiB
    chat bodies back to back (in pairs: alone, then during): its median and worst latency,
    and the ratio to alone;
  * the event loop's own lag: GET /health (no engine work) alone and during 8 hostile clients.
The hostile clients run in a process of their own.  "text" bodies are one 20 MiB message,
"messages" bodies ~600k tiny ones.

Targets: the 4xx in under 1 s; the small request within 1.5x its time alone, with 1 or 8
hostile clients.  `--source DIR` serves from another checkout (e.g. the tree before the fix,
`git archive <commit> | tar -x -C DIR`) so both can be measured on the same machine state,
alternating: `--source` runs first, then this checkout.

    python bench/hostile_body_bench.py                      # this checkout
    python bench/hostile_body_bench.py --source /tmp/before  # before, then this checkout
    python bench/hostile_body_bench.py --source /tmp/before --rounds 6   # interleaved

`--rounds N` (with --source) runs both servers at once and alternates between them, round by
round (one small request alone, then one during 8 hostile clients, per server and round): on a
machine whose load from other work comes and goes, both see the same drift.

`--floor N` measures what the machine itself allows: two servers of the checkout, the small
request always on the first, alone, while 8 hostile clients post to the second (uploading and
refusing 160 MiB costs the machine CPU whoever refuses it), and while they post to the first
(the server's own share), alternating for N rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from omlx.testing.hostile_bodies import (  # noqa: E402
    LoopLag, hostile_body, many_messages_body, measure_loop_lag, measure_stall, post,
)

ROUTES = ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions")
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: Path, models: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    env.update(OMLX_HOME=str(work / "home"), PYTHONPATH=str(source))
    log = open(work / "omlx.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "omlx", "serve", "--model-dir", str(models), "--port", str(port),
                                "--no-demo", "--no-hf-cache", "--kv-cache-gb", "0.1"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(source))
    root = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(root + "/health", timeout=5).read()
            return process, root
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    raise SystemExit(f"omlx did not start; see {work / 'omlx.log'}")


async def refusal_times(root: str, mib: int) -> dict:
    import aiohttp

    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for route in ROUTES:
            body = hostile_body(route, MODEL, mib << 20)
            status, reply, elapsed = await post(session, root + route, body)
            error = reply.get("error") or {}
            out[route] = {"status": status, "seconds": round(elapsed, 3),
                          "code": error.get("code") or error.get("type")}
        status, reply, elapsed = await post(session, root + "/v1/chat/completions", many_messages_body(MODEL, mib << 20))
        error = reply.get("error") or {}
        out["chat, many tiny messages"] = {"status": status, "seconds": round(elapsed, 3), "code": error.get("code")}
    return out


async def run(root: str, mib: int, samples: int, hostile_counts: list[int], shapes: list[str],
              refusals: bool = True) -> dict:
    results = {"refusal": await refusal_times(root, mib)} if refusals else {}
    for shape in shapes:
        body = (hostile_body("/v1/chat/completions", MODEL, mib << 20) if shape == "text"
                else many_messages_body(MODEL, mib << 20))
        for hostile in hostile_counts:
            results[f"{shape}: small_during_{hostile}"] = await stall_row(root, body, hostile, samples)
        lag = await measure_loop_lag(root, MODEL, hostile=max(hostile_counts), body=body)
        results[f"{shape}: loop_lag_{max(hostile_counts)}"] = {
            "health_alone_p50_s": round(LoopLag.quantile(lag.alone_s, 0.5), 4),
            "health_during_p50_s": round(LoopLag.quantile(lag.during_s, 0.5), 4),
            "health_during_p90_s": round(LoopLag.quantile(lag.during_s, 0.9), 4),
            "health_during_max_s": round(max(lag.during_s), 4),
            "samples": len(lag.during_s),
        }
    return results


async def stall_row(root: str, body: bytes, hostile: int, samples: int) -> dict:
    stall = await measure_stall(root, MODEL, hostile=hostile, samples=samples, body=body)
    return {
        "alone_median_s": round(stall.alone, 3), "during_median_s": round(stall.during, 3),
        "during_worst_s": round(stall.worst_during, 3), "ratio_median": round(stall.ratio, 2),
        "ratio_worst": round(stall.worst_during / stall.alone, 2),
        "hostile_answers": len(stall.hostile_s),
        "hostile_median_s": round(sorted(stall.hostile_s)[len(stall.hostile_s) // 2], 3) if stall.hostile_s else None,
        "hostile_statuses": sorted(set(stall.hostile_statuses)),
    }


async def interleaved(roots: dict[str, str], mib: int, rounds: int, hostile: int) -> dict:
    """Stall pairs for each server in turn, `rounds` times (the order flips every round)."""
    import statistics

    body = hostile_body("/v1/chat/completions", MODEL, mib << 20)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in roots}
    names = list(roots)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            stall = await measure_stall(roots[name], MODEL, hostile=hostile, samples=1, body=body)
            pairs[name].append((stall.alone, stall.during))
    out = {}
    for name, measured in pairs.items():
        ratios = [during / alone for alone, during in measured]
        out[name] = {"alone_median_s": round(statistics.median(a for a, _ in measured), 3),
                     "during_median_s": round(statistics.median(d for _, d in measured), 3),
                     "ratio_of_medians": round(statistics.median(d for _, d in measured)
                                               / statistics.median(a for a, _ in measured), 2),
                     "ratios": [round(r, 2) for r in ratios]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an omlx server already running (serving a model named 'tiny')")
    parser.add_argument("--source", type=Path, help="also measure the checkout in DIR (first)")
    parser.add_argument("--mib", type=int, default=20, help="size of a hostile body (20)")
    parser.add_argument("--samples", type=int, default=5, help="small requests per measurement (5)")
    parser.add_argument("--hostile", default="1,8", help="hostile client counts to measure under (1,8)")
    parser.add_argument("--shapes", default="text,messages",
                        help="hostile bodies: text (one 20 MiB message), messages (~600k tiny ones)")
    parser.add_argument("--before-hostile", default="1",
                        help="with --source: the hostile counts for the old checkout (1: each stall there lasts minutes)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="with --source: both servers up at once, stall pairs alternating for N rounds")
    parser.add_argument("--floor", type=int, default=0,
                        help="two servers of this checkout: the small request during hostile clients on the other "
                             "one and on its own, alternating for N rounds")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    counts = [int(n) for n in args.hostile.split(",")]
    shapes = args.shapes.split(",")
    if args.url:
        results = {"url": asyncio.run(run(args.url.rstrip("/"), args.mib, args.samples, counts, shapes))}
    else:
        from omlx.testing.tiny_models import TinyModelSpec, build_model

        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            models = Path(tmp) / "models"
            build_model(models / MODEL, TinyModelSpec())
            sources = ([("before", args.source)] if args.source else []) + [("this checkout", REPO)]
            if args.rounds:
                results = asyncio.run(_interleave_servers(sources, Path(tmp), models, args, counts))
                sources = []
            elif args.floor:
                results = asyncio.run(_floor_servers(Path(tmp), models, args, max(counts)))
                print(json.dumps(results, indent=2))
                sources = []
            for name, source in sources:
                work = Path(tmp) / name.replace(" ", "-")
                work.mkdir()
                process, root = start_server(source.resolve(), models, work)
                try:
                    before = name == "before"
                    results[name] = asyncio.run(run(
                        root, args.mib, 1 if before else args.samples,
                        [int(n) for n in args.before_hostile.split(",")] if before else counts,
                        ["text"] if before else shapes, refusals=not before))
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                print(f"== {name} ({source})")
                print(json.dumps(results[name], indent=2))
    if args.url:
        print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


async def floor(first: str, second: str, mib: int, rounds: int, hostile: int) -> dict:
    """The small request on `first`: alone, during hostile clients on `second`, during them on
    `first` (see --floor)."""
    import statistics

    import aiohttp

    from omlx.testing.hostile_bodies import _hostile_process, small_body

    body = hostile_body("/v1/chat/completions", MODEL, mib << 20)
    loop = asyncio.get_running_loop()
    times: dict[str, list[float]] = {"alone": [], "hostile_on_other_server": [], "hostile_on_this_server": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def small() -> float:
            status, reply, elapsed = await post(session, first + "/v1/chat/completions", small_body(MODEL))
            assert status == 200, reply
            return elapsed

        await small()
        with _hostile_process(second + "/v1/chat/completions", body, hostile) as other, \
                _hostile_process(first + "/v1/chat/completions", body, hostile) as this:
            for round_ in range(rounds):
                times["alone"].append(await small())
                order = [("hostile_on_other_server", other), ("hostile_on_this_server", this)]
                for key, conn in order if round_ % 2 == 0 else order[::-1]:
                    conn.send("attack")
                    await loop.run_in_executor(None, conn.recv)
                    await asyncio.sleep(0.05)
                    times[key].append(await small())
                    conn.send("stop")
                    await loop.run_in_executor(None, conn.recv)
    alone = statistics.median(times["alone"])
    return {key: {"median_s": round(statistics.median(values), 3),
                  "ratio_to_alone": round(statistics.median(values) / alone, 2),
                  "samples_s": [round(v, 3) for v in values]} for key, values in times.items()}


async def _interleave_servers(sources, tmp: Path, models: Path, args, counts: list[int]) -> dict:
    processes, roots = [], {}
    try:
        for name, source in sources:
            work = tmp / name.replace(" ", "-")
            work.mkdir()
            process, roots[name] = start_server(source.resolve(), models, work)
            processes.append(process)
        results = {}
        for hostile in counts:
            results[f"small_during_{hostile}"] = await interleaved(roots, args.mib, args.rounds, hostile)
            print(json.dumps(results[f"small_during_{hostile}"], indent=2), flush=True)
        return results
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


async def _floor_servers(tmp: Path, models: Path, args, hostile: int) -> dict:
    processes, roots = [], []
    try:
        for _ in range(2):
            work = Path(tempfile.mkdtemp(dir=tmp))
            process, root = start_server(REPO, models, work)
            processes.append(process)
            roots.append(root)
        return {"floor": await floor(roots[0], roots[1], args.mib, args.floor, hostile)}
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
