"""Rerank throughput and latency: omlx's /v1/rerank against a plain in-process forward loop.

Model: a MiniLM-L6-sized BERT cross-encoder (ms-marco-MiniLM-L-6-v2's shape: 6 layers,
hidden 384, 12 heads, float32) with random weights, built on first use
(`omlx.testing.tiny_rerankers.MINILM_L6`).  Documents are ~70-token passages (MS MARCO's
typical length) drawn from the tiny tokenizer's vocabulary; the query is ~8 tokens.

Measured, one after the other on one machine:
- documents reranked per second with 1, 16 and 64 documents per call (calls in sequence),
  for omlx over HTTP and for the reference: the same weights through mlx-embeddings' BERT
  encoder and the head, tokenized by the model's tokenizer and padded per call, in this
  process with no server (what a script would do);
- documents per second for 16 concurrent one-document calls (omlx batches them together);
- the latency of one 32-document call, alone and while two clients keep /v1/embeddings busy
  on the packaged all-MiniLM-L6-v2 beside it.

    python bench/rerank_bench.py [--quick]

The machine is shared (2 cores): figures are noisy; the ratios taken in one run are the
point.  Results go to stdout and bench/results/rerank-<timestamp>.md.
"""

from __future__ import annotations

import sys

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)  # before mlx loads: the server gets OpenBLAS too, so must the reference

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import aiohttp  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL_NAME = "rerank-minilm-l6"


def documents(n: int, words: int, seed: int) -> list[str]:
    from omlx.testing.tiny_models import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def build_model(folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    from omlx.testing.tiny_rerankers import MINILM_L6, build_cross_encoder_folder

    print(f"building {folder} ...", flush=True)
    build_cross_encoder_folder(folder, MINILM_L6)


# ---------------------------------------------------------------------------- reference


class Reference:
    """The plain loop: tokenize the call's pairs, pad, one forward, sigmoid."""

    def __init__(self, folder: Path):
        import json

        import mlx.core as mx
        from transformers import AutoTokenizer

        from omlx.rerank.heads import BertCrossEncoder

        self.mx = mx
        self.model = BertCrossEncoder(json.loads((folder / "config.json").read_text()))
        self.model.load_weights(str(folder / "model.safetensors"))
        mx.eval(self.model.parameters())
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def scores(self, query: str, docs: list[str]):
        mx = self.mx
        batch = self.tokenizer([query] * len(docs), docs, padding=True, truncation="only_second",
                               max_length=512, return_tensors="np")
        logits = self.model(mx.array(batch["input_ids"]), mx.array(batch["token_type_ids"]),
                            mx.array(batch["attention_mask"].astype("float32")))
        scores = mx.sigmoid(logits[:, 0])
        mx.eval(scores)
        return scores


def time_calls(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - started


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMLX_") or k == "OMLX_BLAS_REEXEC"}
    env["OMLX_HOME"] = str(log_path.parent / "omlx-home")
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "omlx", "serve", "--model-dir", str(model_dir), "--port",
                                str(port), "--no-demo", "--no-hf-cache"], stdout=log, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"omlx serve exited; see {log_path}")
        try:
            urllib.request.urlopen(root + "/health", timeout=5).read()
            return process, root
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("omlx serve did not come up")


async def rerank(session, root: str, query: str, docs: list[str]) -> float:
    started = time.perf_counter()
    async with session.post(root + "/v1/rerank", json={"model": MODEL_NAME, "query": query, "documents": docs,
                                                       "return_documents": False}) as response:
        body = await response.json()
        assert response.status == 200, body
    return time.perf_counter() - started


async def reranker_stats(session, root: str) -> dict:
    async with session.get(root + "/health") as response:
        return (await response.json())["reranker_models_loaded"][MODEL_NAME]


async def measure_server(root: str, query: str, pool: list[str], calls: dict[int, int], concurrent: int,
                         latency_samples: int) -> dict:
    out: dict = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await rerank(session, root, query, pool[:64])  # load + warm up
        for size, n in calls.items():
            started = time.perf_counter()
            for i in range(n):
                await rerank(session, root, query, pool[i: i + size])
            out[f"batch {size}"] = size * n / (time.perf_counter() - started)
        before = await reranker_stats(session, root)
        started = time.perf_counter()
        rounds = max(1, calls[1] // concurrent)
        for _ in range(rounds):
            await asyncio.gather(*[rerank(session, root, query, [pool[i]]) for i in range(concurrent)])
        out[f"{concurrent} concurrent 1-doc calls"] = concurrent * rounds / (time.perf_counter() - started)
        after = await reranker_stats(session, root)
        # Timing-independent evidence of batching: forward passes the server ran for them.
        out["concurrent passes"] = (after["batches"] - before["batches"], after["inputs"] - before["inputs"])

        docs32 = pool[:32]
        out["latency alone"] = [await rerank(session, root, query, docs32) for _ in range(latency_samples)]

        stop = asyncio.Event()
        embedded = 0

        async def embed_loop(texts):
            nonlocal embedded
            while not stop.is_set():
                async with session.post(root + "/v1/embeddings", json={"input": texts}) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                embedded += len(texts)

        async with session.post(root + "/v1/embeddings", json={"input": pool[:32]}) as response:  # load it
            await response.read()
        loops = [asyncio.ensure_future(embed_loop(pool[k * 32: (k + 1) * 32])) for k in range(2)]
        await asyncio.sleep(1.0)
        started, embedded = time.perf_counter(), 0
        out["latency beside embeddings"] = [await rerank(session, root, query, docs32) for _ in range(latency_samples)]
        out["embeddings/s beside"] = embedded / (time.perf_counter() - started)
        stop.set()
        await asyncio.gather(*loops)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--model-path", type=Path, default=HERE / "models" / "rerank" / MODEL_NAME)
    parser.add_argument("--doc-words", type=int, default=70)
    args = parser.parse_args()

    build_model(args.model_path)
    query = "what is the river near the mountain city"
    pool = documents(256, args.doc_words, seed=0)
    calls = {1: 8, 16: 2, 64: 1} if args.quick else {1: 40, 16: 8, 64: 3}
    samples = 3 if args.quick else 7
    concurrent = 16

    import mlx.core as mx

    from omlx.blas import blas_info

    reference = Reference(args.model_path)
    reference.scores(query, pool[:64])  # warm up
    ref = {}
    for size, n in calls.items():
        ref[f"batch {size}"] = size * n / time_calls(lambda: reference.scores(query, pool[:size]), n)
    ref_latency = [time_calls(lambda: reference.scores(query, pool[:32]), 1) for _ in range(samples)]
    del reference

    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    process, root = start_server(args.model_path.parent, results_dir / f"rerank-{stamp}-server.log")
    try:
        served = asyncio.run(measure_server(root, query, pool, calls, concurrent, samples))
    finally:
        process.terminate()
        process.wait(30)

    lines = [
        f"# Rerank bench ({stamp}, {'quick' if args.quick else 'full'})",
        "",
        f"Model: MiniLM-L6-sized BERT cross-encoder, float32, random weights; {args.doc_words}-word documents; "
        f"MLX {mx.__version__}, BLAS: {blas_info().get('blas')} ({blas_info().get('blas_library')}). Shared 2-core machine: noisy.",
        "",
        "| documents per call | omlx docs/s | reference docs/s | omlx / reference |",
        "|---|---|---|---|",
    ]
    for size in calls:
        key = f"batch {size}"
        lines.append(f"| {size} | {served[key]:.1f} | {ref[key]:.1f} | {served[key] / ref[key]:.2f} |")
    key = f"{concurrent} concurrent 1-doc calls"
    lines.append(f"| 1 ({concurrent} clients at once) | {served[key]:.1f} | {ref['batch 1']:.1f} (one at a time) | "
                 f"{served[key] / ref['batch 1']:.2f} |")
    passes, pairs = served["concurrent passes"]
    lines.append(f"\n{pairs} one-document calls, {concurrent} at a time, ran in {passes} forward passes.")
    alone = statistics.median(served["latency alone"])
    beside = statistics.median(served["latency beside embeddings"])
    lines += [
        "",
        "| one 32-document call | p50 latency (ms) | samples |",
        "|---|---|---|",
        f"| reference, in-process | {statistics.median(ref_latency) * 1000:.0f} | {samples} |",
        f"| omlx, alone | {alone * 1000:.0f} | {samples} |",
        f"| omlx, beside 2 clients embedding 32 texts per call | {beside * 1000:.0f} | {samples} "
        f"(embeddings meanwhile: {served['embeddings/s beside']:.0f} texts/s) |",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    (results_dir / f"rerank-{stamp}.md").write_text(report)


if __name__ == "__main__":
    main()
