"""Find the MLX model folders under the directories given to `omlx serve --model-dir`.

Two layouts are recognised, matching how people keep models on disk:

    DIR/name/config.json        -> model id "name"
    DIR/org/name/config.json    -> model id "org/name" (the hub's own naming)

Anything that looks like a model but cannot be served (PyTorch or GGUF weights, a broken
config.json, a clashing id) is reported as skipped with a reason a user can act on, rather
than silently ignored or failing the whole server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("omlx.discovery")

CONFIG_FILE = "config.json"
GGUF_REASON = "GGUF is not supported; use an MLX (safetensors) conversion"

# Bare encoder backbones: without a task head these are used to produce embeddings.
_ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "nomic_bert",
     "electra", "mpnet", "e5"}
)
_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM",
                  "ForSequenceClassification", "ForTokenClassification",
                  "ForQuestionAnswering")


@dataclass(frozen=True)
class DiscoveredModel:
    model_id: str
    path: Path
    model_type: str  # "llm", "vlm", "embedding" or "reranker"
    architecture: str | None
    # Excluded from comparison and hashing: dicts are unhashable, and the id and path
    # already identify the model.
    config: dict = field(compare=False, repr=False)
    size_bytes: int


@dataclass(frozen=True)
class SkippedModel:
    path: Path
    reason: str


@dataclass(frozen=True)
class _Candidate:
    model_id: str
    path: Path


def discover_models(
    model_dirs: Iterable[Path | str],
) -> tuple[list[DiscoveredModel], list[SkippedModel]]:
    """Scan `model_dirs` in order; the first directory wins when two yield the same id."""
    found: dict[str, DiscoveredModel] = {}
    skipped: list[SkippedModel] = []

    def skip(path: Path, reason: str) -> None:
        logger.warning("skipping model folder %s: %s", path, reason)
        skipped.append(SkippedModel(path=path, reason=reason))

    for raw_dir in model_dirs:
        model_dir = Path(raw_dir).expanduser()
        if not model_dir.is_dir():
            logger.warning("model directory %s does not exist or is not a directory; "
                           "ignoring it", model_dir)
            continue
        if (model_dir / CONFIG_FILE).is_file():
            # A common mistake: pointing --model-dir at one model instead of its parent.
            skip(model_dir, "this is a model folder itself; --model-dir expects a "
                            f"folder of model folders (try --model-dir {model_dir.parent})")
            continue

        for item in _scan_model_dir(model_dir):
            if isinstance(item, SkippedModel):
                skip(item.path, item.reason)
                continue
            earlier = found.get(item.model_id)
            if earlier is not None:
                skip(item.path, f"duplicate model id {item.model_id!r}; already served "
                                f"from {earlier.path}")
                continue
            result = _inspect(item)
            if isinstance(result, SkippedModel):
                skip(result.path, result.reason)
            else:
                found[result.model_id] = result

    models = sorted(found.values(), key=lambda model: model.model_id)
    return models, skipped


def find_model(models: Iterable[DiscoveredModel], model_id: str) -> DiscoveredModel | None:
    """The model with exactly this id, or None."""
    return next((model for model in models if model.model_id == model_id), None)


def _visible_subdirs(directory: Path) -> list[Path]:
    try:
        return sorted(
            child for child in directory.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        )
    except OSError as exc:
        logger.warning("cannot list %s: %s", directory, exc)
        return []


def _files_with_suffix(directory: Path, suffix: str) -> list[Path]:
    try:
        return sorted(
            child for child in directory.iterdir()
            if child.name.endswith(suffix) and not child.name.startswith(".")
            and child.is_file()
        )
    except OSError:
        return []


def _scan_model_dir(model_dir: Path) -> Iterator[_Candidate | SkippedModel]:
    """Yield model folders (flat and two-level) and GGUF-only folders, in name order."""
    for child in _visible_subdirs(model_dir):
        if (child / CONFIG_FILE).is_file():
            yield _Candidate(model_id=child.name, path=child)
            continue
        if _files_with_suffix(child, ".gguf"):
            yield SkippedModel(path=child, reason=GGUF_REASON)
            continue
        # No config here, so treat `child` as an organisation folder.
        for grandchild in _visible_subdirs(child):
            if (grandchild / CONFIG_FILE).is_file():
                yield _Candidate(model_id=f"{child.name}/{grandchild.name}",
                                 path=grandchild)
            elif _files_with_suffix(grandchild, ".gguf"):
                yield SkippedModel(path=grandchild, reason=GGUF_REASON)


def _inspect(candidate: _Candidate) -> DiscoveredModel | SkippedModel:
    path = candidate.path
    config = _read_config(path / CONFIG_FILE)
    if isinstance(config, str):
        return SkippedModel(path=path, reason=config)

    weights = _files_with_suffix(path, ".safetensors")
    if not weights:
        return SkippedModel(path=path, reason=_missing_weights_reason(path))

    return DiscoveredModel(
        model_id=candidate.model_id,
        path=path,
        model_type=detect_model_type(config, path),
        architecture=_architecture(config),
        config=config,
        size_bytes=sum(_file_size(weight) for weight in weights),
    )


def _read_config(config_path: Path) -> dict | str:
    """The parsed config, or a reason why it cannot be used."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"config.json cannot be read: {exc}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"config.json is not valid JSON: {exc}"
    if not isinstance(config, dict):
        return f"config.json is not a JSON object (got {type(config).__name__})"
    return config


def _missing_weights_reason(path: Path) -> str:
    if _files_with_suffix(path, ".bin"):
        found = "found PyTorch .bin; convert with mlx_lm.convert"
    elif _files_with_suffix(path, ".gguf"):
        found = f"found .gguf; {GGUF_REASON}"
    elif _files_with_suffix(path, ".pt") or _files_with_suffix(path, ".pth"):
        found = "found PyTorch .pt; convert with mlx_lm.convert"
    else:
        found = "found no weight files"
    return f"no *.safetensors weights ({found})"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _architectures(config: dict) -> list[str]:
    architectures = config.get("architectures")
    if not isinstance(architectures, list):
        return []
    return [name for name in architectures if isinstance(name, str)]


def _architecture(config: dict) -> str | None:
    architectures = _architectures(config)
    if architectures:
        return architectures[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def detect_model_type(config: dict, path: Path | None = None) -> str:
    """Classify a model as "reranker", "embedding", "vlm" or (by default) "llm"."""
    architectures = _architectures(config)
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "reranker"
    # sentence-transformers writes modules.json; its presence means the model is meant to
    # be pooled into embeddings, whatever the backbone.
    if path is not None and (path / "modules.json").is_file():
        return "embedding"
    if "vision_config" in config:
        return "vlm"
    if _is_bare_encoder(config, architectures):
        return "embedding"
    return "llm"


def _is_bare_encoder(config: dict, architectures: list[str]) -> bool:
    if any(name.endswith(_HEAD_SUFFIXES) for name in architectures):
        return False
    if architectures:
        # "BertModel", "XLMRobertaModel": a backbone with no head at all.
        return all(name.endswith("Model") for name in architectures)
    return config.get("model_type") in _ENCODER_MODEL_TYPES
