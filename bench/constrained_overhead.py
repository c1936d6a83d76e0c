"""Per-token cost of grammar-constrained decoding, to choose the grammar engine and to size
what constrained requests cost everyone else.

Two measurements:

  masks   For each grammar engine that imports here (llguidance, xgrammar, outlines-core):
          compile time of a JSON schema, then, along a fixed schema-valid document, the time
          per token to compute the allowed-token mask and to advance the state, at a
          vocabulary of 32000 byte-level BPE tokens.
  engine  omlx's LLMEngine on a 32000-vocabulary model: time per decode step with 1 and 16
          clients, every client free vs every client constrained by the schema (sampling,
          temperature 1), and the sampler alone on (n, 32000) logits.

    python bench/constrained_overhead.py masks
    python bench/constrained_overhead.py engine [--model-path bench/models/bench-200m]

xgrammar depends on torch, which omlx does not install; run `masks` from an environment that
has it to include it (the report says which engines were found).

The 32000-token tokenizer is trained on the spot (byte-level BPE, GPT-2 style like Qwen's and
Llama 3's) on a generated corpus of pseudo-words, JSON and code, and cached next to the
results, since no real tokenizer can be downloaded here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

VOCAB = 32000
HERE = Path(__file__).resolve().parent
TOKENIZER_CACHE = HERE / "results" / "tokenizer-32k" / "tokenizer.json"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "score", "active", "role", "tags", "address"],
}

DOCUMENT = {
    "name": "Ada Lovelace of the analytical engine society",
    "age": 36,
    "score": 98.25,
    "active": True,
    "role": "admin",
    "tags": ["math", "engines", "poetry", "first program", "notes on Menabrea"],
    "address": {"city": "London", "zip": "W1J 7NT"},
}


# ---------------------------------------------------------------------------- tokenizer


def _corpus(seed: int = 0, lines: int = 120_000) -> list[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60_000)]
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]  # Zipf, like real text
    keys = ["id", "name", "value", "type", "items", "data", "count", "city", "user", "tags"]
    out = []
    for _ in range(lines):
        kind = rng.random()
        words = rng.choices(lexicon, weights, k=rng.randint(4, 16))
        if kind < 0.6:
            line = " ".join(words)
            out.append(line.capitalize() + rng.choice([".", ",", "?", "!", ":"]))
        elif kind < 0.8:
            obj = {rng.choice(keys): rng.choice([w, rng.randint(0, 99999), rng.random(), True, None]) for w in words[:4]}
            out.append(json.dumps(obj))
        else:
            out.append(f"def {words[0]}_{words[1]}({words[2]}, {words[3]}=None):  return {rng.randint(0, 999)}")
    return out


def build_tokenizer_32k():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if TOKENIZER_CACHE.exists():
        return Tokenizer.from_file(str(TOKENIZER_CACHE))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    TOKENIZER_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TOKENIZER_CACHE))
    return tokenizer


def hf_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------- masks


def _stats(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        "p50_us": round(samples[len(samples) // 2] * 1e6, 1),
        "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6, 1),
        "max_us": round(samples[-1] * 1e6, 1),
    }


def bench_llguidance(hf, tokens: list[int], repeats: int) -> dict:
    import llguidance
    import llguidance.hf
    import numpy as np
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB)
    tokenizer_s = time.perf_counter() - started
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    compile_s, per_token = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s.append(time.perf_counter() - started)
        mask = allocate_token_bitmask(1, VOCAB)
        for t in tokens:
            started = time.perf_counter()
            fill_next_token_bitmask(matcher, mask, 0)
            ok = matcher.consume_token(t)
            per_token.append(time.perf_counter() - started)
            assert ok and (mask[0, t // 32] >> (t % 32)) & 1, matcher.get_error()
        assert matcher.is_accepting(), "the document should complete the grammar"
    del np
    return {"version": llguidance.__version__, "tokenizer_s": round(tokenizer_s, 3),
            "compile_ms": round(statistics.fmean(compile_s) * 1e3, 2), "per_token": _stats(per_token)}


def bench_xgrammar(hf, tokens: list[int], repeats: int) -> dict:
    import xgrammar as xgr
    from importlib.metadata import version

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB)
    tokenizer_s = time.perf_counter() - started
    compile_s, per_token = [], []
    for _ in range(repeats):
        # A fresh compiler each time: its cache would otherwise hide the compile cost.
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        matcher = xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - started)
        mask = xgr.allocate_token_bitmask(1, VOCAB)
        for t in tokens:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            ok = matcher.accept_token(t)
            per_token.append(time.perf_counter() - started)
            assert ok and (int(mask[0, t // 32]) >> (t % 32)) & 1
        assert matcher.is_terminated() or matcher.accept_token(hf.eos_token_id)
    return {"version": version("xgrammar"), "tokenizer_s": round(tokenizer_s, 3),
            "compile_ms": round(statistics.fmean(compile_s) * 1e3, 2), "per_token": _stats(per_token)}


def bench_outlines_core(hf, tokens: list[int], repeats: int) -> dict:
    import numpy as np
    from importlib.metadata import version
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers.pre_tokenizers import ByteLevel  # noqa: F401  (byte-level vocabulary)

    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    started = time.perf_counter()
    eos = hf.eos_token_id
    mapping: dict[bytes, list[int]] = {}
    for token, i in hf.get_vocab().items():
        if i == eos or i in hf.all_special_ids:
            continue
        raw = bytes(byte_decoder[c] for c in token) if all(c in byte_decoder for c in token) else token.encode()
        mapping.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(eos, mapping)
    tokenizer_s = time.perf_counter() - started
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    compile_s, per_token = [], []
    for _ in range(max(1, repeats // 5)):  # the index build is slow; fewer repeats
        started = time.perf_counter()
        index = Index(regex, vocabulary)
        compile_s.append(time.perf_counter() - started)
        guide = Guide(index)
        mask = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
        for t in tokens:
            started = time.perf_counter()
            guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
            guide.advance(t)
            per_token.append(time.perf_counter() - started)
            assert (int(mask[t // 32]) >> (t % 32)) & 1
    return {"version": version("outlines-core"), "tokenizer_s": round(tokenizer_s, 3),
            "compile_ms": round(statistics.fmean(compile_s) * 1e3, 2), "per_token": _stats(per_token)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def run_masks(args) -> dict:
    tokenizer = build_tokenizer_32k()
    hf = hf_tokenizer(tokenizer)
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    tokens = hf.encode(text, add_special_tokens=False)
    print(f"tokenizer: {len(hf)} tokens; document: {len(text)} chars, {len(tokens)} tokens", file=sys.stderr)
    results = {}
    for name, fn in [("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines_core)]:
        try:
            results[name] = fn(hf, tokens, args.repeats)
        except ImportError as exc:
            results[name] = {"skipped": f"not importable here: {exc}"}
        print(name, json.dumps(results[name]), file=sys.stderr)
    return {"vocab": VOCAB, "document_tokens": len(tokens), "engines": results}


# ---------------------------------------------------------------------------- engine


def _engine_model(model_path: Path):
    """The benchmark model's weights with the 32k tokenizer in place of its own."""
    import shutil
    import tempfile

    from mlx_lm import load

    tokenizer = build_tokenizer_32k()
    folder = Path(tempfile.mkdtemp(prefix="omlx-constrained-bench-"))
    for f in model_path.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            continue
        (folder / f.name).symlink_to(f.resolve())
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    }))
    try:
        return load(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _time_steps(engine, requests, decode_steps: int) -> list[float]:
    """Times of the first `decode_steps` steps in which every request decodes (after all the
    prefills), then the requests are aborted."""
    for r in requests:
        engine.add_request(r)
    times = []
    while engine.has_work and len(times) < decode_steps:
        decoding = sum(1 for s in engine.scheduler.running if not s.is_prefilling)
        started = time.perf_counter()
        engine.step()
        if decoding == len(requests) and not engine.scheduler.waiting:
            times.append(time.perf_counter() - started)
    for r in requests:
        engine.abort(r.request_id)
    assert engine.blocks.leaked_blocks() == []
    return times


def run_engine(args) -> dict:
    import mlx.core as mx

    from omlx.constrained import json_schema_constraint
    from omlx.scheduler import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
    from omlx.scheduler.sampler import Sampler
    from omlx.scheduler.sequence import Sequence

    model, tokenizer = _engine_model(Path(args.model_path))
    vocab = model.args.vocab_size
    assert vocab == VOCAB, f"the model's vocabulary is {vocab}, not {VOCAB}"
    eos = frozenset(tokenizer.eos_token_ids)
    constraint = json_schema_constraint(tokenizer, SCHEMA, vocab)
    engine = LLMEngine(model, EngineConfig(block_size=32, num_blocks=512, max_num_batched_tokens=512), 4096)
    rng = random.Random(0)
    report: dict = {"model": str(args.model_path), "vocab": vocab, "decode_step_ms": {}, "sampler_ms": {}}

    labels = ("free", "constrained")
    for clients in (1, 16):
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for rep in range(args.engine_repeats):
            for label in labels:  # alternating, so that machine noise hits both alike
                requests = [
                    GenerationRequest(
                        f"{label}-{clients}-{rep}-{i}", [rng.randrange(10, VOCAB) for _ in range(32)], args.max_tokens,
                        SamplingParams(temperature=1.0, seed=i), eos,
                        constraint=constraint if label == "constrained" else None,
                    )
                    for i in range(clients)
                ]
                samples[label] += _time_steps(engine, requests, args.decode_steps)
        for label in labels:
            times = sorted(samples[label])
            report["decode_step_ms"][f"{label}-c{clients}"] = {
                "steps": len(times), "mean": round(statistics.fmean(times) * 1e3, 2),
                "p50": round(times[len(times) // 2] * 1e3, 2),
            }
            print(label, clients, report["decode_step_ms"][f"{label}-c{clients}"], file=sys.stderr)

    # The sampler alone, where the whole constrained cost lives: greedy and sampled rows,
    # and the mask by itself (the bitmasks from the grammar engine, applied to the logits).
    from omlx.scheduler.sampler import _apply_constraints

    report["mask_ms"] = {}
    sampler = Sampler(seed=0)
    for clients in (1, 16):
        logits = mx.random.normal((clients, vocab)) * 4
        mx.eval(logits)
        for temperature in (0.0, 1.0):
            for label in labels:
                seqs = [
                    Sequence(GenerationRequest(f"s{i}", [1, 2, 3], 10_000, SamplingParams(temperature=temperature, seed=i),
                                               eos, constraint=constraint if label == "constrained" else None))
                    for i in range(clients)
                ]
                if label == "constrained":  # into the middle of a string: the widest mask
                    for seq in seqs:
                        for t in tokenizer.encode('{"name": "Ada', add_special_tokens=False):
                            seq.constraint.accept(t)
                times, mask_times = [], []
                for _ in range(args.sampler_steps):
                    if label == "constrained":
                        started = time.perf_counter()
                        mx.eval(_apply_constraints(logits, seqs, list(range(clients))))
                        mask_times.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    tokens = sampler(logits, seqs)
                    times.append(time.perf_counter() - started)
                    for seq, t in zip(seqs, tokens):
                        seq.token_ids.append(t)
                kind = "greedy" if temperature == 0 else "sampled"
                report["sampler_ms"][f"{label}-{kind}-c{clients}"] = round(statistics.fmean(times) * 1e3, 3)
                if mask_times:
                    report["mask_ms"][f"{kind}-c{clients}"] = round(statistics.fmean(mask_times) * 1e3, 3)
    print(json.dumps(report["sampler_ms"]), json.dumps(report["mask_ms"]), file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["masks", "engine"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model-path", default=str(HERE / "models" / "bench-200m"))
    # Far from max_tokens, so that the end-of-budget planning never starts: what is timed is
    # the steady per-token cost.
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--engine-repeats", type=int, default=3)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="write the JSON report here too")
    args = parser.parse_args(argv)
    report = run_masks(args) if args.what == "masks" else run_engine(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
