"""Where a run continues from (train.resume), and whether there is anything left to train.

All of it is decided before any data is read and before the output folder is touched: a checkpoint written with
other settings or another identity split is refused at once (checkpoint.check_compatible).
"""

from __future__ import annotations

import json
from pathlib import Path

from facetrain.config.load import to_dict
from facetrain.config.schema import Config
from facetrain.errors import UserError
from facetrain.model.files import read_bundle_meta
from facetrain.training import checkpoint as ckpt

RUN_LENGTH_KEYS = ("max_steps", "epochs", "grad_accum_steps")
"""train.* settings that decide how many steps a run has: a finished run is finished only under the same ones."""

TRAIN_LONGER = "To train longer, raise train.max_steps or train.epochs"


def resume_point(cfg: Config, out: Path) -> Path | None:
    """The checkpoint to continue from: train.resume "auto" (the latest in `out`, if any), a path, or none (then
    `out` must hold no checkpoints)."""
    resume = cfg.train.resume
    resume_from = None
    if resume == "auto":
        resume_from = ckpt.latest_checkpoint(out)
    elif resume:
        resume_from = Path(resume)
    elif ckpt.latest_checkpoint(out) is not None:
        raise UserError(f"train.output_dir: {out} already holds checkpoints; continue with --train.resume "
                        "auto or choose another train.output_dir")
    if resume_from is not None:
        ckpt.check_compatible(resume_from, to_dict(cfg))
    return resume_from


def finished_run(out: Path, checkpoint: Path, cfg: Config) -> dict | None:
    """The done.json of a run that finished at `checkpoint` under the same run length, else None."""
    done_file = out / "done.json"
    if not done_file.is_file():
        return None
    try:
        done = json.loads(done_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    meta = read_bundle_meta(checkpoint)
    saved = (meta.get("config") or {}).get("train", {})
    same_length = all(saved.get(k) == getattr(cfg.train, k) for k in RUN_LENGTH_KEYS)
    if not same_length or done.get("step") != meta.get("step"):
        return None
    return {**done, "already_complete": True}


def finished_message(out: Path, done: dict) -> str:
    return (f"train.resume: {out} is complete (step {done['step']} of {done['max_steps']}); nothing to do. "
            f"{TRAIN_LONGER}")


def beyond_run_length(checkpoint: Path | None, max_steps: int) -> tuple[dict, str] | None:
    """(summary, message) when `checkpoint` is at or past the run's last step (train.max_steps / epochs lowered
    to or below it), else None."""
    if checkpoint is None:
        return None
    step = read_bundle_meta(checkpoint).get("step") or 0
    if step < max_steps:
        return None
    message = (f"train.resume: {checkpoint} is at step {step}, the run has {max_steps} steps; nothing to do. "
               f"{TRAIN_LONGER}")
    return {"step": step, "max_steps": max_steps, "stopped": False, "already_complete": True}, message
