"""Rich progress bar (step, loss, img/s, ETA) and log lines, on the main process only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, enabled: bool, quiet: bool = False):
        self.quiet = quiet
        # a log file or pipe gets 120 columns instead of rich's 80, so messages stay on one line
        self.console = Console(highlight=False, width=None if Console().is_terminal else 120)
        self.bar: Progress | None = None
        self.enabled = enabled
        self.task = None

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def start(self, total: int, completed: int) -> None:
        if not self.enabled:
            return
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=completed, loss="-", ips="-")

    def update(self, step: int, loss: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", ips=f"{ips:.0f}")
        elif not self.quiet and not self.enabled:
            self.console.print(f"step {step}: loss {loss:.4f}, {ips:.0f} img/s")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
