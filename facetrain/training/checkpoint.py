"""Full-state training checkpoints: atomic, self-describing, and loadable without unpickling code.

Layout: <output_dir>/checkpoints/step_00001200/
    model.safetensors, facetrain.json   the model as a bundle (eval/verify accept a checkpoint directly),
    MODEL_CARD.md                       with its model card
    train_state.pt                      the other stateful parts by name (optimizer, scheduler, loss, ema,
                                        scaler) and the loop state as JSON (state_json: LoopState)
    rng_<rank>.pt                       each rank's torch RNG state (dropout / stochastic depth)
    COMPLETE                            written last; a directory without it is ignored by --resume auto

Everything is written into `step_X.tmp` first and renamed into place (a rename is atomic), so a kill during
a save never leaves a corrupt latest checkpoint. `.pt` files hold only tensors and plain containers and are
read with `torch.load(weights_only=True)`. A failed save (full disk) keeps the previous checkpoints.

`finalize(..., slow_save_s)` (config debug.slow_save_s) sleeps after every file but COMPLETE is written and
before the rename, so a test can kill -9 the process inside a save deterministically.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from facetrain.errors import UserError
from facetrain.model.bundle import write_bundle
from facetrain.model.files import META_FILE, WEIGHTS_FILE, read_bundle_meta
from facetrain.runtime.atomic_dir import replace_dir
from facetrain.runtime.distributed import any_rank
from facetrain.training.loop_state import LoopState
from facetrain.training.stateful import Stateful

if TYPE_CHECKING:  # annotations only
    from facetrain.config.schema import ModelConfig
    from facetrain.data.images import Preprocess

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


# Settings that decide which identities train and which validate: resuming under other ones would put
# identities the model trained on into validation (or change the training set mid-run).
SPLIT_KEYS = (("data", "source"), ("data", "root"), ("data", "hf_name"), ("data", "hf_split"),
              ("data", "label_column"), ("data", "split_seed"), ("data", "val_fraction"),
              ("data", "val_identities"), ("data", "synthetic_identities"),
              ("data", "synthetic_images_per_identity"), ("data", "synthetic_seed"))


def check_compatible(path: Path, cfg: dict) -> None:
    """Refuse to resume `path` under a config whose STATE_KEYS or SPLIT_KEYS differ from the run that wrote it."""
    saved = read_bundle_meta(path).get("config") or {}
    diffs = [f"{a}.{b}: {saved[a][b]!r} -> {cfg[a][b]!r}" for a, b in STATE_KEYS
             if b in saved.get(a, {}) and saved[a][b] != cfg[a][b]]
    if diffs:
        raise UserError(f"train.resume: {path} was written with other settings ({'; '.join(diffs)}); resume with "
                        "the run's own config (its config.yaml) or choose a new train.output_dir")
    split = [f"{a}.{b} {saved[a][b]!r} -> {cfg[a][b]!r}" for a, b in SPLIT_KEYS
             if b in saved.get(a, {}) and saved[a][b] != cfg[a][b]]
    if split:
        raise UserError(f"train.resume: {path} was trained on another identity split ({'; '.join(split)}): "
                        "resuming would put trained identities into validation; resume with the run's own data "
                        "settings (its config.yaml) or choose a new train.output_dir")


def finalize(tmp: Path, keep_last: int, slow_save_s: float = 0.0) -> Path:
    """Mark complete, rename into place, then prune old checkpoints (only after the new one exists)."""
    if slow_save_s > 0:  # debug.slow_save_s: see the module docstring
        time.sleep(slow_save_s)
    (tmp / MARKER).write_text("ok\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    # re-saving the same step (e.g. a stop request right after a periodic save): the old copy stays a valid
    # checkpoint (`checkpoint_dirs` counts step_X.old while step_X is missing) until the new one is in place
    replace_dir(tmp, final)
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


MODEL = "model"
"""The part saved as the bundle's model.safetensors (eval and verify read a checkpoint as a bundle)."""
STATE_JSON = "state_json"
"""train_state.pt's entry for the loop state (LoopState as JSON); every other part is saved under its own name."""


@dataclass(frozen=True)
class BundleInfo:
    """What every checkpoint's and bundle's facetrain.json describes besides the weights."""

    model_cfg: ModelConfig
    pre: Preprocess
    run_meta: dict
    """The resolved config, the alignment recipe, the data summary of the model card: written into
    facetrain.json as they are."""


__all__ = ["CHECKPOINTS", "MARKER", "MODEL", "STATE_JSON", "SPLIT_KEYS", "STATE_KEYS", "META_FILE", "BundleInfo",
           "checkpoint_dirs", "latest_checkpoint", "tmp_dir_for", "write_rng", "write_train_state",
           "nonfinite_tensors", "write_error_reason", "check_compatible", "finalize", "load_train_state",
           "restore_rng", "Checkpointer"]


class Checkpointer:
    """What a run writes and reads back, in one place: full checkpoints (save on every rank together, restore,
    keep the last `keep_last`) and the best-model bundle, each written into a `.tmp` directory and swapped into
    place atomically (`atomic_dir`). Built once with the run's stateful parts.

    `parts`: name -> anything with state_dict/load_state_dict (training/stateful.py), None for a part this run
    has not (saved as None). "model" (the network, not its DDP wrapper) is saved as the bundle's weights and
    restored first; the others go into train_state.pt under their names, in the dict's order. A part may be
    absent from an older checkpoint only if it says so (`optional = True`): it is then given None."""

    def __init__(self, out: Path, parts: dict[str, Stateful | None], *, accelerator, bundle: BundleInfo,
                 keep_last: int, slow_save_s: float = 0.0):
        if parts.get(MODEL) is None or STATE_JSON in parts:
            raise ValueError(f"Checkpointer: parts need a {MODEL!r} and no {STATE_JSON!r}, got {list(parts)}")
        self.out, self.parts, self.accelerator = Path(out), parts, accelerator
        self.bundle, self.keep_last, self.slow_save_s = bundle, keep_last, slow_save_s

    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def model(self) -> torch.nn.Module:
        return self.parts[MODEL]

    def restore(self, path: Path) -> LoopState:
        """Load `path` into the run's parts and this rank's RNG; returns the saved loop state (step, best, ...)."""
        weights, saved, rng = load_train_state(path, self.accelerator.process_index)
        try:  # other differences (e.g. the identity count that sizes ArcFace's weights) surface here
            self.model.load_state_dict(weights)
            for name, part in self.parts.items():
                if name != MODEL and part is not None:
                    part.load_state_dict(saved.get(name) if getattr(part, "optional", False) else saved[name])
            state = LoopState.from_json(saved[STATE_JSON])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[-1].strip()[:200]
            raise UserError(f"train.resume: {path} does not fit this run ({first}); resume with the run's own "
                            "config (its config.yaml) or choose a new train.output_dir") from None
        restore_rng(rng)
        return state

    def save(self, state: LoopState) -> Path:
        """Write a full checkpoint of step `state.step` on every rank together; a failure anywhere keeps the
        previous checkpoints and stops every rank with one line. Returns the checkpoint directory."""
        step, tmp = state.step, tmp_dir_for(self.out, state.step)
        self._refuse_nonfinite(step)
        error = self._on_main(lambda: _fresh_dir(tmp))
        self.accelerator.wait_for_everyone()
        if error is None:
            error = _attempt(lambda: self._write(tmp, state))
        self.accelerator.wait_for_everyone()
        if any_rank(error is not None, self.accelerator):
            reason = write_error_reason(error, tmp) if error is not None else "failed on another rank"
            if self._main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"checkpoint: cannot write {tmp} ({reason}); the previous checkpoint "
                            f"{latest_checkpoint(self.out) or '(none)'} is kept: free disk space and rerun with "
                            "--train.resume auto") from error
        try:
            final = finalize(tmp, self.keep_last, self.slow_save_s) if self._main else tmp
        except OSError as err:
            raise UserError(f"checkpoint: cannot finish {tmp} ({err.strerror or err}); the previous checkpoint "
                            f"{latest_checkpoint(self.out) or '(none)'} is kept: free disk space and rerun with "
                            "--train.resume auto") from err
        self.accelerator.wait_for_everyone()
        return final

    def _refuse_nonfinite(self, step: int) -> None:
        """Never write NaN/inf into a checkpoint (the state is identical on every rank: all stop here together)."""
        nonfinite = nonfinite_tensors(*(part.state_dict() for part in self.parts.values() if part is not None))
        if nonfinite:
            raise UserError(f"checkpoint: step {step}: non-finite values in {nonfinite[0]} ({len(nonfinite)} "
                            f"tensor(s)), not written; the last good checkpoint is "
                            f"{latest_checkpoint(self.out) or '(none)'}: rerun with --train.resume auto and a lower "
                            "optim.lr or train.grad_clip")

    def _on_main(self, action) -> Exception | None:
        return _attempt(action) if self._main else None

    def _write(self, tmp: Path, state: LoopState) -> None:
        """Every rank its RNG; rank 0 the model as a bundle and the other parts with the loop state."""
        write_rng(tmp, self.accelerator.process_index)
        if self._main:
            b = self.bundle
            write_bundle(tmp, self.model, b.model_cfg, b.pre, {"step": state.step, **b.run_meta})
            write_train_state(tmp, self._train_state(state))

    def _train_state(self, state: LoopState) -> dict:
        saved = {name: part.state_dict() if part is not None else None
                 for name, part in self.parts.items() if name != MODEL}
        return {**saved, STATE_JSON: state.to_json()}

    def export_best(self, model, step: int, metrics: dict) -> None:
        """Write `model` (the weights just validated: EMA or schedule-free averages included) as <out>/bundle."""
        if not self._main:
            return
        tmp, b = self.out / "bundle.tmp", self.bundle
        try:
            _fresh_dir(tmp)
            write_bundle(tmp, model, b.model_cfg, b.pre, {"step": step, "val_metrics": metrics, **b.run_meta})
            replace_dir(tmp, self.out / "bundle")
        except Exception as err:  # a full disk raises SafetensorError, not OSError
            raise UserError(f"bundle: cannot write {tmp} ({write_error_reason(err, tmp)}); the previous best "
                            "model is kept: free disk space and rerun with --train.resume auto") from err


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _attempt(action) -> Exception | None:
    """Run `action`; the exception it raised, else None (a rank's failure is agreed on before anyone raises)."""
    try:
        action()
    except Exception as err:  # a full disk raises SafetensorError / RuntimeError here, not OSError
        return err
    return None
