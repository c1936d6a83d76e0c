"""What each rank of a tensor-parallel engine does.

Every rank loads the same model, shards it (`shard_model`) and builds the same `LLMEngine`
with the same fixed-size pool: engine construction runs a few forward passes (probing the
KV layout, checking the paged pass), and with sharded weights those passes hold collectives
that every rank must join in the same order.  Then rank 0 `lead`s - its runner sends each
step before running it - and the others `follow`, running the steps they receive with no
scheduler and no sampler.  Full-attention models only for now: state, window and vision
layers still need the scheduler's sequences (see ModelRunner.execute), and a follower has no
disk tier of its own (its `apply_kv_ops` refuses disk loads).
"""

from __future__ import annotations

import mlx.core as mx

from omlx.scheduler.layer_kinds import UnsupportedLayout

from .step_channel import StepChannel


def shard_model(model, group) -> None:
    """Split the weights over the group with the model's own tensor-parallel `shard()`
    (mlx-lm has it for llama, qwen2/3, deepseek and others); refuse models without one."""
    if group.size() == 1:
        return
    shard = getattr(model, "shard", None)
    if shard is None:
        raise UnsupportedLayout(f"{type(model).__module__} has no shard(): it cannot be split over ranks")
    shard(group)
    mx.eval(model.parameters())


def lead(engine, channel: StepChannel) -> None:
    """Rank 0: every step its runner executes goes to the other ranks first."""
    execute = engine.runner.execute

    def broadcast_then_execute(out):
        channel.send(out)
        return execute(out)

    engine.runner.execute = broadcast_then_execute


def follow(engine, channel: StepChannel) -> int:
    """Ranks above 0: run the steps rank 0 sends until it stops; returns the steps run."""
    runner = engine.runner
    if engine.state is not None or engine.window is not None or runner.vision is not None:
        raise UnsupportedLayout("ranks above 0 run full-attention models only for now")
    runner.replica = True  # sizes its pools and applies KV operations from the steps
    runner.resolve = None  # no sequences here: the pass runs from the rows alone
    runner.sampler = None
    steps = 0
    while (out := channel.receive()) is not None:
        runner.execute(out)
        steps += 1
    return steps
