"""GGUF file -> MLX model folder (config.json, safetensors, tokenizer), by hand
(`omlx convert FILE.gguf OUT_DIR`) or once per file into omlx's cache for serving.

The cache is keyed by the file's content hash, so a file moved, renamed or copied into
another model dir is not converted again, and one overwritten in place is.  Hashing a
multi-GB file takes seconds, so each hash is remembered per (path, size, mtime).  A folder
is written under a temporary name and renamed when complete: a conversion killed half way
leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx

from omlx.models.content_hash import file_hash

from .config import mlx_config
from .header import GGUFError, read_header
from .tokenizer import eos_token_ids, write_tokenizer
from .weights import load_weights

log = logging.getLogger("omlx.gguf")

CONVERTER_VERSION = 3  # bump when the output changes, so cached folders are rebuilt
SHARD_BYTES = 2 << 30
_DONE_FILE = "omlx_gguf.json"
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the MLX folder for `gguf_path` into `out_dir`; raises GGUFError on files that
    cannot be converted (the reason says why)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    header = read_header(gguf_path, arrays=True)
    config = mlx_config(header)
    started = time.monotonic()
    weights, quantization = load_weights(header, _progress_logger(gguf_path))
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(header, out_dir, config["max_position_embeddings"])
    eos = eos_token_ids(header)
    if eos:
        config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    _save_weights(weights, out_dir, {"format": "mlx", "source": "gguf"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    log.info("converted %s in %.1fs", gguf_path.name, time.monotonic() - started)
    return out_dir


def _progress_logger(path: Path):
    state = {"last": time.monotonic(), "start": time.monotonic()}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - state["last"] >= 5 or done == total and now - state["start"] >= 5:
            state["last"] = now
            log.info("converting %s: %.0f%% of %.2f GiB (%.0fs)", path.name, 100 * done / max(total, 1),
                     total / 2**30, now - state["start"])
    return report


def _save_weights(weights: dict[str, mx.array], out_dir: Path, metadata: dict) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    for i, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / name), shard, metadata=metadata)


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    from omlx.settings import omlx_home

    return omlx_home() / "cache" / "gguf"


def content_hash(path: Path, cache_dir: Path) -> str:
    """blake2b of the file's bytes, remembered in `cache_dir/hashes.json` per (path, size,
    mtime) so a restart does not read every GGUF file again."""
    return file_hash(path, cache_dir)


def converted_folder(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached MLX folder for this file, converting it first if needed (thread-safe;
    concurrent callers for one file wait for a single conversion)."""
    gguf_path = Path(gguf_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = content_hash(gguf_path, cache_dir)
    folder = cache_dir / f"{digest}-v{CONVERTER_VERSION}"
    with _lock_for(str(folder)):
        if (folder / _DONE_FILE).is_file():
            return folder
        log.info("converting %s into %s (once; later loads reuse it)", gguf_path, folder)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert(gguf_path, tmp)
            (tmp / _DONE_FILE).write_text(json.dumps({"source": str(gguf_path), "sha": digest,
                                                      "converter_version": CONVERTER_VERSION}))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def main(argv: list[str] | None = None) -> int:
    """`omlx convert FILE.gguf OUT_DIR`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="omlx convert", description="convert a GGUF file into an MLX model folder")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        print(f"omlx convert: {args.out_dir} exists and is not empty", file=sys.stderr)
        return 1
    try:
        convert(args.gguf, args.out_dir)
    except GGUFError as exc:
        print(f"omlx convert: {args.gguf}: {exc}", file=sys.stderr)
        return 1
    print(args.out_dir)
    return 0


__all__ = ["GGUFError", "convert", "converted_folder", "main"]
