#!/usr/bin/env python
"""One stream's decode through `LLMEngine` alone, in-process: the engine's own per-token time
for a model folder in the weight form the server would choose, without the HTTP server.

    OMLX_MATMUL=auto python bench/engine_one_stream.py --model bench/models/smollm2-135m-f32
    OMLX_MATMUL=auto python bench/engine_one_stream.py --model ... --overlap both   # overlapped steps on / off
    OMLX_MATMUL=auto python bench/engine_one_stream.py --model ~/.omlx/cache/gguf/<digest>-v3

A real question in the model's chat template, greedy, speculation off unless asked: a random
prompt makes SmolLM2 repeat itself, and prompt-lookup speculation then accepts several tokens a
step, which once made this bench report twice the served rate (bench/README.md).  Per-step
times are noisy on a shared 2-core machine, so it prints the median and the 10th / 90th
percentiles of the decode steps, and where a step's time goes (the engine's StepProfile).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from omlx.blas import ensure_optimized_blas

ensure_optimized_blas(sys.argv)

from mlx_lm import load  # noqa: E402

from omlx.models import weight_form  # noqa: E402
from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402

QUESTIONS = ["Why is the sky blue?", "How do bees make honey?", "Explain how a rainbow forms."]


def decode(engine: LLMEngine, tokenizer, question: str, request_id: str, tokens: int) -> tuple[list[float], int]:
    """One question's decode steps (seconds each) and the tokens they produced."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    engine.add_request(GenerationRequest(request_id, prompt, max_tokens=tokens))
    engine.step()  # the prefill
    engine.profile.reset()
    steps, produced = [], 0
    while engine.has_work:
        start = time.perf_counter()
        produced += sum(1 for _, event in engine.step() if event.token_id is not None)
        steps.append(time.perf_counter() - start)
    return steps[5:], produced  # the first decode steps warm MLX's caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per question")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--speculative", action="store_true", help="prompt-lookup speculation on")
    parser.add_argument("--prefix-cache", action="store_true")
    parser.add_argument("--blocks", type=int, default=64, help="KV pool blocks of 32 tokens")
    parser.add_argument("--overlap", choices=["on", "off", "both"], default="on",
                        help="overlapped decode steps (omlx.scheduler.lookahead); both: two engines, "
                             "questions alternated between them, and the ratio")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    form = weight_form.apply(model, None, 8 << 30)
    modes = ["off", "on"] if args.overlap == "both" else [args.overlap]
    engines = {mode: LLMEngine(model, EngineConfig(
        block_size=32, num_blocks=args.blocks, max_num_seqs=1, max_num_batched_tokens=2048,
        prefix_cache=args.prefix_cache, speculative=args.speculative, overlap_steps=mode == "on"), 16384)
        for mode in modes}
    steps = {mode: [] for mode in modes}
    produced = dict.fromkeys(modes, 0)
    for i in range(args.questions):
        question = QUESTIONS[i % len(QUESTIONS)]
        for mode in (modes if i % 2 == 0 else modes[::-1]):  # alternate who goes first
            taken, n = decode(engines[mode], tokenizer, question, f"q{i}-{mode}", args.tokens)
            steps[mode] += taken
            produced[mode] += n
    medians = {}
    for mode in modes:
        deciles = statistics.quantiles(steps[mode], n=10)
        medians[mode] = statistics.median(steps[mode])
        profile = engines[mode].profile.report()["mean_ms"]
        print(f"{args.model}: form {form}, speculation {'on' if args.speculative else 'off'}, overlap {mode}: "
              f"median step {medians[mode] * 1e3:.2f} ms (p10 {deciles[0] * 1e3:.2f}, p90 {deciles[-1] * 1e3:.2f}), "
              f"{1 / medians[mode]:.1f} steps/s, {produced[mode]} tokens in {len(steps[mode]) + 5 * args.questions} steps")
        print("  last question's mean ms per step:", {k: v for k, v in profile.items() if v})
    if len(modes) == 2:
        print(f"overlap on / off: median step {medians['on'] / medians['off']:.3f}x the time "
              f"({medians['off'] / medians['on']:.2f}x the steps/s)")


if __name__ == "__main__":
    main()
