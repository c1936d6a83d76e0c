"""A small qwen3 trained for a few minutes on CPU: a less flat proxy than random weights.

Random-weight models put their top logits within a hair of each other, so any perturbation
of the KV cache (quantization) flips many greedy choices that a trained model would keep.
This module builds a tiny qwen3 with `omlx.testing.tiny_models` (its byte-level BPE
fixture tokenizer included), trains it with mlx on the project's own text (README files and
the `omlx/` sources), and saves it as an ordinary mlx-lm model folder.  Held-out text for
evaluation prompts is the installed mlx-lm package's own sources: Python of a similar kind,
never trained on, and fixed for a given mlx-lm version (this repo's files change daily).

Seeded (weights, batch order); BLAS threading can still make the last bits differ between
runs.  The folder is reused when its `trained.json` matches the asked steps, seed and corpus.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
    python bench/trained_fixture.py bench/models/kvq-trained --steps 300
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from omlx.testing.tiny_models import TinyModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]

# head_dim 128 so that every KV quantization group size (32, 64, 128) applies.
SPEC = TinyModelSpec(
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=768,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    vocab_size=2048,
    logit_scale=1.0,
    seed=7,
)


def train_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", repo / "bench" / "README.md", *sorted((repo / "omlx").rglob("*.py"))]


def heldout_files() -> list[Path]:
    import mlx_lm

    return sorted(Path(mlx_lm.__file__).parent.rglob("*.py"))


def read_corpus(files: list[Path]) -> str:
    return "\n\n".join(f.read_text(errors="replace") for f in files if f.is_file())


def corpus_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def ensure_trained_model(path: Path, steps: int = 300, seed: int = 0, batch: int = 16, seq_len: int = 128,
                         lr: float = 2e-3, retrain: bool = False, log=print) -> dict:
    """Build and train the model into `path` unless a matching one is there; returns its metadata."""
    path = Path(path)
    text = read_corpus(train_files())
    wanted = {"steps": steps, "seed": seed, "batch": batch, "seq_len": seq_len, "lr": lr,
              "corpus": corpus_hash(text), "spec": SPEC.config()}
    meta_path = path / "trained.json"
    if not retrain and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items() if k != "corpus"):
            if meta.get("corpus") != wanted["corpus"]:
                log(f"trained fixture {path}: the corpus changed since it was trained; reusing it "
                    "(pass --retrain to train again)")
            return meta
    build_model(path, SPEC)
    from mlx_lm import load

    model, tokenizer = load(str(path))
    ids = np.array(tokenizer.encode(text), dtype=np.int32)
    log(f"training {path.name}: {sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6:.1f}M "
        f"parameters, corpus {len(ids)} tokens, {steps} steps x {batch} x {seq_len}")
    started = time.monotonic()
    losses = train(model, ids, steps, seed, batch, seq_len, lr, log)
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    meta = {**wanted, "corpus_tokens": int(len(ids)), "train_seconds": round(time.monotonic() - started, 1),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:]))}
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"trained in {meta['train_seconds']} s: loss {meta['first_loss']:.2f} -> {meta['final_loss']:.2f}")
    return meta


def train(model, ids: np.ndarray, steps: int, seed: int, batch: int, seq_len: int, lr: float, log) -> list[float]:
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / 20, lr, warmup), optim.cosine_decay(lr, steps - warmup, lr / 20)], [warmup]
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = []
    report_every = max(1, steps // 10)
    for i in range(steps):
        starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
        chunk = np.stack([ids[s : s + seq_len + 1] for s in starts])
        loss = step(mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:]))
        mx.eval(state)
        losses.append(float(loss.item()))
        if (i + 1) % report_every == 0 or i == 0:
            log(f"  step {i + 1}/{steps}: loss {np.mean(losses[-report_every:]):.3f} "
                f"(ppl {math.exp(min(20, np.mean(losses[-report_every:]))):.1f})")
    model.eval()
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(ensure_trained_model(args.path, args.steps, args.seed, retrain=args.retrain), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
