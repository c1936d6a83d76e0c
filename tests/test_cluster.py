"""`omlx cluster`: two real `omlx serve` replicas behind each real router (vllm-router, smg;
policy cache_aware),
driven with the OpenAI SDK through the router; where requests landed is read from each
replica's own /metrics (requests served, prefix-cache hit tokens)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from free_ports import consecutive_free_ports
from omlx.cluster import HEALTH_CHECK_INTERVAL_S
from omlx.testing.tiny_models import TinyModelSpec, build_endless_model


# One model (smg routes one model per cluster), which never stops by itself: every answer runs to
# max_tokens, so the kill test's streams are surely in flight when a replica dies.
MODEL = "tiny-endless"
KILL_TEST_TOKENS = 2000  # long enough that no stream ends between the last one starting and the kill
START_TIMEOUT_S = 90.0
# A system prompt of well over a thousand tokens, shared by every agent of a test.
SYSTEM_PROMPT = "You are a careful agent. " + " ".join(
    f"Rule {i}: check item {i * 7} before touching item {i * 7 + 1}." for i in range(60))


def _counters(replica_url: str) -> dict[str, float]:
    """The replica's served requests and prefix-cache hit tokens, summed over labels."""
    root = replica_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"omlx:request_success_total": 0.0, "omlx:prefix_cache_hits_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return {"served": totals["omlx:request_success_total"],
            "prefix_hits": totals["omlx:prefix_cache_hits_total"]}


class RunningCluster:
    def __init__(self, process: subprocess.Popen, described: dict, log_dir: Path):
        self.process = process
        self.router = described["router"]
        self.router_kind = described["router_kind"]
        self.replicas = [r["url"] for r in described["replicas"]]
        self.pids = [r["pid"] for r in described["replicas"]]
        self.log_dir = log_dir

    def client(self) -> openai.OpenAI:
        # No SDK retries: a request the cluster loses must show up as lost.
        return openai.OpenAI(base_url=self.router, api_key="none", max_retries=0, timeout=60)

    def counters(self) -> list[dict[str, float]]:
        return [_counters(url) for url in self.replicas]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module", params=["smg", "vllm-router"])
def cluster(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    build_endless_model(root / "models" / MODEL, TinyModelSpec())
    router_port = consecutive_free_ports(4)  # router, two replicas, the router's metrics
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    env["OMLX_HOME"] = str(root / "home")
    log_dir = root / "logs"
    process = subprocess.Popen(
        [sys.executable, "-m", "omlx", "cluster", "--router", request.param, "--served-model", MODEL,
         "--replicas", "2", "--router-port", str(router_port),
         "--log-dir", str(log_dir), "--model-dir", str(root / "models"), "--no-demo", "--no-hf-cache",
         "--kv-cache-gb", "0.05", "--block-size", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    described = None
    deadline = time.monotonic() + START_TIMEOUT_S
    output = []
    while described is None:
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=30)
            pytest.fail(f"omlx cluster exited with {process.returncode}:\n{''.join(output)}")
        output.append(line)
        if line.startswith("{"):
            described = json.loads(line)
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("omlx cluster did not come up:\n" + "".join(output))
    running = RunningCluster(process, described, log_dir)
    yield running
    # SIGTERM stops the router and every replica, and the cluster exits 0.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=40) == 0, running.logs()
    for pid in running.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _ask(client: openai.OpenAI, system: str | None, user: str) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    return reply.choices[0].finish_reason


def _delta(after: list[dict], before: list[dict], key: str) -> list[float]:
    return [a[key] - b[key] for a, b in zip(after, before)]


@pytest.mark.slow
def test_distinct_prompts_spread_over_both_replicas(cluster):
    # Eight unrelated agents at once. What vllm-router does with a prompt that matches no
    # replica's past prompts is pick by load (requests in flight), so unrelated traffic that
    # arrives together spreads; one at a time, a tie, it stays on the first replica (measured).
    client = cluster.client()
    before = cluster.counters()

    def unrelated(i: int):
        words = random.Random(i).choices(["alpha", "brick", "cedar", "delta", "ember", "flint"], k=80)
        return _ask(client, None, f"{i} " + " ".join(words))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(unrelated, range(8)))
    served = _delta(cluster.counters(), before, "served")
    assert sum(served) == 8 and min(served) >= 1, (served, cluster.logs())


@pytest.mark.slow
def test_agents_sharing_a_system_prompt_land_on_one_replica(cluster):
    client = cluster.client()
    before = cluster.counters()

    def agent(i: int):  # eight agents, each with its own task after the shared prompt
        return _ask(client, SYSTEM_PROMPT, f"Agent {i}: list the rules about item {i}.")

    assert agent(0)  # the first one puts the prompt in a replica's cache
    if cluster.router_kind == "smg":
        # smg follows the prefix with requests in flight: the other seven arrive at once.
        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            assert all(pool.map(agent, range(1, 8)))
    else:
        # vllm-router spreads requests in flight by load (README "Several replicas"): one at a time.
        assert all(agent(i) for i in range(1, 8))
    after = cluster.counters()
    served = _delta(after, before, "served")
    hits = _delta(after, before, "prefix_hits")
    assert sorted(served) == [0, 8], (served, cluster.logs())
    home = served.index(8)
    # Seven of the eight found the shared prompt (over a thousand tokens) in that replica's cache.
    assert hits[home] >= 7 * 1000, hits
    assert hits[1 - home] == 0, hits


@pytest.mark.slow
def test_killed_replica_costs_only_its_in_flight_requests(cluster):
    client = cluster.client()
    started = [threading.Event() for _ in range(6)]

    def stream(i: int) -> bool:
        """Whether stream i ran to its length limit (False: it broke off or errored)."""
        # Distinct prompts, so that the router spreads them over both replicas.
        topic = "".join(chr(97 + (i * 7 + j) % 26) for j in range(30))
        try:
            chunks = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"{topic} {i}"}],
                max_tokens=KILL_TEST_TOKENS, temperature=0, stream=True)
            finish = None
            for chunk in chunks:
                started[i].set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return finish == "length"
        except openai.APIError:
            return False
        finally:
            started[i].set()

    before = cluster.counters()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        for event in started:
            assert event.wait(60), cluster.logs()
        # Streams the replica finished before it dies count as served by it: on a loaded
        # machine (a second test worker) the last stream can start after others have ended.
        killed_served = _counters(cluster.replicas[1])["served"] - before[1]["served"]
        os.kill(cluster.pids[1], signal.SIGKILL)  # every other stream is now in flight somewhere
        finished = [f.result(timeout=120) for f in futures]
    survivor_served = _counters(cluster.replicas[0])["served"] - before[0]["served"]
    # The streams that finished are exactly those the survivor served and those the killed
    # replica had finished before it died; the others were in flight on the killed replica
    # (there were some: the router spread them).
    assert sum(finished) == survivor_served + killed_served, (finished, survivor_served, killed_served,
                                                               cluster.logs())
    assert 1 <= finished.count(False) <= 5, (finished, cluster.logs())
    # Later requests all succeed, on the survivor: "later" meaning after the router's health
    # check (every second, set by omlx cluster) has seen the replica gone. Inside that window
    # vllm-router may retry a request onto the dead replica until it gives up with a 500.
    time.sleep(2 * HEALTH_CHECK_INTERVAL_S + 1)
    for i in range(4):
        assert _ask(client, None, f"after the crash {i}")
    assert _counters(cluster.replicas[0])["served"] - before[0]["served"] == survivor_served + 4


def _cluster_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    return subprocess.run([sys.executable, "-m", "omlx", "cluster", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_flags_the_cluster_sets_per_replica_are_refused():
    result = _cluster_cli("--replicas", "2", "--port", "9000")
    assert result.returncode == 1
    assert "--port is set by omlx cluster for each replica" in result.stderr


def test_replicas_must_be_at_least_one():
    result = _cluster_cli("--replicas", "0")
    assert result.returncode == 2
    assert "--replicas must be at least 1" in result.stderr
