"""Find the MLX model folders under the directories given to `omlx serve --model-dir`.

Two layouts are recognised, matching how people keep models on disk:

    DIR/name/config.json        -> model id "name"
    DIR/org/name/config.json    -> model id "org/name" (the hub's own naming)

GGUF files are models too (converted into MLX folders when first loaded, omlx.gguf):

    DIR/name.gguf               -> model id "name"
    DIR/name/file.gguf          -> model id "name" ("name/file" when the folder holds several)
    DIR/org/name/file.gguf      -> model id "org/name" (LM Studio's publisher/model layout)

Anything that looks like a model but cannot be served (PyTorch weights, a broken
config.json, a truncated or unsupported GGUF file, a clashing id) is reported as skipped
with a reason a user can act on, rather than silently ignored or failing the whole server.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("omlx.discovery")

CONFIG_FILE = "config.json"
GGUF_SUFFIX = ".gguf"

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
    model_type: str  # "llm", "vlm", "ocr", "stt", "embedding" or "reranker"
    architecture: str | None
    # Excluded from comparison and hashing: dicts are unhashable, and the id and path
    # already identify the model.
    config: dict = field(compare=False, repr=False)
    size_bytes: int
    weights_format: str | None = None  # "gguf": `path` is a GGUF file, converted on load
    # A LoRA adapter served as its own pool entry: `path` is the base model's folder, and the
    # base model's id (whose settings it shares) is `base_id`.
    adapter_path: str | None = None
    base_id: str | None = None

    @property
    def settings_id(self) -> str:
        """The id its per-model settings are kept under."""
        return self.base_id or self.model_id

    @property
    def takes_audio(self) -> bool:
        """Speech-to-text models, and omni models whose config has an audio tower."""
        return self.model_type == "stt" or (self.model_type in ("vlm", "ocr") and bool(self.config.get("audio_config")))


@dataclass(frozen=True)
class SkippedModel:
    path: Path
    reason: str


_reported: set[tuple[Path, str]] = set()


@dataclass(frozen=True)
class _Candidate:
    model_id: str
    path: Path
    gguf: bool = False  # `path` is a .gguf file


def discover_models(
    model_dirs: Iterable[Path | str],
) -> tuple[list[DiscoveredModel], list[SkippedModel]]:
    """Scan `model_dirs` in order; the first directory wins when two yield the same id."""
    found: dict[str, DiscoveredModel] = {}
    skipped: list[SkippedModel] = []

    def skip(path: Path, reason: str) -> None:
        # The server rescans on every model listing; say each problem once, not each time.
        level = logging.DEBUG if (path, reason) in _reported else logging.WARNING
        _reported.add((path, reason))
        logger.log(level, "skipping model folder %s: %s", path, reason)
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
    """Yield model folders (flat and two-level) and GGUF files, in name order."""
    for file in _gguf_models(model_dir):
        yield _Candidate(model_id=file.name[: -len(GGUF_SUFFIX)], path=file, gguf=True)
    for child in _visible_subdirs(model_dir):
        if (child / CONFIG_FILE).is_file():
            yield _Candidate(model_id=child.name, path=child)
            continue
        if _gguf_models(child):
            yield from _gguf_candidates(child.name, child)
            continue
        # No config here, so treat `child` as an organisation folder.
        for grandchild in _visible_subdirs(child):
            if (grandchild / CONFIG_FILE).is_file():
                yield _Candidate(model_id=f"{child.name}/{grandchild.name}",
                                 path=grandchild)
            elif _gguf_models(grandchild):
                yield from _gguf_candidates(f"{child.name}/{grandchild.name}", grandchild)


def _gguf_models(directory: Path) -> list[Path]:
    """GGUF files that are models: vision projectors (LM Studio keeps `mmproj-*.gguf` beside
    the model they belong to) are not."""
    return [f for f in _files_with_suffix(directory, GGUF_SUFFIX)
            if not f.name.lower().startswith("mmproj")]


def _gguf_candidates(model_id: str, folder: Path) -> Iterator[_Candidate]:
    files = _gguf_models(folder)
    if len(files) == 1:
        yield _Candidate(model_id=model_id, path=files[0], gguf=True)
        return
    # Several quantizations of one model side by side: one id each.
    for file in files:
        yield _Candidate(model_id=f"{model_id}/{file.name[: -len(GGUF_SUFFIX)]}", path=file, gguf=True)


def inspect_model_folder(model_id: str, path: Path) -> DiscoveredModel | SkippedModel:
    """One folder as model `model_id` (for folders found outside the model dirs)."""
    return _inspect(_Candidate(model_id=model_id, path=Path(path)))


def inspect_gguf_file(model_id: str, path: Path) -> DiscoveredModel | SkippedModel:
    """A GGUF file as model `model_id`, described from its header; corrupt, truncated and
    unsupported files come back skipped with the reason."""
    from omlx.gguf.header import GGUFError
    from omlx.gguf.inspect import servable_config

    path = Path(path)
    try:
        config, _ = servable_config(path)
    except GGUFError as exc:
        return SkippedModel(path=path, reason=f"GGUF file cannot be served: {exc}")
    return DiscoveredModel(
        model_id=model_id,
        path=path,
        model_type=detect_model_type(config, None, model_id),
        architecture=_architecture(config),
        config=config,
        size_bytes=_file_size(path),
        weights_format="gguf",
    )


def _inspect(candidate: _Candidate) -> DiscoveredModel | SkippedModel:
    path = candidate.path
    if candidate.gguf:
        return inspect_gguf_file(candidate.model_id, path)
    config = _read_config(path / CONFIG_FILE)
    if isinstance(config, str):
        return SkippedModel(path=path, reason=config)

    weights = _files_with_suffix(path, ".safetensors")
    if not weights and len(_gguf_models(path)) == 1:
        # A hub repo holding a GGUF file (and a config.json for reference): serve the file.
        result = inspect_gguf_file(candidate.model_id, _gguf_models(path)[0])
        return SkippedModel(path, result.reason) if isinstance(result, SkippedModel) else result
    if not weights:
        return SkippedModel(path=path, reason=_missing_weights_reason(path))

    return DiscoveredModel(
        model_id=candidate.model_id,
        path=path,
        model_type=detect_model_type(config, path, candidate.model_id),
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
    elif _files_with_suffix(path, GGUF_SUFFIX):
        found = "found several .gguf files; keep one per folder (or no config.json beside them)"
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


def detect_model_type(config: dict, path: Path | None = None, model_id: str | None = None) -> str:
    """Classify a model as "reranker", "embedding", "ocr", "stt", "vlm" or (by default) "llm"."""
    architectures = _architectures(config)
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "reranker"
    if _is_llm_reranker(config, architectures, f"{model_id or ''} {path.name if path is not None else ''}"):
        return "reranker"
    # sentence-transformers writes modules.json; its presence means the model is meant to
    # be pooled into embeddings, whatever the backbone.
    if path is not None and (path / "modules.json").is_file():
        return "embedding"
    # OCR models (GOT-OCR2, DeepSeek-OCR, PaddleOCR-VL, ...) are vision models trained to
    # transcribe; their names say so, which is all the config tells them apart by.
    names = [*architectures, str(config.get("model_type") or "")]
    if any("ocr" in name.lower() for name in names):
        return "ocr"
    if _is_speech_to_text(config, architectures):
        return "stt"
    if "vision_config" in config:
        return "vlm"
    if _is_bare_encoder(config, architectures):
        return "embedding"
    return "llm"


# Config keys that mark a causal LM as a yes/no reranker (vLLM's overrides for
# Qwen3-Reranker); without them its name says so ("Qwen3-Reranker-0.6B"), as nothing else in
# its config differs from the base model's.
_LLM_RERANKER_KEYS = ("is_original_qwen3_reranker", "classifier_from_token")


def _is_speech_to_text(config: dict, architectures: list[str]) -> bool:
    """Whisper checkpoints: Hugging Face's (WhisperForConditionalGeneration) and mlx-whisper's
    (its ModelDimensions as config.json, `n_audio_ctx`...)."""
    if any(name.startswith("Whisper") for name in architectures) or config.get("model_type") == "whisper":
        return True
    return "n_audio_ctx" in config and "n_text_ctx" in config


def _is_llm_reranker(config: dict, architectures: list[str], name: str) -> bool:
    if not any(a.endswith("ForCausalLM") for a in architectures):
        return False
    return any(config.get(key) for key in _LLM_RERANKER_KEYS) or "reranker" in name.lower()


def _is_bare_encoder(config: dict, architectures: list[str]) -> bool:
    if any(name.endswith(_HEAD_SUFFIXES) for name in architectures):
        return False
    if architectures:
        # "BertModel", "XLMRobertaModel": a backbone with no head at all.
        return all(name.endswith("Model") for name in architectures)
    return config.get("model_type") in _ENCODER_MODEL_TYPES


# ---------------------------------------------------------------------------- HF cache

HF_CACHE_DIR = Path("~/.cache/huggingface/hub")


def default_hf_cache_dir() -> Path:
    """Where huggingface_hub keeps its downloads (HF_HUB_CACHE / HF_HOME honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return HF_CACHE_DIR.expanduser()


def discover_hf_cache(cache_dir: Path | str) -> tuple[list[DiscoveredModel], list[SkippedModel]]:
    """MLX-format model repos in a Hugging Face hub cache (`models--org--name/snapshots/REV`).

    The cache also holds PyTorch checkpoints, datasets and half-finished downloads that were
    never meant for this server, so anything that is not an MLX repo is passed over quietly
    (debug log), not reported as skipped.
    """
    cache_dir = Path(cache_dir).expanduser()
    found: list[DiscoveredModel] = []
    skipped: list[SkippedModel] = []
    try:
        repos = sorted(p for p in cache_dir.iterdir() if p.name.startswith("models--") and p.is_dir())
    except OSError:
        return found, skipped
    for repo in repos:
        repo_id = "/".join(repo.name.split("--")[1:])
        snapshot = _current_snapshot(repo)
        if snapshot is None or not (snapshot / CONFIG_FILE).is_file():
            logger.debug("HF cache: %s has no complete snapshot; passing over it", repo_id)
            continue
        if not is_mlx_repo(repo_id, snapshot):
            logger.debug("HF cache: %s is not an MLX repo; passing over it", repo_id)
            continue
        result = _inspect(_Candidate(model_id=repo_id, path=snapshot))
        (skipped if isinstance(result, SkippedModel) else found).append(result)
    return found, skipped


def _current_snapshot(repo: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the newest one."""
    snapshots = repo / "snapshots"
    try:
        ref = (repo / "refs" / "main").read_text().strip()
        if ref and (snapshots / ref).is_dir():
            return snapshots / ref
    except OSError:
        pass
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def is_mlx_repo(repo_id: str, folder: Path) -> bool:
    """Whether a downloaded repo holds MLX weights: mlx-community's, MLX-quantized
    (`quantization` in config.json), or safetensors written by MLX (`format: mlx`)."""
    if repo_id.split("/")[0].lower() == "mlx-community":
        return True
    config = _read_config(folder / CONFIG_FILE)
    if isinstance(config, dict) and isinstance(config.get("quantization"), dict):
        return True
    weights = _files_with_suffix(folder, ".safetensors")
    return bool(weights) and safetensors_metadata(weights[0]).get("format") == "mlx"


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, `__metadata__`), or {}."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length < 100 << 20:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def safetensors_metadata(path: Path) -> dict:
    metadata = safetensors_header(path).get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}
