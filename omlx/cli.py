"""`omlx serve` and `omlx models`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("OMLX_HOME", "~/.omlx")).expanduser()
DEFAULT_MODEL_DIR = DEFAULT_HOME / "models"
DEMO_MODEL_ID = "omlx-demo-chat"

log = logging.getLogger("omlx")


def _env(name: str, default):
    return os.environ.get(f"OMLX_{name}", default)


def _default_kv_cache_gib() -> float:
    """A quarter of physical memory, at most 4 GiB, per loaded model."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2.0
    return round(min(4.0, total / 4 / 2**30), 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omlx", description="A local LLM inference server on MLX.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve every model found in the model dirs")
    _add_model_dirs(serve)
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(_env("PORT", 8000)))
    serve.add_argument(
        "--kv-cache-gb", type=float, default=float(_env("KV_CACHE_GB", _default_kv_cache_gib())),
        help="KV cache memory per loaded model, in GiB (sets the block pool size)",
    )
    serve.add_argument("--block-size", type=int, default=int(_env("BLOCK_SIZE", 32)), help="tokens per KV block")
    serve.add_argument("--max-num-seqs", type=int, default=int(_env("MAX_NUM_SEQS", 64)),
                       help="sequences decoded together per step")
    serve.add_argument(
        "--max-num-batched-tokens", type=int,
        default=int(_env("MAX_NUM_BATCHED_TOKENS", os.environ.get("PREFILL_STEP_SIZE", 512))),
        help="tokens fed to the model per step (decodes plus prefill chunks)",
    )
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="cap on context length (default: each model's own)")
    serve.add_argument("--no-demo", action="store_true",
                       help="do not create the demo model when the default model dir is empty")
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))

    models = commands.add_parser("models", help="list the models the server would serve")
    _add_model_dirs(models)
    return parser


def _add_model_dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir", action="append", type=Path, dest="model_dirs",
        help=f"a directory of MLX model folders (repeatable; default {DEFAULT_MODEL_DIR})",
    )


def _model_dirs(args) -> list[Path]:
    if args.model_dirs:
        return [p.expanduser() for p in args.model_dirs]
    env = os.environ.get("OMLX_MODEL_DIR")
    return [Path(p).expanduser() for p in env.split(os.pathsep)] if env else [DEFAULT_MODEL_DIR]


def ensure_demo_model(model_dirs: list[Path]) -> str | None:
    """With only the default dir and nothing servable in it, build the small demo chat model,
    so a fresh install answers a chat completion with nothing downloaded."""
    from omlx.models.discovery import discover_models

    if model_dirs != [DEFAULT_MODEL_DIR]:
        return None
    demo_path = DEFAULT_MODEL_DIR / DEMO_MODEL_ID
    found, _ = discover_models(model_dirs)
    if any(m.model_type == "llm" for m in found):
        return DEMO_MODEL_ID if any(m.model_id == DEMO_MODEL_ID for m in found) else None
    from omlx.testing.tiny_models import DEMO, build_model

    log.info("no models in %s: creating the demo model %s (random weights, for trying the API)",
             DEFAULT_MODEL_DIR, DEMO_MODEL_ID)
    build_model(demo_path, DEMO)
    return DEMO_MODEL_ID


def serve(args) -> None:
    from omlx.blas import ensure_optimized_blas

    # Before MLX is imported: re-exec with an optimized BLAS preloaded (Linux CPU).
    ensure_optimized_blas(sys.orig_argv[1:])

    from omlx.blas import blas_info
    from omlx.scheduler import EngineConfig
    from omlx.server import ServerConfig, run

    model_dirs = _model_dirs(args)
    for d in model_dirs:
        if d == DEFAULT_MODEL_DIR:
            d.mkdir(parents=True, exist_ok=True)
    demo = None if args.no_demo else ensure_demo_model(model_dirs)
    engine = EngineConfig(
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )
    info = blas_info()
    log.info("compute: %s, BLAS: %s%s", info["backend"], info["blas"],
             f" ({info['blas_library']})" if info.get("blas_library") else "")
    log.info("serving on http://%s:%d/v1 (models from %s)", args.host, args.port,
             ", ".join(str(d) for d in model_dirs))
    run(ServerConfig(model_dirs=model_dirs, host=args.host, port=args.port, engine=engine, demo_model_id=demo))


def list_models(args) -> None:
    from omlx.models.discovery import discover_models

    found, skipped = discover_models(_model_dirs(args))
    for m in found:
        print(f"{m.model_id:40s} {m.model_type:10s} {m.architecture or '?':28s} {m.size_bytes / 2**20:9.1f} MiB")
    for s in skipped:
        print(f"{'(skipped) ' + str(s.path):40s} {s.reason}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(args)
    elif args.command == "models":
        list_models(args)
