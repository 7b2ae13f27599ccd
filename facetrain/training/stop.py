"""The stop request a preempted or time-limited job gets: a signal or a STOP file, checked by the loop once per step."""

from __future__ import annotations

import signal
from pathlib import Path

from facetrain.runtime.distributed import any_rank


class StopRequest:
    """SIGUSR1/SIGTERM (Slurm's warning before preemption / time limit) or a STOP file set a flag that the
    loop checks once per step; the decision is agreed across ranks so all of them checkpoint together.
    `stop_at_step` (debug.stop_at_step) acts as a request arriving after that step."""

    def __init__(self, stop_file: Path, accelerator, stop_at_step: int | None = None):
        self.stop_file, self.accelerator, self.stop_at_step = stop_file, accelerator, stop_at_step
        self.signalled = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        return self.signalled or self.stop_file.exists()

    def agreed(self, step: int, log_now: bool) -> bool:
        """A stop request on any rank. With several processes agreeing is a collective (a host sync), so it is
        only asked on log steps (Slurm warns minutes ahead) and at `stop_at_step`."""
        at = step == self.stop_at_step
        if not (self.accelerator.num_processes == 1 or log_now or at):
            return False
        return any_rank(self.local() or at, self.accelerator)
