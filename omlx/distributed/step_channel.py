"""Rank 0's steps to the other ranks, over the group's own collectives.

A step goes as its plain form (`SchedulerOutput.to_plain`) encoded with orjson, broadcast as
a sum to which only rank 0 contributes: first a header (what follows and its length), then
the bytes.  Every rank takes part in both sums, so a rank that waits for a step blocks in
MLX's collective until rank 0 sends one (or the stop).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import orjson

from omlx.scheduler.step import SchedulerOutput

STEP = 1
STOP = 2


class StepChannel:
    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.sent_bytes = 0  # what rank 0 has broadcast (payload only)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, out: SchedulerOutput) -> None:
        assert self.leader, "only rank 0 sends steps"
        self._broadcast(STEP, orjson.dumps(out.to_plain()))

    def stop(self) -> bool:
        """Tell the other ranks there are no more steps; True when every one of them answered.
        (A send to a rank that is gone can look delivered: the answer is what shows it was.)"""
        assert self.leader, "only rank 0 stops the others"
        self._broadcast(STOP, b"")
        return self._acknowledge() == self.group.size() - 1

    def receive(self) -> SchedulerOutput | None:
        """The next step from rank 0, or None when it stopped."""
        assert not self.leader, "rank 0 does not receive steps"
        kind, payload = self._broadcast(0, b"")
        if kind == STOP:
            self._acknowledge()
            return None
        return SchedulerOutput.from_plain(orjson.loads(payload))

    def _acknowledge(self) -> int:
        """A sum to which each rank above 0 adds one: how many heard the stop."""
        mine = mx.array([0 if self.leader else 1], dtype=mx.int32)
        return int(np.array(mx.distributed.all_sum(mine, group=self.group))[0])

    def _broadcast(self, kind: int, payload: bytes) -> tuple[int, bytes]:
        header = np.array([kind, len(payload)] if self.leader else [0, 0], dtype=np.int32)
        kind, size = (int(v) for v in np.array(mx.distributed.all_sum(mx.array(header), group=self.group)))
        if size == 0:
            return kind, b""
        data = np.frombuffer(payload, dtype=np.uint8) if self.leader else np.zeros(size, dtype=np.uint8)
        received = np.array(mx.distributed.all_sum(mx.array(data), group=self.group))
        if self.leader:
            self.sent_bytes += size
        return kind, received.tobytes()
