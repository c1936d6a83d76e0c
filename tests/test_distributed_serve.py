"""`omlx serve --distributed` under `mlx.launch --backend ring -n 2` on one machine (issue #25,
part 2): rank 0's HTTP server answers the openai SDK with mlx-lm's greedy tokens on the whole
model (concurrent requests, the model sharded over both ranks), SIGTERM to rank 0 stops both
ranks cleanly, and a killed rank 1 ends every streaming request with an error and rank 0's
process within a bound.  Real processes; the two tests share one group start each."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from free_ports import ring_port_flags
from omlx.testing.rank_processes import rank_pids
from omlx.testing.tiny_models import TinyModelSpec, build_model
from conftest import chat_prompt_ids, reference_greedy, tokenizer_of

LAUNCH = Path(sys.executable).with_name("mlx.launch")
pytestmark = [
    pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python"),
    pytest.mark.slow,  # two ranks launched as processes per test
]
START_TIMEOUT_S = 120
STEP_TIMEOUT_S = 5  # the fault test's --distributed-step-timeout
FAULT_BOUND_S = 30  # a dead rank: every client hears of it, and rank 0 is gone, within this


class Group:
    def __init__(self, tmp_path: Path, model_dir: Path, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = tmp_path / "group.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_")}
        env.update(OMLX_HOME=str(tmp_path / "home"), OMLX_MATMUL="float32",
                   PYTHONPATH=str(Path(__file__).parents[1]))
        command = [str(LAUNCH), "--backend", "ring", "-n", "2", *ring_port_flags(), "--python", sys.executable, "--",
                   "-m", "omlx", "serve", "--distributed", "--model-dir", str(model_dir), "--no-demo",
                   "--no-hf-cache", "--port", str(self.port), "--block-size", "16", *flags]
        self.log_file = open(self.log_path, "wb")
        # Its own session: whatever happens, the launcher and both ranks go together.
        self.proc = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the group exited:\n{self.log()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5).read()
                return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"rank 0 did not answer /health:\n{self.log()[-3000:]}")

    def rank_pids(self) -> dict[int, int]:
        """Rank -> pid of each rank's Python process (MLX_RANK in its environment)."""
        return rank_pids(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log_file.close()


@pytest.fixture
def model_dir(tmp_path):
    build_model(tmp_path / "models" / "tiny-llama", TinyModelSpec(model_type="llama", seed=3))
    build_model(tmp_path / "models" / "other-llama", TinyModelSpec(model_type="llama", seed=4))
    return tmp_path / "models"


@pytest.fixture
def group(tmp_path, model_dir, request):
    # A rank killed inside a collective leaves the others waiting in it (the ring backend
    # raises only for a peer lost between collectives): the step timeout is what notices.
    g = Group(tmp_path, model_dir, "--preload", "tiny-llama", *getattr(request, "param", ()))
    try:
        g.wait_up()
        yield g
    finally:
        g.close()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0


def test_two_ranks_serve_mlx_lms_tokens_and_stop_cleanly(group, model_dir):
    path = model_dir / "tiny-llama"
    tokenizer = tokenizer_of(path)
    client = openai.OpenAI(base_url=group.base_url, api_key="x", max_retries=0, timeout=120)
    prompts = [f"Tell me about rank {i} and the number {i * 7}." for i in range(6)]

    def ask(i: int):
        messages = [{"role": "user", "content": prompts[i]}]
        reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5 + i,
                                               temperature=0)
        assert reply.usage.completion_tokens <= 5 + i
        return messages, 5 + i, reply.choices[0].message.content, reply.usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: batched steps across both ranks
        answers = list(pool.map(ask, range(len(prompts))))
    for messages, max_tokens, text, count in answers:
        expected, _ = reference_greedy(path, chat_prompt_ids(path, messages), max_tokens)
        assert (text, count) == (tokenizer.decode(expected), len(expected)), messages
    health = urllib.request.urlopen(f"http://127.0.0.1:{group.port}/health", timeout=10).read()
    assert b"tiny-llama" in health
    # The group runs its one model: another one in the model dirs is a 400, not a load on rank 0 alone.
    with pytest.raises(openai.BadRequestError, match="loads no other model"):
        client.chat.completions.create(model="other-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    ranks = group.rank_pids()
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[0], signal.SIGTERM)
    group.proc.wait(timeout=60)
    log = group.log()
    # mlx.launch exits 0 even when a rank fails; it logs a rank's non-zero exit.
    assert group.proc.returncode == 0 and "exited with code" not in log and "was killed" not in log, log[-3000:]
    assert "told the other 1 rank(s) to stop" in log and "rank 1: stopped by rank 0" in log, log[-3000:]


@pytest.mark.parametrize("group", [("--distributed-step-timeout", str(STEP_TIMEOUT_S))], indirect=True)
def test_a_killed_rank_ends_every_stream_with_an_error_and_rank_0(group):
    client = openai.OpenAI(base_url=group.base_url, api_key="x", max_retries=0, timeout=120)
    ranks = group.rank_pids()
    assert set(ranks) == {0, 1}, ranks
    outcomes: dict[int, str] = {}
    streaming = threading.Barrier(5)

    def stream(i: int) -> None:
        try:
            chunks = client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": f"count to a million, {i}"}],
                max_tokens=4000, temperature=0, stream=True)
            first = True
            for _ in chunks:
                if first:
                    first = False
                    streaming.wait(timeout=60)
            outcomes[i] = "finished"  # a stream that ends without an error: the fault went unnoticed
        except openai.APIError as exc:
            outcomes[i] = f"error: {exc}"
        except Exception as exc:  # a cut connection: not the error event the client should get
            outcomes[i] = f"cut: {exc!r}"

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    streaming.wait(timeout=90)  # every stream has its first token: all four are mid-decode
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(timeout=FAULT_BOUND_S)
    assert not any(t.is_alive() for t in threads), "a client still waits after rank 1 died"
    while not _pid_gone(ranks[0]) and time.monotonic() - killed_at < FAULT_BOUND_S:
        time.sleep(0.2)
    assert _pid_gone(ranks[0]), f"rank 0 still runs {FAULT_BOUND_S}s after rank 1 died"
    group.proc.wait(timeout=30)  # mlx.launch passes on rank 0's last lines as it ends
    log = group.log()
    assert all(o.startswith("error:") for o in outcomes.values()) and len(outcomes) == 4, (outcomes, log[-3000:])
    assert "rank 0 exits with status 1" in log, log[-3000:]


def test_a_model_without_shard_is_refused_at_load(tmp_path):
    from omlx.testing.tiny_families import build_family_model

    build_family_model(tmp_path / "models" / "tiny-gemma3", "gemma3_text", seed=1)  # mlx-lm gives it no shard()
    group = Group(tmp_path, tmp_path / "models")
    try:
        group.proc.wait(timeout=START_TIMEOUT_S)
    finally:
        group.close()
    log = group.log()
    # Every rank refuses, but the first to exit 2 makes mlx.launch stop the others, maybe
    # before they print their reason: one reason and one exit 2 are what is sure to be seen.
    assert "omlx serve --distributed (rank " in log and "has no shard()" in log, log[-3000:]
    assert "exited with code 2" in log, log[-3000:]


def test_serve_help_shows_the_launch_commands():
    from omlx.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    assert "--distributed" in text and "--distributed-step-timeout" in text
    assert "mlx.launch --backend ring -n 2 --python .venv/bin/python --" in text  # one machine
    assert "--hostfile hosts.json" in text and "passwordless SSH" in text  # two hosts
