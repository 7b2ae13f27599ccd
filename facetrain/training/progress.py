"""Rich progress bar (step, loss, img/s, ETA) and log lines, on the main process only."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from facetrain.config.load import to_dict
from facetrain.config.schema import Config


class TrainProgress:
    def __init__(self, enabled: bool, quiet: bool = False):
        self.quiet = quiet
        # a log file or pipe gets 120 columns instead of rich's 80 (the progress bar's width); messages are never
        # wrapped there (soft_wrap): a line that names a long path stays one line that grep and tests can find
        self.terminal = Console().is_terminal
        self.console = Console(highlight=False, width=None if self.terminal else 120)
        self.bar: Progress | None = None
        self.enabled = enabled
        self.task = None

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, soft_wrap=not self.terminal)

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


def flat_hparams(cfg: Config) -> dict:
    """The config as TensorBoard hyperparameters: one "section.key" (or "section.key.sub") per plain value."""
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, dict):
                out.update({f"{section}.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


class Throughput:
    """Training img/s per log window, from the images counted since the window opened. `restart()` after work
    that is not training (logging, validation) leaves its time out."""

    def __init__(self):
        self.windows: list[tuple[int, int, float]] = []  # (step, images, seconds) per closed window
        self.restart()

    def restart(self) -> None:
        self._start, self._images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self._images += images

    def close(self, step: int) -> float:
        """Record the window ending at `step`; its img/s."""
        seconds = time.perf_counter() - self._start
        self.windows.append((step, self._images, seconds))
        return self._images / max(seconds, 1e-9)

    def steady(self) -> float | None:
        """img/s over every window but the first (DataLoader start-up), or None before any."""
        steady = self.windows[1:] or self.windows
        seconds = sum(w[2] for w in steady)
        return sum(w[1] for w in steady) / seconds if seconds > 0 else None
