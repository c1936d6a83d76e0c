#!/usr/bin/env python
"""Vision serving benchmark: omlx against `mlx_vlm.server` on the same VLM, images, prompts
and concurrency, in the same run.

Workloads (each client sends its requests one after another, streamed, greedy):
  image-1   one client, one 448x448 image + a short prompt per request
  image-8   eight such clients at once
  mixed-8   four image clients and four text-only clients at once

Every request carries its own image (a different seed), so neither server can answer from a
vision-feature or prefix cache.  Rounds alternate between the servers; one server runs at a
time.  Reported per workload and server: aggregate output tok/s, TTFT p50/p99, errors.

    python bench/vlm_bench.py --quick     # a few minutes on 2 CPU cores
    python bench/vlm_bench.py             # more requests per client
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from serving_bench import free_port, http_get_json, log, percentile, stream_chat, summarize  # noqa: E402

from omlx.testing.tiny_models import WORDS  # noqa: E402
from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm  # noqa: E402

DEFAULT_MODEL = HERE / "models" / "vlm-bench"
# A small Qwen2-VL: 8 x 512 language layers, a 4-layer vision tower; a 448x448 image is 256
# image tokens.
BENCH_VLM = TinyVLMSpec(family="qwen2_vl", hidden_size=512, num_hidden_layers=8, intermediate_size=1536,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=4096, vision_width=256,
                        vision_layers=4, vision_heads=4, min_pixels=56 * 56, max_pixels=448 * 448,
                        logit_scale=2.0, printable_only=True)
DEFAULT_BLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
OMLX, MLX_VLM = "omlx", "mlx_vlm.server"
IMAGE_PROMPT = "Describe this image in detail."


def image_url(seed: int, size: int = 448) -> str:
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def image_messages(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                         {"type": "text", "text": IMAGE_PROMPT}]}]


def text_messages(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(40))}]


def workloads(per_client: int, seed: int) -> dict[str, list[list[list[dict]]]]:
    """name -> per client, its requests' messages."""
    rng = random.Random(seed)
    counter = iter(range(seed * 10_000, seed * 10_000 + 10_000))

    def image_client():
        return [image_messages(next(counter)) for _ in range(per_client)]

    def text_client():
        return [text_messages(rng) for _ in range(per_client)]

    return {
        "image-1": [image_client()],
        "image-8": [image_client() for _ in range(8)],
        "mixed-8": [image_client() for _ in range(4)] + [text_client() for _ in range(4)],
    }


class Server:
    def __init__(self, kind: str, model: Path, log_dir: Path, blas: str | None = None):
        self.kind, self.model, self.blas = kind, model, blas
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{kind}-{self.port}.log"
        self.model_id = model.name if kind == OMLX else str(model)

    def __enter__(self):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if self.kind == OMLX:
            cmd = [sys.executable, "-m", "omlx", "serve", "--model-dir", str(self.model.parent), "--host",
                   "127.0.0.1", "--port", str(self.port), "--no-demo"]
            env.setdefault("OMLX_KV_DISK", "0")
        else:
            cmd = [sys.executable, "-m", "mlx_vlm.server", "--model", str(self.model), "--host", "127.0.0.1",
                   "--port", str(self.port)]
            # omlx loads OpenBLAS by itself (re-exec); mlx_vlm.server gets it the same way
            # mlx_lm.server does in serving_bench, so both run the same matmuls.
            if self.blas and Path(self.blas).exists():
                env["LD_PRELOAD"] = " ".join(filter(None, [self.blas, env.get("LD_PRELOAD")]))
        log(f"starting {self.kind}: {' '.join(cmd)}")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(HERE.parent))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if http_get_json(self.base_url + "/health", timeout=2)[0] == 200:
                    return self
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} did not come up")

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log_file.close()


async def run(server: Server, clients: list[list[list[dict]]], max_tokens: int) -> dict:
    import aiohttp

    url = server.base_url + "/v1/chat/completions"
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async def client(i, requests):
            for messages in requests:
                results.append(await stream_chat(session, url, server.model_id, messages, max_tokens, i))

        start = time.perf_counter()
        await asyncio.gather(*(client(i, r) for i, r in enumerate(clients)))
        wall = time.perf_counter() - start
    summary = summarize(results, wall)
    # Whole-request latency, measured alike for both servers.
    latencies = [r.end - r.start for r in results if r.error is None]
    summary["latency_p50"], summary["latency_p99"] = percentile(latencies, 50), percentile(latencies, 99)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="one request per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--servers", default=f"{OMLX},{MLX_VLM}")
    parser.add_argument("--workloads", default="image-1,image-8,mixed-8")
    parser.add_argument("--blas-library", default=DEFAULT_BLAS, help="preloaded into mlx_vlm.server")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vlm_bench.json")
    args = parser.parse_args()
    if not (args.model_path / "config.json").exists():
        log(f"building the bench VLM at {args.model_path}")
        build_vlm(args.model_path, BENCH_VLM)
    per_client = 1 if args.quick else 3
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / "vlm-logs"
    log_dir.mkdir(exist_ok=True)
    report: dict = {"model": str(args.model_path), "max_tokens": args.max_tokens, "per_client": per_client,
                    "results": {}}
    names = args.workloads.split(",")
    for round_, kind in enumerate(args.servers.split(",")):
        with Server(kind, args.model_path, log_dir, args.blas_library) as server:
            asyncio.run(run(server, [[image_messages(999_999)]], 4))  # warm-up: load, compile
            for name in names:
                clients = workloads(per_client, seed=1 + names.index(name))[name]
                summary = asyncio.run(run(server, clients, args.max_tokens))
                report["results"].setdefault(name, {})[kind] = summary
                log(f"{kind:15s} {name:8s} agg {summary['agg_tok_s'] or 0:7.1f} tok/s  "
                    f"TTFT p50 {_ttft(summary, 50)} p99 {_ttft(summary, 99)}  "
                    f"latency p50 {summary['latency_p50'] or 0:6.2f}s  errors {summary['errors']} "
                    f"{summary['error_samples'][:1]}")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'workload':10s} {'server':16s} {'agg tok/s':>10s} {'TTFT p50':>10s} {'TTFT p99':>10s} "
          f"{'latency p50':>12s} {'errors':>6s}")
    for name, by_server in report["results"].items():
        for kind, s in by_server.items():
            print(f"{name:10s} {kind:16s} {s['agg_tok_s'] or 0:10.1f} {_ttft(s, 50):>10s} {_ttft(s, 99):>10s} "
                  f"{s['latency_p50'] or 0:11.2f}s {s['errors']:6d}")


def _ttft(summary: dict, q: int) -> str:
    client = summary.get(f"ttft_p{q}")
    return f"{client:.2f}s" if client is not None else "n/a"


if __name__ == "__main__":
    main()
