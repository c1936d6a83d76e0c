"""`omlx serve --distributed`: one model sharded over the ranks of an `mlx.launch` group.

    mlx.launch --backend ring -n 2 --python .venv/bin/python -- \
        -m omlx serve --distributed --model-dir DIR --no-demo

Every rank parses the same command line, finds the same model in the same model dirs (the
one named by --preload / --pin, else the only LLM there), loads it, shards it with the
model's own `shard()` and builds the same engine - engine construction runs passes whose
collectives every rank joins, so this happens before anything else, on every rank.  Then
rank 0 serves HTTP with that engine resident and pinned (its steps go to the others first,
omlx.distributed.group_engine), and the other ranks follow its steps until it stops them.

Not across ranks yet (refused or turned off, with the reason logged): models without
`shard()`, hybrid / sliding-window / vision models (a follower has no sequences for their
per-sequence state), GGUF files and adapters, a draft model (only rank 0 would hold it; prompt
lookup drafts still run), and the disk tier (a follower cannot read rank 0's blocks).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

from omlx.graceful_stop import exit_process
from omlx.models.catalog import ModelNotFound, ModelUnavailable
from omlx.models.loaders import Loaders
from omlx.scheduler.layer_kinds import UnsupportedLayout

from .ranks import follow, shard_model
from .step_channel import StepChannel

log = logging.getLogger("omlx.distributed")


class DistributedLoaders(Loaders):
    """Rank 0's loaders once the group's model is resident: the group runs that one model,
    and loads nothing else (another model would be on rank 0 alone)."""

    def __init__(self, base: Loaders, model_id: str, ranks: int):
        super().__init__(base.settings, base.engine_config, base.memory_budget, base.kv_budget, base.resolve)
        self.model_id = model_id
        self.ranks = ranks

    def load(self, info):
        raise ModelUnavailable(f"this server runs '{self.model_id}' across {self.ranks} ranks (--distributed) "
                               f"and loads no other model (asked for '{info.model_id}')")


def serve_distributed(config, step_timeout_s: float) -> None:
    """Rank 0 serves `config` (omlx.server.ServerConfig) with the group's model; the other
    ranks follow its steps.  Exits the process: 0 after a clean stop, 1 after a fault."""
    import mlx.core as mx

    from omlx.models.pool import ModelPool
    from omlx.settings import SettingsStore

    group = mx.distributed.init()
    rank = group.rank()
    # Only the model dirs: no demo or packaged models (a rank's catalog must match rank 0's).
    config = dataclasses.replace(config, packaged_models=False, default_chat_model=False, demo_model_id=None)
    settings = SettingsStore(config.settings_home)
    settings.overrides.update(config.settings_overrides)
    pool = ModelPool(config.model_dirs, config.engine, memory_budget=config.memory_budget, settings=settings,
                     hf_cache_dirs=config.hf_cache_dirs)
    try:
        info = group_model(pool, config)
        engine, tokenizer, window, weights = build_engine(pool, info, group)
    except (UnsupportedLayout, ModelUnavailable, ModelNotFound) as exc:
        print(f"omlx serve --distributed (rank {rank}): {exc}", file=sys.stderr)
        exit_process(2)
    channel = StepChannel(group)
    if not channel.leader:
        log.info("rank %d of %d: following rank 0's steps on %s", rank, group.size(), info.model_id)
        try:
            steps = follow(engine, channel)
        except Exception as exc:  # rank 0 gone, or a pass failed here: the group is over
            log.error("rank %d: the group failed (%s)", rank, exc)
            exit_process(1)
        log.info("rank %d: stopped by rank 0 after %d steps", rank, steps)
        exit_process(0)
    _lead(config, pool, info, engine, tokenizer, window, weights, channel, step_timeout_s)


def _lead(config, pool, info, engine, tokenizer, window, weights, channel, step_timeout_s) -> None:
    from omlx.models.loaded import LoadedModel
    from omlx.server import POOL, run

    from .group_engine import GroupEngine

    loaded = LoadedModel(info, tokenizer, GroupEngine(engine, channel, step_timeout_s), engine.max_model_len,
                         time.time(), weights_bytes=weights)

    def install(app) -> None:
        served = app[POOL]
        served.residency.add(info.model_id, loaded)
        served.loaders = DistributedLoaders(served.loaders, info.model_id, channel.group.size())

    log.info("rank 0 of %d: serving %s (context %d), sharded over the group", channel.group.size(),
             info.model_id, window)
    run(dataclasses.replace(config, pinned=[*config.pinned, info.model_id]), prepare=install)


def group_model(pool, config):
    """The model the group serves: the one named by --preload / --pin, else the only LLM."""
    named = list(dict.fromkeys([*config.preload, *config.pinned]))
    if len(named) > 1:
        raise ModelUnavailable(f"--distributed serves one model; {len(named)} are named: {', '.join(named)}")
    if named:
        return pool.resolve(named[0])
    llms = pool.servable("llm")
    if len(llms) != 1:
        found = ", ".join(m.model_id for m in llms) or "none"
        raise ModelUnavailable(f"--distributed serves one LLM; the model dirs hold {len(llms)} ({found}): "
                               "name one with --preload")
    return llms[0]


def build_engine(pool, info, group):
    """Load, shard and build the engine of `info` as every rank does (same config, same
    order of collectives).  Returns (LLMEngine, tokenizer, context window, weight bytes)."""
    from mlx_lm import load

    from omlx.models.content_hash import folder_fingerprint
    from omlx.models.facts import context_window_of, parameter_bytes
    from omlx.scheduler import EngineConfig, LLMEngine, default_kv_cache_bytes

    if info.model_type != "llm":
        raise ModelUnavailable(f"'{info.model_id}' is a {info.model_type} model; --distributed serves LLMs only")
    if info.weights_format == "gguf" or info.adapter_path:
        raise ModelUnavailable(f"'{info.model_id}': GGUF files and adapters are not served across ranks yet")
    trust = pool.settings.trust_remote_code(info.settings_id)
    model, tokenizer = load(str(info.path), tokenizer_config={"trust_remote_code": True} if trust else None)
    shard_model(model, group)  # refuses a model without shard()
    config = EngineConfig.from_settings(pool.settings.of_model(info.settings_id), base=pool.engine_config)
    if config.kv_cache_dir is not None or config.draft_model is not None:
        log.warning("%s: the disk tier and draft models are off across ranks (a follower has neither)",
                    info.model_id)
        config = dataclasses.replace(config, kv_cache_dir=None, draft_model=None)
    weights = parameter_bytes(model)  # this rank's shard
    if config.kv_cache_bytes is None and config.num_blocks is None:
        config = dataclasses.replace(config, kv_cache_bytes=default_kv_cache_bytes(weights, pool.memory_budget))
    window = context_window_of(info.config)
    scope = b"content:" + folder_fingerprint(info.path, None) + f":rank{group.rank()}/{group.size()}".encode()
    kv_budget = pool.residency.kv_budget(info.model_id) if group.rank() == 0 else None
    engine = LLMEngine(model, config, context_window=window, scope=scope, kv_budget=kv_budget,
                       label=f"{info.model_id} ({info.path})")
    if engine.state is not None or engine.window is not None or engine.runner.vision is not None:
        raise UnsupportedLayout(f"'{info.model_id}' has recurrent-state or sliding-window layers: "
                                "--distributed serves full-attention models only for now")
    return engine, tokenizer, window, weights
