"""Full-state training checkpoints: atomic, self-describing, and loadable without unpickling code.

Layout: <output_dir>/checkpoints/step_00001200/
    model.safetensors, facetrain.json   the model as a bundle (eval/verify accept a checkpoint directly)
    train_state.pt                      optimizer, scheduler, grad scaler, loss parameters, counters
    rng_<rank>.pt                       each rank's torch RNG state (dropout / stochastic depth)
    COMPLETE                            written last; a directory without it is ignored by --resume auto

Everything is written into `step_X.tmp` first and renamed into place (a rename is atomic), so a kill during
a save never leaves a corrupt latest checkpoint. `.pt` files hold only tensors and plain containers and are
read with `torch.load(weights_only=True)`. A failed save (full disk) keeps the previous checkpoints.

Test hook: FACETRAIN_TEST_SLOW_SAVE=<seconds> sleeps in `finalize` after every file but COMPLETE is written
and before the rename, so a test can kill -9 the process inside a save deterministically.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from facetrain.errors import UserError
from facetrain.model import META_FILE, WEIGHTS_FILE, read_bundle_meta

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})(\.old)?$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first, one per step. `step_X.old` (a complete checkpoint that `finalize` set
    aside to re-save step X) counts only while `step_X` itself is missing: a kill between those renames."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in sorted(root.iterdir(), key=lambda q: q.name.endswith(".old")):  # step_X before step_X.old
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file() and (p / WEIGHTS_FILE).is_file():
            by_step.setdefault(int(m.group(1)), p)
    return [by_step[k] for k in sorted(by_step)]


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


def nonfinite_tensors(*state_dicts: dict) -> list[str]:
    """Names of floating-point tensors holding NaN or inf (checked before a checkpoint is written)."""
    return [k for sd in state_dicts for k, v in sd.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_error_reason(err: BaseException, directory: Path) -> str:
    """Why writing into `directory` failed, in words. On a full disk safetensors raises SafetensorError and
    torch.save a RuntimeError ("unexpected pos ..."), not OSError(ENOSPC), so the free space is checked too."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    except OSError:
        free = None
    if "No space left" in str(err) or (free is not None and free < 1 << 20):  # < 1 MiB left: the disk is full
        return f"No space left on device ({free} bytes free)"
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first}"


# Settings that decide the shapes and kinds of the saved state: a checkpoint resumes only under the same ones.
STATE_KEYS = (("model", "backbone"), ("model", "embedding_dim"), ("loss", "name"), ("optim", "name"))


def check_compatible(path: Path, cfg: dict) -> None:
    """Refuse to resume `path` under a config whose STATE_KEYS differ from the run that wrote it."""
    saved = read_bundle_meta(path).get("config") or {}
    diffs = [f"{a}.{b}: {saved[a][b]!r} -> {cfg[a][b]!r}" for a, b in STATE_KEYS
             if b in saved.get(a, {}) and saved[a][b] != cfg[a][b]]
    if diffs:
        raise UserError(f"train.resume: {path} was written with other settings ({'; '.join(diffs)}); resume with "
                        "the run's own config (its config.yaml) or choose a new train.output_dir")


def finalize(tmp: Path, keep_last: int) -> Path:
    """Mark complete, rename into place, then prune old checkpoints (only after the new one exists)."""
    if os.environ.get("FACETRAIN_TEST_SLOW_SAVE"):  # test hook: see the module docstring
        time.sleep(float(os.environ["FACETRAIN_TEST_SLOW_SAVE"]))
    (tmp / MARKER).write_text("ok\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():  # re-saving the same step (e.g. stop request right after a periodic save): the old copy
        os.rename(final, old)  # stays a valid checkpoint (checkpoint_dirs) until the new one is in place
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
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
           "write_rng", "write_train_state", "nonfinite_tensors", "write_error_reason", "check_compatible",
           "finalize", "load_train_state", "restore_rng"]
