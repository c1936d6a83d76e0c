#!/usr/bin/env python
"""Audio serving benchmark: omlx against `mlx_vlm.server` on the same omni model (a Gemma 4
with an audio tower, random weights, omlx.testing.tiny_audio), clips, prompts and concurrency,
in the same run.

Workloads (each client sends its requests one after another, streamed, greedy):
  audio-1   one client, one clip (2-5 s: 50-125 audio tokens) + a short prompt per request
  audio-8   eight such clients at once, clips of different lengths
  mixed-8   four audio clients and four text-only clients at once

Every request carries its own clip (a different seed and length), so neither server can
answer from a cache.  One server runs at a time.  Reported per workload and server:
aggregate output tok/s, TTFT p50/p99, errors (mlx_vlm.server stacks the features of clips of
different lengths in one batch: see its error samples).

    python bench/audio_bench.py --quick     # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from serving_bench import log  # noqa: E402
from vlm_bench import DEFAULT_BLAS, MLX_VLM, OMLX, Server, _ttft, run, text_messages  # noqa: E402

from omlx.testing.tiny_audio import TinyAudioSpec, build_audio_model  # noqa: E402

DEFAULT_MODEL = HERE / "models" / "audio-bench"
# A small Gemma 4: 6 x 384 language layers, a 2-layer conformer audio tower (25 tokens/s).
BENCH_OMNI = TinyAudioSpec(hidden_size=384, num_hidden_layers=6, intermediate_size=1024, num_attention_heads=6,
                           num_key_value_heads=2, head_dim=64, vocab_size=2048, sliding_window=512,
                           audio_hidden=128, audio_layers=2, audio_heads=4)
AUDIO_PROMPT = "Describe what you hear in this clip."


def clip_wav(seed: int) -> str:
    import numpy as np
    import soundfile

    rng = np.random.default_rng(seed)
    seconds = 2.0 + 3.0 * rng.random()
    t = np.arange(int(seconds * 16_000)) / 16_000
    samples = 0.2 * np.sin(2 * np.pi * (150 + 400 * rng.random()) * t) + rng.normal(0, 0.05, t.size)
    out = io.BytesIO()
    soundfile.write(out, samples.astype(np.float32), 16_000, format="WAV")
    return base64.b64encode(out.getvalue()).decode()


def audio_messages(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip_wav(seed), "format": "wav"}},
                                         {"type": "text", "text": AUDIO_PROMPT}]}]


def workloads(per_client: int, seed: int) -> dict[str, list[list[list[dict]]]]:
    rng = random.Random(seed)
    counter = iter(range(seed * 10_000, seed * 10_000 + 10_000))

    def audio_client():
        return [audio_messages(next(counter)) for _ in range(per_client)]

    def text_client():
        return [text_messages(rng) for _ in range(per_client)]

    return {
        "audio-1": [audio_client()],
        "audio-8": [audio_client() for _ in range(8)],
        "mixed-8": [audio_client() for _ in range(4)] + [text_client() for _ in range(4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="one request per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--servers", default=f"{OMLX},{MLX_VLM}")
    parser.add_argument("--workloads", default="audio-1,audio-8,mixed-8")
    parser.add_argument("--blas-library", default=DEFAULT_BLAS, help="preloaded into mlx_vlm.server")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "audio_bench.json")
    args = parser.parse_args()
    if not (args.model_path / "config.json").exists():
        log(f"building the bench omni model at {args.model_path}")
        build_audio_model(args.model_path, BENCH_OMNI)
    per_client = 1 if args.quick else 3
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / "audio-logs"
    log_dir.mkdir(exist_ok=True)
    report: dict = {"model": str(args.model_path), "max_tokens": args.max_tokens, "per_client": per_client,
                    "results": {}}
    names = args.workloads.split(",")
    for kind in args.servers.split(","):
        with Server(kind, args.model_path, log_dir, args.blas_library) as server:
            asyncio.run(run(server, [[audio_messages(999_999)]], 4))  # warm-up: load, compile
            for name in names:
                clients = workloads(per_client, seed=1 + names.index(name))[name]
                summary = asyncio.run(run(server, clients, args.max_tokens))
                report["results"].setdefault(name, {})[kind] = summary
                log(f"{kind:15s} {name:8s} agg {summary['agg_tok_s'] or 0:7.1f} tok/s  "
                    f"TTFT p50 {_ttft(summary, 50)} p99 {_ttft(summary, 99)}  "
                    f"errors {summary['errors']} {summary['error_samples'][:1]}")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'workload':10s} {'server':16s} {'agg tok/s':>10s} {'TTFT p50':>10s} {'TTFT p99':>10s} {'errors':>6s}")
    for name, by_server in report["results"].items():
        for kind, s in by_server.items():
            print(f"{name:10s} {kind:16s} {s['agg_tok_s'] or 0:10.1f} {_ttft(s, 50):>10s} {_ttft(s, 99):>10s} "
                  f"{s['errors']:6d}")


if __name__ == "__main__":
    main()
