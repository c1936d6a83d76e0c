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

    def stop(self) -> None:
        """Tell the other ranks there are no more steps."""
        assert self.leader, "only rank 0 stops the others"
        self._broadcast(STOP, b"")

    def receive(self) -> SchedulerOutput | None:
        """The next step from rank 0, or None when it stopped."""
        assert not self.leader, "rank 0 does not receive steps"
        kind, payload = self._broadcast(0, b"")
        if kind == STOP:
            return None
        return SchedulerOutput.from_plain(orjson.loads(payload))

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
