"""A bounded run (15 s) of bench/soak.py (the long run is by hand; figures in bench/README.md): many
clients with random disconnects, cancellations, n > 1, JSON constraints and stop strings,
then zero 5xx, zero broken streams, no sequence left, zero leaked KV blocks, RSS back within
its margin, an unchanged canary answer, and a clean exit of the server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bounded_soak_leaves_the_server_as_it_found_it(tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "15", "--clients", "6",
                          "--port", str(_free_port()), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, json.dumps(report, indent=1)[:4000]
    assert run.returncode == 0
    # The workload did what it says: streams cut short and requests cancelled among many.
    assert report["requests"] > 50 and report["disconnects"] > 0 and report["cancellations"] > 0, report
    assert report["canary_answers"] >= 5
