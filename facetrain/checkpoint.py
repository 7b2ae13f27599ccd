"""Full-state training checkpoints: atomic, self-describing, and loadable without unpickling code.

Layout: <output_dir>/checkpoints/step_00001200/
    model.safetensors, facetrain.json   the model as a bundle (eval/verify accept a checkpoint directly)
    train_state.pt                      optimizer, scheduler, grad scaler, loss parameters, counters
    rng_<rank>.pt                       each rank's torch RNG state (dropout / stochastic depth)
    COMPLETE                            written last; a directory without it is ignored by --resume auto

Everything is written into `step_X.tmp` first and renamed into place (a rename is atomic), so a kill during
a save never leaves a corrupt latest checkpoint. `.pt` files hold only tensors and plain containers and are
read with `torch.load(weights_only=True)`. A failed save (full disk) keeps the previous checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from facetrain.errors import UserError
from facetrain.model import META_FILE, WEIGHTS_FILE, read_bundle_meta

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / MARKER).is_file() and (p / WEIGHTS_FILE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_dir_for(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}.tmp"


def write_rng(tmp: Path, rank: int) -> None:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, tmp / f"rng_{rank}.pt")


def write_train_state(tmp: Path, state: dict) -> None:
    torch.save(state, tmp / "train_state.pt")


def finalize(tmp: Path, keep_last: int) -> Path:
    """Mark complete, rename into place, then prune old checkpoints (only after the new one exists)."""
    (tmp / MARKER).write_text("ok\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():  # re-saving the same step (e.g. stop request right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    for old in checkpoint_dirs(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(path: Path, rank: int) -> tuple[dict, dict, dict | None]:
    """(model weights, train state, this rank's RNG state or None) from a checkpoint directory."""
    if not (path / MARKER).is_file():
        raise UserError(f"train.resume: {path} is not a complete facetrain checkpoint (no {MARKER} marker)")
    read_bundle_meta(path)  # refuses directories that are not facetrain's
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        rng_file = path / f"rng_{rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"train.resume: cannot read checkpoint {path} ({first}); delete it to resume from the "
                        "one before") from None
    return weights, state, rng


def restore_rng(rng: dict | None) -> None:
    if rng is None:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


__all__ = ["CHECKPOINTS", "MARKER", "META_FILE", "checkpoint_dirs", "latest_checkpoint", "tmp_dir_for",
           "write_rng", "write_train_state", "finalize", "load_train_state", "restore_rng"]
