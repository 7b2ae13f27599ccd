"""The stop request a preempted or time-limited job gets: a signal or a STOP file, checked by the loop once per step."""

from __future__ import annotations

import signal
from pathlib import Path


class StopRequest:
    """SIGUSR1/SIGTERM (Slurm's warning before preemption / time limit) or a STOP file set a flag that the
    loop checks once per step; the decision is agreed across ranks so all of them checkpoint together."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.signalled = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        return self.signalled or self.stop_file.exists()
