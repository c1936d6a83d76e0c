#!/usr/bin/env python
"""One streaming client against `omlx serve` processes started under different environments
(the allocator, as bench/decode_step_env.py's presets), requests alternated in rotating order,
tokens a second after the first token per request.  `glibc-again` is an A/A control.

    python bench/served_env_check.py --requests 24 --model-dir bench/models --model smollm2-135m-f32
    python bench/served_env_check.py --variant "overlap-off:OMLX_OVERLAP_STEPS=0" --variant "default:"
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
import tempfile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import openai  # noqa: E402
from decode_step_env import QUESTIONS, _variant  # noqa: E402
from omlx_process import omlx_server  # noqa: E402


def stream_rate(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> float:
    """Content chunks a second after the first one."""
    first, n = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
            first = first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - first) if n > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(REPO / "bench/models"))
    parser.add_argument("--model", default="smollm2-135m-f32")
    parser.add_argument("--variant", action="append",
                        help="a decode_step_env.py preset or name:KEY=VALUE ... (first is the baseline)")
    parser.add_argument("--requests", type=int, default=24, help="requests per server")
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    variants = dict(_variant(v) for v in (args.variant or ["glibc", "glibc-again", "omlx-default"]))
    names = list(variants)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as work:
        clients = {}
        for name in names:
            server = stack.enter_context(omlx_server(Path(args.model_dir), Path(work) / name,
                                                     env={"OMLX_MATMUL": "auto", **variants[name]}))
            allocator = server.health()["process"]["allocator_caches"]["allocator"]["name"]
            print(f"{name}: allocator {allocator}", flush=True)
            clients[name] = openai.OpenAI(base_url=server.base_url, api_key="unused")
        for client in clients.values():  # load the model, warm the path
            for q in QUESTIONS[:2]:
                stream_rate(client, args.model, q, args.tokens)
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.requests):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                rates[name].append(stream_rate(clients[name], args.model, QUESTIONS[r % len(QUESTIONS)], args.tokens))
    base = statistics.median(rates[names[0]])
    for name, values in rates.items():
        q = statistics.quantiles(values, n=4)
        print(f"{name:>14}: median {statistics.median(values):.1f} tok/s ({statistics.median(values) / base:.3f}x), "
              f"quartiles {q[0]:.1f}..{q[2]:.1f}")


if __name__ == "__main__":
    main()
