"""Two ranks on one machine over MLX's ring backend (issue #25, part 2, first step): rank 0
schedules and samples, sends every step's SchedulerOutput to rank 1, both run the pass over
their half of the weights (the model's own `shard()`) and their own KV pool.  Greedy tokens
equal mlx-lm's on the whole model in one process, with requests arriving at different steps,
sharing prefixes (prefix-cache hits) and preempted from a small pool.  Real processes,
launched by `mlx.launch`."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import load

from free_ports import ring_port_flags
from omlx.testing.rank_processes import rank_pids
from omlx.testing.reference import greedy_reference
from omlx.testing.tiny_models import TinyModelSpec, build_model

LAUNCH = Path(sys.executable).with_name("mlx.launch")
pytestmark = [
    pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python"),
    pytest.mark.slow,  # two ranks launched as processes per test
]


def _requests(seed: int) -> list[dict]:
    rnd = random.Random(seed)
    prefix = [rnd.randrange(5, 500) for _ in range(30)]
    return [{"id": f"r{i}", "max_tokens": rnd.randrange(3, 15), "arrival": rnd.randrange(0, 6),
             "prompt": prefix[: rnd.randrange(0, 31)] + [rnd.randrange(5, 500) for _ in range(rnd.randrange(1, 20))]}
            for i in range(7)]


def _launch(tmp_path: Path, model: Path, requests: list[dict], *flags: str) -> dict:
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    out = tmp_path / "tokens.json"
    command = [str(LAUNCH), "--backend", "ring", "-n", "2", *ring_port_flags(), "--python", sys.executable, "--",
               "-m", "omlx.distributed.generate", "--model", str(model), "--requests", str(tmp_path / "requests.json"),
               "--out", str(out), *flags]
    # Its own session: on a timeout the launcher and both ranks go together.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the two ranks did not finish:\n{log[-3000:]}")
    # mlx.launch exits 0 even when a rank fails; it says so in its log.
    assert proc.returncode == 0 and "exited with code" not in log, log[-3000:]
    assert out.exists(), log[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_two_ranks_give_mlx_lms_tokens(tmp_path, model_type):
    path = build_model(tmp_path / model_type, TinyModelSpec(model_type=model_type, seed=3))
    model, tokenizer = load(str(path))
    eos = frozenset(tokenizer.eos_token_ids)
    requests = _requests(seed=1)
    result = _launch(tmp_path, path, requests, "--num-blocks", "12", "--max-num-batched-tokens", "16")
    for r in requests:
        assert result["tokens"][r["id"]] == greedy_reference(model, r["prompt"], r["max_tokens"], eos), r["id"]
    assert result["ranks"] == 2 and result["steps"] > 0 and result["step_bytes"] > 0
    assert result["preemptions"] > 0 and result["prefix_hit_tokens"] > 0


def test_a_killed_rank_ends_the_group_without_a_hang(tmp_path):
    """Rank 1 killed mid-run: rank 0 does not wait on it forever - the group ends within a
    bound, and rank 0 does not report a result it could not finish."""
    import time

    path = build_model(tmp_path / "llama", TinyModelSpec(model_type="llama", seed=3))
    # 32 sequences decoding up to the context: thousands of steps, far longer than the wait.
    requests = [{"id": f"r{i}", "prompt": [5 + i, 9, 33, 70], "max_tokens": 4000, "arrival": 0} for i in range(32)]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    out = tmp_path / "tokens.json"
    command = [str(LAUNCH), "--backend", "ring", "-n", "2", *ring_port_flags(), "--python", sys.executable, "--",
               "-m", "omlx.distributed.generate", "--model", str(path), "--requests", str(tmp_path / "requests.json"),
               "--out", str(out), "--num-blocks", "16400"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.monotonic() + 120
        ranks = {}
        while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            ranks = rank_pids(proc.pid)
        assert len(ranks) == 2, "the ranks did not start"
        time.sleep(8)  # into its run: building the engine, or decoding
        assert proc.poll() is None, "the run ended before the fault"
        os.kill(ranks[1], signal.SIGKILL)
        log, _ = proc.communicate(timeout=60)  # the bound: no hang
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"rank 0 hung after rank 1 died:\n{log[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "rank 1 exited with code" in log.replace("Node with rank", "rank"), log[-3000:]
    assert not out.exists()
