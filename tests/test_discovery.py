from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import pytest

from omlx.models.discovery import (
    DiscoveredModel,
    detect_model_type,
    discover_models,
    find_model,
)

LLM_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}


def make_model(path: Path, config: dict | None = None, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config if config is not None else LLM_CONFIG))
    if weights:
        mx.save_safetensors(str(path / "model.safetensors"), {"w": mx.zeros((2,))})
    return path


def ids(models: list[DiscoveredModel]) -> list[str]:
    return [model.model_id for model in models]


def reasons(skipped) -> dict[str, str]:
    return {item.path.name: item.reason for item in skipped}


def test_flat_and_two_level_layouts(tmp_path: Path) -> None:
    make_model(tmp_path / "zeta")
    make_model(tmp_path / "alpha")
    make_model(tmp_path / "Qwen" / "Qwen3-0.6B")
    make_model(tmp_path / "Qwen" / "Qwen3-1.7B")

    models, skipped = discover_models([tmp_path])

    assert ids(models) == ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "alpha", "zeta"]
    assert skipped == []
    alpha = find_model(models, "alpha")
    assert alpha is not None
    assert alpha.path == tmp_path / "alpha"
    assert alpha.model_type == "llm"
    assert alpha.architecture == "Qwen3ForCausalLM"
    assert alpha.config == LLM_CONFIG
    assert alpha.size_bytes == (tmp_path / "alpha" / "model.safetensors").stat().st_size > 0


def test_flat_model_folder_is_not_descended_into(tmp_path: Path) -> None:
    make_model(tmp_path / "outer")
    make_model(tmp_path / "outer" / "inner")

    models, _ = discover_models([tmp_path])

    assert ids(models) == ["outer"]


def test_size_sums_all_safetensors_shards(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "sharded", weights=False)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x" * 50)

    models, _ = discover_models([tmp_path])

    assert models[0].size_bytes == 150


@pytest.mark.parametrize(
    ("weight_file", "expected"),
    [
        ("pytorch_model.bin", "found PyTorch .bin; convert with mlx_lm.convert"),
        ("model.pt", "found PyTorch .pt"),
        (None, "found no weight files"),
    ],
)
def test_config_without_safetensors_is_skipped(
    tmp_path: Path, weight_file: str | None, expected: str
) -> None:
    folder = make_model(tmp_path / "noweights", weights=False)
    if weight_file:
        (folder / weight_file).write_bytes(b"\0")

    models, skipped = discover_models([tmp_path])

    assert models == []
    reason = reasons(skipped)["noweights"]
    assert reason.startswith("no *.safetensors weights")
    assert expected in reason


def test_broken_gguf_files_are_reported_not_served(tmp_path: Path) -> None:
    # GGUF models are served (tests/test_gguf_discovery.py); these files are 4 bytes of magic.
    (tmp_path / "flat-gguf").mkdir()
    (tmp_path / "flat-gguf" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    (tmp_path / "org" / "nested-gguf").mkdir(parents=True)
    (tmp_path / "org" / "nested-gguf" / "model.gguf").write_bytes(b"GGUF")
    (make_model(tmp_path / "with-config", weights=False) / "model.gguf").write_bytes(b"\0")

    models, skipped = discover_models([tmp_path])

    assert models == []
    found = reasons(skipped)
    assert set(found) == {"model-Q4_K_M.gguf", "model.gguf", "with-config"}
    assert all(reason.startswith("GGUF file cannot be served: not a GGUF file") for reason in found.values())


def test_invalid_config_is_skipped(tmp_path: Path, caplog) -> None:
    folder = make_model(tmp_path / "broken")
    (folder / "config.json").write_text("{not json")
    folder = make_model(tmp_path / "listy")
    (folder / "config.json").write_text("[1, 2]")
    make_model(tmp_path / "good")

    with caplog.at_level(logging.WARNING, logger="omlx.discovery"):
        models, skipped = discover_models([tmp_path])

    assert ids(models) == ["good"]
    assert reasons(skipped)["broken"].startswith("config.json is not valid JSON:")
    assert "not a JSON object" in reasons(skipped)["listy"]
    assert "broken" in caplog.text and "not valid JSON" in caplog.text


def test_missing_dir_is_logged_not_raised(tmp_path: Path, caplog) -> None:
    make_model(tmp_path / "present" / "m")
    missing = tmp_path / "absent"

    with caplog.at_level(logging.WARNING, logger="omlx.discovery"):
        models, skipped = discover_models([missing, str(tmp_path / "present")])

    assert ids(models) == ["m"]
    assert skipped == []
    assert str(missing) in caplog.text


def test_duplicate_ids_first_dir_wins(tmp_path: Path) -> None:
    first = make_model(tmp_path / "a" / "same")
    second = make_model(tmp_path / "b" / "same")
    make_model(tmp_path / "b" / "other")

    models, skipped = discover_models([tmp_path / "a", tmp_path / "b"])

    assert ids(models) == ["other", "same"]
    assert find_model(models, "same").path == first
    assert [item.path for item in skipped] == [second]
    assert "duplicate model id 'same'" in skipped[0].reason
    assert str(first) in skipped[0].reason


def test_hidden_folders_are_ignored(tmp_path: Path) -> None:
    make_model(tmp_path / ".cache")
    make_model(tmp_path / "org" / ".hidden")
    (tmp_path / ".trash").mkdir()
    (tmp_path / ".trash" / "x.gguf").write_bytes(b"GGUF")
    make_model(tmp_path / "visible")

    models, skipped = discover_models([tmp_path])

    assert ids(models) == ["visible"]
    assert skipped == []


def test_model_dir_that_is_itself_a_model_is_explained(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "single")

    models, skipped = discover_models([folder])

    assert models == []
    assert "model folder itself" in skipped[0].reason


def test_type_detection(tmp_path: Path) -> None:
    make_model(tmp_path / "chat")
    make_model(tmp_path / "vision", {"architectures": ["Qwen2VLForConditionalGeneration"],
                                     "vision_config": {"depth": 2}})
    make_model(tmp_path / "bert", {"architectures": ["BertModel"], "model_type": "bert"})
    make_model(tmp_path / "xlmr", {"architectures": ["XLMRobertaModel"]})
    make_model(tmp_path / "mlm", {"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    make_model(tmp_path / "rerank",
               {"architectures": ["XLMRobertaForSequenceClassification"]})
    st_model = make_model(tmp_path / "qwen-embed", LLM_CONFIG)
    (st_model / "modules.json").write_text("[]")
    make_model(tmp_path / "typed-only", {"model_type": "llama"})

    models, _ = discover_models([tmp_path])
    types = {model.model_id: model.model_type for model in models}

    assert types == {
        "bert": "embedding",
        "chat": "llm",
        "mlm": "llm",
        "qwen-embed": "embedding",
        "rerank": "reranker",
        "typed-only": "llm",
        "vision": "vlm",
        "xlmr": "embedding",
    }
    assert find_model(models, "typed-only").architecture == "llama"


def test_detect_model_type_from_config_alone() -> None:
    assert detect_model_type({"model_type": "bert"}) == "embedding"
    assert detect_model_type({}) == "llm"
    assert detect_model_type({"architectures": "not-a-list"}) == "llm"


def test_find_model_missing_returns_none(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    models, _ = discover_models([tmp_path])
    assert find_model(models, "nope") is None
    assert find_model([], "m") is None


def test_real_tiny_model_is_discovered(tmp_path: Path) -> None:
    from omlx.testing.tiny_models import build_model

    build_model(tmp_path / "m" / "tiny")

    models, skipped = discover_models([tmp_path / "m"])

    assert skipped == []
    assert ids(models) == ["tiny"]
    tiny = models[0]
    assert tiny.model_type == "llm"
    assert tiny.architecture == "Qwen3ForCausalLM"
    assert tiny.size_bytes > 0
