"""A LoRA adapter folder for a test model, in mlx-lm's layout (`adapter_config.json` +
`adapters.safetensors`), the kind `mlx_lm.load(path, adapter_path=...)` and the mlx-vlm
server's per-request `adapter_path` read.

A freshly initialised LoRA layer is a no-op (its B matrix starts at zero); here B is random,
so a model with the adapter answers differently from the base model, which is what a test of
"the adapter was applied" needs.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_lora_adapter(model_path: Path, out_dir: Path, *, rank: int = 4, scale: float = 10.0,
                       num_layers: int = -1, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_path))
    lora = {"rank": rank, "scale": scale, "dropout": 0.0}
    model.freeze()
    linear_to_lora_layers(model, num_layers if num_layers > 0 else len(model.layers), lora)
    mx.random.seed(seed)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            value = mx.random.normal(value.shape, dtype=value.dtype) * 0.05
        weights[name] = value
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": num_layers if num_layers > 0 else len(model.layers),
              "lora_parameters": lora}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
