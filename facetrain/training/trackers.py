"""Experiment trackers (`train.log_with`) through accelerate: the names the config gave -> what `Accelerator`
takes, checked to be installed before the run starts.

Every tracker gets the same scalars (`train/loss`, `train/lr`, `train/img_per_s`, `val/<metric>`) and the config as
hyperparameters. TensorBoard writes to `<output_dir>/tb` as it always has; MLflow and W&B name their experiment /
project `facetrain` (`PROJECT`) and the run after the output folder; where each stores its data is configured the
tracker's own way (MLflow: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; W&B: WANDB_MODE=offline, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

from accelerate.tracking import MLflowTracker, TensorBoardTracker, get_available_trackers

from facetrain.config.names import ALL_TRACKERS, TRACKERS
from facetrain.config.schema import TrainConfig
from facetrain.errors import INSTALL, UserError

PROJECT = "facetrain"
"""The project / experiment name of the trackers that group runs (MLflow's experiment, W&B's project, ...)."""
TENSORBOARD_DIR = "tb"
"""TensorBoard's folder inside train.output_dir."""


class _MLflow(MLflowTracker):
    """MLflow with facetrain's metric names made legal for it: MLflow refuses `@` and `=` (`val/tar@far=1e-03`
    is logged as `val/tar_at_far_1e-03`)."""

    def log(self, values: dict, step: int | None = None, **kwargs):
        safe = {re.sub(r"[^\w./\- :]", "_", k.replace("@", "_at_")): v for k, v in values.items()}
        super().log(safe, step=step, **kwargs)


def _build(name: str, out: Path):
    """The tracker object (or accelerate's name for it) for one tracker name."""
    builders = {
        "tensorboard": lambda: TensorBoardTracker(TENSORBOARD_DIR, out),
        "mlflow": lambda: _MLflow(PROJECT, run_name=out.name),
    }
    return builders[name]() if name in builders else name


def tracker_names(t: TrainConfig) -> list[str]:
    """The trackers to log to, in `TRACKERS` order: `all` = every installed one; a named one that is not installed
    is a one-line UserError saying what to install (accelerate would silently skip it)."""
    installed = {str(getattr(x, "value", x)) for x in get_available_trackers()}
    if ALL_TRACKERS in t.log_with:
        names = [n for n in TRACKERS if n in installed]
    else:
        names = [n for n in TRACKERS if n in t.log_with]
        for name in names:
            if name not in installed:
                extra = f" (or {INSTALL['track']})" if name == "mlflow" else ""
                raise UserError(f"train.log_with: tracker {name!r} is not installed: pip install {TRACKERS[name]}"
                                f"{extra}, or remove it")
    return [n for n in names if t.tensorboard or n != "tensorboard"]


def tensorboard_writer(accelerator):
    """The run's TensorBoard SummaryWriter (rank 0), or None when TensorBoard is not among the trackers."""
    for tracker in accelerator.trackers:
        if isinstance(tracker, TensorBoardTracker):
            return tracker.tracker
    return None


def accelerator_trackers(t: TrainConfig, out: Path) -> list:
    """`Accelerator(log_with=...)` for train.log_with (empty: no tracker)."""
    return [_build(name, out) for name in tracker_names(t)]
