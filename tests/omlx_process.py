"""Start a real `omlx serve` subprocess with chosen flags, env and OMLX_HOME, for tests that
need a server configured differently from the session-wide one in conftest."""

from __future__ import annotations

import contextlib
import json
import socket
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVER_START_TIMEOUT_S = 60.0


@dataclass
class RunningServer:
    root: str  # http://127.0.0.1:PORT
    base_url: str  # http://127.0.0.1:PORT/v1
    log_path: Path
    model_dir: Path
    process: subprocess.Popen

    def model_path(self, model: str) -> Path:
        return self.model_dir / model

    def health(self) -> dict:
        with urllib.request.urlopen(self.root + "/health", timeout=10) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def omlx_server(
    model_dir: Path, workdir: Path, *args: str, env: dict | None = None, block_size: int = 16,
    failure=None,
):
    """Yield a RunningServer serving `model_dir`, with OMLX_HOME=`workdir/home`.

    `failure(message)` reports a server that does not come up (pytest.fail in fixtures);
    by default it raises RuntimeError.
    """
    port = _free_port()
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "omlx.log"
    cmd = [sys.executable, "-m", "omlx", "serve", "--model-dir", str(model_dir), "--port", str(port),
           "--no-demo", "--no-hf-cache", "--block-size", str(block_size), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
    full_env["OMLX_HOME"] = str(home)
    # The matmul path is part of what a test asserts (float32 for token-exact ones, see conftest).
    full_env["OMLX_MATMUL"] = os.environ.get("OMLX_MATMUL", "float32")
    full_env.update(env or {})
    root = f"http://127.0.0.1:{port}"
    fail = failure or _raise
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
        running = RunningServer(root, root + "/v1", log_path, model_dir, process)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    fail(f"omlx serve exited with {process.returncode}:\n{running.log_tail()}")
                try:
                    running.health()
                    break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    fail(f"omlx serve did not answer /health within {SERVER_START_TIMEOUT_S}s:\n{running.log_tail()}")
                time.sleep(0.2)
            yield running
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _raise(message: str):
    raise RuntimeError(message)


def call(server: RunningServer, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; error statuses are returned, not raised."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server.root + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
