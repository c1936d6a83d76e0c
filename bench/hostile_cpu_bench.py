"""What a hostile body costs the server, in figures a loaded machine does not blur (issue #24).

Latencies on a 2-core machine shared with other work swing 10x between runs; CPU time and
GIL time per body do not.  For each checkout given (a tree before a change, this one, ...),
on the tests' tiny model, after one small request loaded it:
  * CPU per 20 MiB chat body posted one at a time: the server process and its JSON workers
    apart (from /proc, Linux);
  * with 8 hostile clients posting such bodies back to back for `--seconds`: the bodies
    answered and the server's GIL-held time per body, by thread (py-spy `--gil`, when
    `py-spy` is on PATH or given with --py-spy; `pip install -e ".[profile-bench]"`).  GIL time is what
    every other request's Python work (the event loop's, the engine thread's) waits behind.
Checkouts alternate, `--repeat` times.

    git archive <commit> | tar -x -C /tmp/before
    python bench/hostile_cpu_bench.py /tmp/before .
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from hostile_body_bench import MODEL, start_server  # noqa: E402
from omlx.testing.hostile_bodies import _hostile_process, hostile_body, post, small_body  # noqa: E402

SAMPLE_HZ = 200


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


async def cpu_per_body(root: str, pid: int, body: bytes, bodies: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await post(session, root + "/v1/chat/completions", body)  # the JSON workers started
        workers = child_pids(pid)
        server, children = process_cpu_s(pid), sum(process_cpu_s(c) for c in workers)
        for _ in range(bodies):
            status, _, _ = await post(session, root + "/v1/chat/completions", body)
            assert status == 400, status
        return {"server_cpu_ms": round((process_cpu_s(pid) - server) / bodies * 1000, 1),
                "json_workers_cpu_ms": round((sum(process_cpu_s(c) for c in child_pids(pid)) - children)
                                             / bodies * 1000, 1)}


async def gil_per_body(root: str, pid: int, body: bytes, seconds: int, spy: str, out: Path) -> dict:
    loop = asyncio.get_running_loop()
    with _hostile_process(root + "/v1/chat/completions", body, 8) as conn:
        conn.send("attack")
        await loop.run_in_executor(None, conn.recv)  # every hostile client has sent a body
        record = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", str(SAMPLE_HZ),
                                   "-f", "raw", "-o", str(out), "--threads", "--nonblocking", "--gil"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await loop.run_in_executor(None, record.wait)
        conn.send("stop")
        times, _ = await loop.run_in_executor(None, conn.recv)
    threads: collections.Counter = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            name = stack.split(";")[0].split(": ", 1)[-1].rstrip(")")
            threads[name.rstrip("_0123456789")] += int(count)
    bodies = max(1, len(times))
    return {"bodies_answered": len(times),
            "gil_ms_per_body": round(sum(threads.values()) / SAMPLE_HZ / bodies * 1000, 1),
            "gil_busy_fraction": round(sum(threads.values()) / SAMPLE_HZ / seconds, 2),
            "by_thread_ms": {t: round(n / SAMPLE_HZ / bodies * 1000, 1) for t, n in threads.most_common(5)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", nargs="+", type=Path, help="source trees to serve from, measured in turn")
    parser.add_argument("--bodies", type=int, default=6, help="bodies posted one at a time for the CPU figure (6)")
    parser.add_argument("--seconds", type=int, default=20, help="GIL recording under 8 hostile clients (20)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over the checkouts (2)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable (GIL figures)")
    args = parser.parse_args()
    from omlx.testing.tiny_models import TinyModelSpec, build_model

    body = hostile_body("/v1/chat/completions", MODEL, 20 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build_model(models / MODEL, TinyModelSpec())
        for _ in range(args.repeat):
            for checkout in args.checkouts:
                work = Path(tempfile.mkdtemp(dir=tmp))
                process, root = start_server(checkout.resolve(), models, work)
                try:
                    asyncio.run(post_small(root))
                    row = asyncio.run(cpu_per_body(root, process.pid, body, args.bodies))
                    if args.py_spy:
                        row.update(asyncio.run(gil_per_body(root, process.pid, body, args.seconds, args.py_spy,
                                                            work / "gil.txt")))
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                print(f"{checkout}: {row}", flush=True)


async def post_small(root: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        status, reply, _ = await post(session, root + "/v1/chat/completions", small_body(MODEL))
        assert status == 200, reply


if __name__ == "__main__":
    main()
