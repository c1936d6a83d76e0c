"""`omlx cluster`: N local `omlx serve` replicas behind an existing cache-aware router.

The default router is the Shepherd Model Gateway (PyPI `smg`, `smg launch --policy cache_aware`):
it keeps an approximate radix tree of the prompts it has sent to each replica and sends a request
to the replica whose tree shares the longest prefix with it, so agents that share a system prompt
land where that prompt's KV already sits in omlx's prefix cache, and it retries a request on
another replica when one does not answer. `--router vllm-router` runs vLLM's router instead
(Linux wheels only). Picked by measurement (bench/cluster_routing_bench.py, README "Several
replicas"): taking turns, both send every agent of a system prompt to one replica; with eight
requests in flight, vllm-router's cache_aware spreads them by load and recomputes as much as
round robin, while smg still follows the prefix.

What smg needs from a worker that omlx does not give the way smg expects: given `--worker-urls`,
smg registers each worker under the *first* id of its `GET /v1/models` and routes only that
model, and omlx lists every model it serves (the packaged embedding model first). So the cluster
starts smg with no workers (`--enable-igw`) and registers each replica through smg's
`POST /workers`, naming the model it serves (`--served-model`, default the first chat model).
Health (`GET /health`) and the OpenAI routes it forwards are omlx's own.

This module only starts, watches and stops processes: replicas on consecutive ports, each with its
own disk-tier folder (two servers must not share one), the router once every replica answers
`/health`, and on SIGTERM/SIGINT the router first, then the replicas.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
# How often the router probes each replica's /health: a replica that died stops being chosen
# within this, and one that comes back is chosen again.
HEALTH_CHECK_INTERVAL_S = 1
# serve flags the cluster sets per replica itself.
RESERVED_SERVE_FLAGS = ("--port", "--host", "--paged-ssd-cache-dir", "--kv-cache-dir", "--base-path")


class ClusterError(Exception):
    """A cluster that cannot start: said to the user, exit status 1."""


@dataclass
class ClusterPlan:
    replicas: int
    router_port: int
    first_replica_port: int
    host: str
    serve_args: list[str]
    kv_root: Path
    policy: str = "cache_aware"
    router_metrics_port: int | None = None
    router: str = "smg"  # or "vllm-router"
    served_model: str | None = None  # smg: the model id each replica is registered under

    @property
    def replica_ports(self) -> list[int]:
        return [self.first_replica_port + i for i in range(self.replicas)]

    def replica_url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    @property
    def router_url(self) -> str:
        return f"http://{self.host}:{self.router_port}"

    def replica_command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "omlx", "serve", "--host", self.host, "--port", str(port),
                "--paged-ssd-cache-dir", str(self.kv_root / f"replica-{port}"), *self.serve_args]

    @property
    def metrics_port(self) -> int:
        # Both routers' Prometheus exporters bind a fixed port (29000) by default: two clusters
        # on one machine would collide, so it takes the port after the last replica's.
        return self.router_metrics_port or self.replica_ports[-1] + 1

    def router_command(self) -> list[str]:
        binary = shutil.which(self.router) or str(Path(sys.executable).with_name(self.router))
        if not Path(binary).exists():
            raise ClusterError(f"{self.router} is not installed (pip install 'omlx[cluster]' or "
                               f"pip install {self.router})")
        if self.router == "smg":
            return [binary, "launch", "--enable-igw", "--host", self.host, "--port", str(self.router_port),
                    "--policy", self.policy, "--prometheus-port", str(self.metrics_port)]
        return [binary, "--host", self.host, "--port", str(self.router_port),
                "--worker-urls", *[self.replica_url(p) for p in self.replica_ports],
                "--policy", self.policy,
                "--prometheus-port", str(self.metrics_port),
                "--health-check-endpoint", "/health",
                "--health-check-interval-secs", str(HEALTH_CHECK_INTERVAL_S),
                "--worker-startup-timeout-secs", str(int(STARTUP_TIMEOUT_S))]


def check_serve_args(serve_args: list[str]) -> None:
    for arg in serve_args:
        name = arg.split("=", 1)[0]
        if name in RESERVED_SERVE_FLAGS:
            raise ClusterError(f"{name} is set by omlx cluster for each replica; use --router-port, "
                               "--first-replica-port, --cluster-host or --kv-root instead")


def first_chat_model(replica_url: str) -> str:
    """The replica's first model that is not a packaged embedding model: what smg routes when the
    user names none."""
    from omlx.embeddings.packaged import PACKAGED_MODELS

    packaged = {model_id for _, _, model_id in PACKAGED_MODELS}
    with urllib.request.urlopen(replica_url + "/v1/models", timeout=10) as response:
        ids = [m["id"] for m in json.loads(response.read())["data"]]
    chat = [i for i in ids if i not in packaged]
    if not chat:
        raise ClusterError("the replicas serve no chat model")
    return chat[0]


def registered_workers(router_url: str, model: str) -> int:
    try:
        with urllib.request.urlopen(router_url + "/workers", timeout=5) as response:
            workers = json.loads(response.read())["workers"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return 0
    return sum(1 for w in workers if w.get("model_id") == model and w.get("is_healthy"))


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Cluster:
    """The running processes of a plan; `stop()` ends them, router first."""

    plan: ClusterPlan
    log_dir: Path | None = None
    replicas: dict[int, subprocess.Popen] = field(default_factory=dict)
    router: subprocess.Popen | None = None

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen:
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")
        # Its own process group: Ctrl-C in a terminal reaches the cluster, which then stops the
        # children in order, instead of every child at once.
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT if output else None,
                                start_new_session=True)

    def start(self) -> None:
        plan = self.plan
        for port in plan.replica_ports:
            self.replicas[port] = self._spawn(plan.replica_command(port), f"replica-{port}")
        self._wait_for(
            {port: plan.replica_url(port) + "/health" for port in plan.replica_ports},
            lambda port: self.replicas[port], "replica")
        self.router = self._spawn(plan.router_command(), "router")
        self._wait_for({plan.router_port: plan.router_url + "/health"}, lambda _: self.router, "router")
        if plan.router == "smg":
            self._register_with_smg()

    def _register_with_smg(self) -> None:
        plan = self.plan
        model = plan.served_model or first_chat_model(plan.replica_url(plan.replica_ports[0]))
        for port in plan.replica_ports:
            body = {"url": plan.replica_url(port), "models": [{"id": model}],
                    "labels": {"served_model_name": model}}
            request = urllib.request.Request(plan.router_url + "/workers", data=json.dumps(body).encode(),
                                             method="POST", headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=10).close()
            except (urllib.error.URLError, OSError) as exc:
                raise ClusterError(f"smg refused replica {port}: {exc}") from None
        # Registration is queued inside smg: wait until it routes the model to every replica.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while registered_workers(plan.router_url, model) < plan.replicas:
            if time.monotonic() > deadline:
                raise ClusterError(f"smg did not register the replicas for {model}")
            time.sleep(0.2)

    def _wait_for(self, urls: dict[int, str], process_of, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = dict(urls)
        while pending:
            for port, url in list(pending.items()):
                process = process_of(port)
                if process.poll() is not None:
                    raise ClusterError(f"{what} on port {port} exited with {process.returncode} "
                                       "before answering")
                if answers(url):
                    del pending[port]
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"{what}(s) on port(s) {sorted(pending)} did not answer within "
                                   f"{STARTUP_TIMEOUT_S:.0f}s")
            if pending:
                time.sleep(0.3)

    def stop(self) -> None:
        """The router first (no new requests reach a replica that is stopping), then every
        replica at once: each drains its streams under its own --shutdown-grace."""
        if self.router is not None:
            _terminate([self.router])
        _terminate(list(self.replicas.values()))

    def describe(self) -> dict:
        return {
            "router": self.plan.router_url + "/v1",
            "router_kind": self.plan.router,
            "policy": self.plan.policy,
            "replicas": [{"url": self.plan.replica_url(port) + "/v1", "pid": process.pid}
                         for port, process in self.replicas.items()],
        }


def _terminate(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_cluster(plan: ClusterPlan, log_dir: Path | None = None) -> int:
    """Start the cluster, print where it listens (one JSON line, then a sentence), and keep it up
    until SIGTERM/SIGINT (exit 0) or the router dies (exit 1). A replica that dies is left down,
    said once: the router routes around it."""
    check_serve_args(plan.serve_args)
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    cluster = Cluster(plan, log_dir)
    try:
        try:
            cluster.start()
        except ClusterError as exc:
            print(f"omlx cluster: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(cluster.describe()), flush=True)
        print(f"omlx cluster: {plan.router} listening on {plan.router_url}/v1 "
              f"({plan.policy}) in front of {plan.replicas} replicas on ports "
              f"{plan.replica_ports[0]}-{plan.replica_ports[-1]}", flush=True)
        reported_dead: set[int] = set()
        while not stop_requested.wait(0.5):
            if cluster.router.poll() is not None:
                print(f"omlx cluster: the router exited with {cluster.router.returncode}; stopping",
                      file=sys.stderr, flush=True)
                return 1
            for port, process in cluster.replicas.items():
                if process.poll() is not None and port not in reported_dead:
                    reported_dead.add(port)
                    print(f"omlx cluster: replica on port {port} exited with {process.returncode}; "
                          "the router sends its traffic to the others", file=sys.stderr, flush=True)
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_cluster_parser(commands) -> None:
    cluster = commands.add_parser(
        "cluster", help="start N omlx replicas behind a cache-aware router (smg); "
                        "arguments it does not know go to every `omlx serve`")
    cluster.add_argument("--replicas", type=int, default=2, help="how many replicas (2)")
    cluster.add_argument("--router-port", type=int, default=8000, help="where the router listens (8000)")
    cluster.add_argument("--first-replica-port", type=int,
                         help="replica i listens on this + i (default: router port + 1)")
    cluster.add_argument("--cluster-host", default="127.0.0.1",
                         help="the address the router and the replicas bind (127.0.0.1)")
    cluster.add_argument("--router", choices=("smg", "vllm-router"), default="smg",
                         help="which router: smg (the Shepherd Model Gateway) or vllm-router "
                              "(Linux only; spreads concurrent requests by load, see README)")
    cluster.add_argument("--served-model", metavar="MODEL",
                         help="with --router smg: the model smg routes (default: the replicas' first "
                              "chat model)")
    cluster.add_argument("--policy", default="cache_aware",
                         help="the router's policy (cache_aware; round_robin to measure what it buys)")
    cluster.add_argument("--kv-root", type=Path,
                         help="each replica's disk tier goes in its own folder under this "
                              "(default $OMLX_HOME/cluster-kv)")
    cluster.add_argument("--log-dir", type=Path,
                         help="write each process's output to a file here instead of this terminal")


def run_cluster_command(args, serve_args: list[str]) -> int:
    from omlx.settings import omlx_home

    if args.replicas < 1:
        print("omlx cluster: --replicas must be at least 1", file=sys.stderr)
        return 2
    plan = ClusterPlan(
        replicas=args.replicas, router_port=args.router_port,
        first_replica_port=args.first_replica_port or args.router_port + 1,
        host=args.cluster_host, serve_args=serve_args,
        kv_root=(args.kv_root or omlx_home() / "cluster-kv").expanduser(), policy=args.policy,
        router=args.router, served_model=args.served_model)
    try:
        return run_cluster(plan, args.log_dir)
    except ClusterError as exc:
        print(f"omlx cluster: {exc}", file=sys.stderr)
        return 1
