"""What the cache-aware router buys: `omlx cluster` with two replicas, once per router policy,
driven by agents that share system prompts. Reports the prompt tokens each policy had to compute
(prefix-cache queries minus hits, summed over the replicas' /metrics) and the wall time.

    .venv/bin/python bench/cluster_routing_bench.py [--prompts 5] [--agents 6] \
        [--runs vllm-router:cache_aware smg:cache_aware vllm-router:round_robin] [--concurrency 1]
        [omlx serve flags for each replica]

By default agents take turns (one request at a time, the groups interleaved); `--concurrency 8`
has eight in flight at once. The tiny random model keeps the numbers about prefill work, not
about a real model's speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_cluster import _consecutive_free_ports  # noqa: E402

from omlx.testing.tiny_models import TinyModelSpec, build_model  # noqa: E402


def totals(replica_urls: list[str]) -> dict[str, float]:
    out = {"queries": 0.0, "hits": 0.0}
    for url in replica_urls:
        text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name == "omlx:prefix_cache_queries_total":
                out["queries"] += float(line.rsplit(" ", 1)[1])
            elif name == "omlx:prefix_cache_hits_total":
                out["hits"] += float(line.rsplit(" ", 1)[1])
    return out


def run_policy(router: str, policy: str, model_dir: Path, work: Path, prompts: int, agents: int,
               concurrency: int, serve_args: list[str]) -> dict:
    port = _consecutive_free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    name = f"{router}-{policy}"
    env["OMLX_HOME"] = str(work / name)
    process = subprocess.Popen(
        [sys.executable, "-m", "omlx", "cluster", "--replicas", "2", "--router-port", str(port),
         "--router", router, "--served-model", "tiny",
         "--policy", policy, "--log-dir", str(work / name / "logs"), "--model-dir", str(model_dir),
         "--no-demo", "--no-hf-cache", *serve_args],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        described = None
        while described is None:
            line = process.stdout.readline()
            if not line:
                raise SystemExit(f"omlx cluster exited with {process.wait()}")
            if line.startswith("{"):
                described = json.loads(line)
        replicas = [r["url"] for r in described["replicas"]]
        client = openai.OpenAI(base_url=described["router"], api_key="none", max_retries=0)
        systems = [f"You are agent team {p}. " + " ".join(
            f"Rule {i}: team {p} checks item {i * 7 + p}." for i in range(60)) for p in range(prompts)]
        before = totals(replicas)
        start = time.perf_counter()

        def turn(job):
            agent, system = job
            client.chat.completions.create(
                model="tiny", max_tokens=8, temperature=0,
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": f"Agent {agent}: your task."}])

        jobs = [(agent, system) for agent in range(agents) for system in systems]
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(turn, jobs))
        wall = time.perf_counter() - start
        after = totals(replicas)
        queries = after["queries"] - before["queries"]
        hits = after["hits"] - before["hits"]
        return {"router": router, "policy": policy, "concurrency": concurrency, "requests": prompts * agents, "prompt_tokens": queries,
                "hit_tokens": hits, "computed_tokens": queries - hits,
                "hit_rate": round(hits / queries, 3) if queries else None, "wall_s": round(wall, 2)}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=5, help="distinct shared system prompts (odd: round robin then moves each between replicas)")
    parser.add_argument("--agents", type=int, default=6, help="agents per system prompt")
    parser.add_argument("--runs", nargs="+", default=["vllm-router:cache_aware", "smg:cache_aware",
                                                      "vllm-router:round_robin"],
                        help="router:policy pairs")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (1: agents take turns)")
    args, serve_args = parser.parse_known_args()  # the rest goes to each replica's `omlx serve`
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_model(work / "models" / "tiny", TinyModelSpec())
        for run in args.runs:
            router, policy = run.split(":")
            print(json.dumps(run_policy(router, policy, work / "models", work, args.prompts, args.agents,
                                        args.concurrency, serve_args or ["--kv-cache-gb", "0.2"])), flush=True)


if __name__ == "__main__":
    main()
