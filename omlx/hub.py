"""`omlx pull org/name`: download a model repo from the Hugging Face hub into a model dir.

Downloads go through huggingface_hub (`snapshot_download` into `MODEL_DIR/org/name`), which
shows a progress bar, resumes interrupted files, and talks to `HF_ENDPOINT` when set (a
mirror, or a local hub).  Only what serving needs is fetched: safetensors weights, configs,
tokenizer files and chat templates, never duplicate PyTorch or GGUF weights.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("omlx.hub")

# Everything mlx-lm / mlx-embeddings / mlx-vlm read from a repo.
MODEL_FILE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "*.model",
    "*.tiktoken", "*.py", "1_Pooling/*", "*.md",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PullError(Exception):
    pass


def model_folder(model_dir: Path, repo_id: str) -> Path:
    """`MODEL_DIR/org/name`: the two-level layout discovery serves as model `org/name`."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise PullError(f"{repo_id!r} is not a hub repo id like 'mlx-community/Qwen3-0.6B-4bit'")
    org, name = repo_id.split("/")
    return Path(model_dir).expanduser() / org / name


def pull(repo_id: str, model_dir: Path, revision: str | None = None, token: str | None = None) -> Path:
    """Download (or finish downloading) `repo_id` into the model dir; returns its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    dest = model_folder(model_dir, repo_id)
    # Passed explicitly: huggingface_hub reads HF_ENDPOINT once, when it is first imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    log.info("downloading %s into %s%s", repo_id, dest, f" from {endpoint}" if endpoint else "")
    try:
        snapshot_download(
            repo_id=repo_id,
            revision=revision,
            local_dir=dest,
            allow_patterns=MODEL_FILE_PATTERNS,
            endpoint=endpoint,
            token=token,
        )
    except RepositoryNotFoundError:
        raise PullError(f"the hub has no model repo {repo_id!r} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise PullError(f"{repo_id!r} has no revision {revision!r}") from None
    except HfHubHTTPError as exc:
        raise PullError(f"the hub refused the download of {repo_id!r}: {exc}") from None
    except OSError as exc:  # connection errors, disk full
        raise PullError(f"downloading {repo_id!r} failed: {exc}") from None
    return dest
