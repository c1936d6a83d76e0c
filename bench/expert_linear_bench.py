"""MoE experts on the CPU: packed bf16 expert layers against MLX's float32 gather_mm.

Before omlx/kernels/expert_linear.py, the packed bf16 weight form left mlx-lm's expert layers
(SwitchLinear) in float32: `mx.gather_mm` with float32 weights.  This times, in one process,
side by side (alternating, best of `--repeats`):

  layer   one SwitchGLU block (gate, up, down over the router's top-k) at 1 and 32 token rows,
          at a tiny shape (the test model's: hidden 64, 4 experts) and a mid-size one
          (hidden 1024, expert width 512, 64 experts, top 8: OLMoE-like, halved)
  model   random qwen3_moe models (omlx.testing.tiny_families.build_from_config), the tiny
          test shape and the mid-size block's shape in 2 layers, packed bf16 with their
          experts left float32 (the form before) or packed, one forward pass over 1 and 32
          tokens

and prints each time and the ratio float32 / packed (higher: packed faster), with the CPU.

    python bench/expert_linear_bench.py [--repeats 20]
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
import tempfile  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from alternating import best_of  # noqa: E402  (bench/, the script's own folder)
from omlx.blas import blas_info  # noqa: E402
from omlx.kernels.cpu_features import cpu_features  # noqa: E402
from omlx.kernels.expert_linear import PackedSwitchLinear, switch_linear_types  # noqa: E402

LAYER_SHAPES = {  # name: (hidden, expert width, experts, top k)
    "tiny (64, 32, 4 experts, top 2)": (64, 32, 4, 2),
    "mid (1024, 512, 64 experts, top 8)": (1024, 512, 64, 8),
}
ROWS = (1, 32)

TINY_MOE = {
    "model_type": "qwen3_moe",
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
    "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def pack_experts_of(module: nn.Module) -> None:
    swaps = [(name, PackedSwitchLinear.from_switch(m)) for name, m in module.named_modules()
             if type(m) in switch_linear_types()]
    module.update_modules(tree_unflatten(swaps))
    mx.eval(module.parameters())


def layer_rows(repeats: int) -> list[tuple[str, int, float, float]]:
    from mlx_lm.models.switch_layers import SwitchGLU

    out = []
    for name, (hidden, width, experts, top_k) in LAYER_SHAPES.items():
        mx.random.seed(0)
        f32 = SwitchGLU(hidden, width, experts)
        mx.eval(f32.parameters())
        packed = SwitchGLU(hidden, width, experts)
        packed.update(f32.parameters())
        pack_experts_of(packed)
        for rows in ROWS:
            x = mx.random.normal((rows, hidden))
            idx = mx.argpartition(-mx.random.normal((rows, experts)), kth=top_k - 1, axis=-1)[..., :top_k]
            mx.eval(x, idx)
            t_f32, t_bf16 = best_of(lambda: f32(x, idx), lambda: packed(x, idx), repeats)
            out.append((f"layer {name}", rows, t_f32, t_bf16))
        del f32, packed
    return out


# The mid-size block's shape as a model: 2 layers, 32 experts of 1024 -> 512, top 8.
MID_MOE = {**TINY_MOE, "hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
           "num_experts": 32, "num_experts_per_tok": 8}


def model_rows(repeats: int) -> list[tuple[str, int, float, float]]:
    from mlx_lm import load

    from omlx.models.packed_weights import pack_model
    from omlx.testing.tiny_families import build_from_config

    out = []
    for name, config in (("tiny qwen3_moe (4 layers, 64 wide)", TINY_MOE),
                         ("mid qwen3_moe (2 layers, 1024 / 512, 32 experts, top 8)", MID_MOE)):
        with tempfile.TemporaryDirectory() as tmp:
            path = build_from_config(Path(tmp) / "moe", config)
            before, _ = load(str(path))
            pack_model(before, experts=False)
            after, _ = load(str(path))
            pack_model(after)
        for rows in ROWS:
            tokens = mx.array([[(7 * i + 3) % 400 for i in range(rows)]])
            t_f32, t_bf16 = best_of(lambda: before(tokens), lambda: after(tokens), repeats)
            out.append((f"model {name}", rows, t_f32, t_bf16))
        del before, after
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    features = cpu_features()
    print(f"cpu: {features.summary()}; blas: {blas_info().get('blas')}; mlx {mx.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'what':72} {'rows':>4} {'float32 gather_mm':>18} {'packed bf16':>12} {'ratio':>6}")
    for what, rows, t_f32, t_bf16 in layer_rows(args.repeats) + model_rows(args.repeats):
        print(f"{what:72} {rows:>4} {t_f32 * 1e3:>15.3f} ms {t_bf16 * 1e3:>9.3f} ms {t_f32 / t_bf16:>5.2f}x")


if __name__ == "__main__":
    main()
