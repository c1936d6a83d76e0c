"""Rank 0's engine thread in a group of ranks: every step goes to the other ranks before it
runs here, and a group that can no longer step ends every request instead of hanging them.

A failed step on any rank leaves the ranks' collectives out of step (one waits in an
all_sum the other never joins), so there is no recovering the group in place: the first
failure - a lost peer (MLX raises "connection to a peer was lost" within a second of a rank's
death) or a step that outlasts `step_timeout_s` (a hung rank: no error ever comes) - ends
every request in flight with an error event, and the process exits non-zero so that a
supervisor restarts the whole group.  A clean stop sends the other ranks the stop message.
"""

from __future__ import annotations

import logging
import threading
import time

from omlx.graceful_stop import exit_process
from omlx.scheduler import AsyncEngine
from omlx.scheduler.request import FinishReason, TokenEvent

from .step_channel import StepChannel

log = logging.getLogger("omlx.distributed")

GROUP_LOST_CODE = "distributed_group_lost"
STOP_TIMEOUT_S = 10.0  # for the other ranks to answer the stop message
EXIT_FLUSH_S = 1.0  # for the error events to reach the clients before the process goes


class GroupLost(RuntimeError):
    pass


class GroupEngine(AsyncEngine):
    def __init__(self, engine, channel: StepChannel, step_timeout_s: float):
        super().__init__(engine)
        self.channel = channel
        self.step_timeout_s = step_timeout_s
        self.lost: str | None = None
        self._step_started: float | None = None
        self._group_stopped = False
        self._exit_lock = threading.Lock()
        execute = engine.runner.execute

        def broadcast_then_execute(out):
            if self.lost is not None:
                raise GroupLost(self.lost)
            self._step_started = time.monotonic()
            try:
                channel.send(out)
                return execute(out)
            except Exception as exc:
                self._lose(f"the ranks can no longer run steps together ({exc})")
                raise GroupLost(self.lost) from exc
            finally:
                self._step_started = None

        engine.runner.execute = broadcast_then_execute
        threading.Thread(target=self._watch_steps, name="omlx-rank-watchdog", daemon=True).start()

    def shutdown(self) -> None:
        """Stop the engine thread, then tell the other ranks to stop (they exit 0)."""
        super().shutdown()
        if not self._group_stopped and self.lost is None:
            self._group_stopped = True
            if self._thread.is_alive():  # stuck in a step: the group cannot take a stop message
                self._lose("the engine thread did not stop (a rank hangs)")
            else:
                self._stop_others()
        if self.lost is not None:
            # A stop after a fault (mlx.launch sends SIGTERM to the others when a rank dies)
            # still exits non-zero: the group did not end cleanly.
            self._end_and_exit(flush_s=0.2)

    def _stop_others(self) -> None:
        """The stop message, answered by every other rank within STOP_TIMEOUT_S (a rank that
        is gone may leave the collective waiting: it runs in a thread of its own)."""
        answered: list = []

        def send_stop():
            try:
                answered.append(self.channel.stop())
            except Exception as exc:
                answered.append(exc)

        sender = threading.Thread(target=send_stop, name="omlx-rank-stop", daemon=True)
        sender.start()
        sender.join(STOP_TIMEOUT_S)
        if answered == [True]:
            log.info("told the other %d rank(s) to stop", self.channel.group.size() - 1)
        else:
            why = answered[0] if answered else f"no answer within {STOP_TIMEOUT_S:g}s"
            self._lose(f"the other ranks did not answer the stop message ({why})")

    # ------------------------------------------------------------------ faults
    def _watch_steps(self) -> None:
        while self.lost is None:
            time.sleep(min(0.5, self.step_timeout_s / 4))
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout_s:
                # The engine thread waits in a collective that will never complete: its
                # requests are ended from here.
                self._lose(f"a step took longer than {self.step_timeout_s:g}s: a rank hangs or is unreachable")

    def _lose(self, reason: str) -> None:
        with self._exit_lock:
            if self.lost is not None:
                return
            self.lost = reason
        log.error("distributed group lost: %s; ending every request and exiting", reason)
        threading.Thread(target=self._end_and_exit, name="omlx-group-lost", daemon=True).start()

    def _end_and_exit(self, flush_s: float = EXIT_FLUSH_S) -> None:
        time.sleep(0.2)  # the engine thread's own fail_all (a raised step) goes first
        message = f"the model's ranks failed: {self.lost}"
        with self._lock:
            streams = list(self._streams)
        self._deliver([(rid, TokenEvent(None, FinishReason.ERROR, error=message, error_code=GROUP_LOST_CODE))
                       for rid in streams])
        time.sleep(flush_s)
        log.error("rank 0 exits with status 1 (distributed group lost)")
        exit_process(1)
