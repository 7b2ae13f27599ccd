"""The valid range of every numeric config key (`RANGES`), checked when the config loads (`check_ranges`).

tests/test_config_ranges.py fails when a numeric field has no entry here, so a new key cannot skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from facetrain.config.schema import Config
from facetrain.errors import UserError


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval; a list-valued key must have each of its values inside."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False
    note: str = ""
    """What a special value means (e.g. `-1 = off`), shown with the range."""

    @classmethod
    def parse(cls, spec: str, note: str = "") -> Range:
        """`[0, 1]`, `(0, inf)`, `[-1, inf)`: brackets include the bound, parentheses exclude it."""
        lo, hi = (float(v) for v in spec[1:-1].split(","))
        return cls(lo, hi, spec[0] == "(", spec[-1] == ")", note)

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.open_lo else x >= self.lo
        below = x < self.hi if self.open_hi else x <= self.hi
        return above and below

    def interval(self) -> str:
        """`>= 0`, `> 0`, `in [0, 1)`, ..."""
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        if self.hi == math.inf:
            return f"{'>' if self.open_lo else '>='} {num(self.lo)}"
        return f"in {'(' if self.open_lo else '['}{num(self.lo)}, {num(self.hi)}{')' if self.open_hi else ']'}"

    def __str__(self) -> str:
        return f"{self.interval()} ({self.note})" if self.note else self.interval()


_SEED = "[0, 2147483647]"  # accelerate's set_seed seeds numpy's legacy 32-bit generator with train.seed + rank

# The valid range of every numeric key (int, float, list of floats), checked by `check_ranges`.
_RANGE_SPECS: dict[str, str | tuple[str, str]] = {  # key: interval, or (interval, what its special values mean)
    "data.augment.hflip": ("[0, 1]", "a probability"),
    "data.augment.rotation": ("[0, 180]", "degrees"),
    "data.augment.crop_scale_min": ("(0, 1]", "a fraction of the image area"),
    "data.augment.crop_scale_max": ("(0, 1]", "a fraction of the image area"),
    "data.augment.brightness": ("[0, inf)", "0 = off"),
    "data.augment.contrast": ("[0, inf)", "0 = off"),
    "data.augment.saturation": ("[0, inf)", "0 = off"),
    "data.augment.hue": ("[0, 0.5]", "0 = off"),
    "data.augment.grayscale": ("[0, 1]", "a probability"),
    "data.synthetic_identities": "[2, inf)",
    "data.synthetic_images_per_identity": "[2, inf)",
    "data.synthetic_seed": _SEED,
    "data.val_fraction": ("[0, 1)", "a fraction of the identities"),
    "data.val_identities": ("[0, inf)", "0 = use data.val_fraction"),
    "data.split_seed": _SEED,
    "data.image_size": ("[16, inf)", "pixels"),
    "data.mean": ("[0, 1]", "pixel values are scaled to [0, 1] first"),
    "data.std": ("(0, 1]", "pixel values are scaled to [0, 1] first"),
    "data.max_image_pixels": "[1, inf)",
    "model.embedding_dim": "[1, inf)",
    "model.drop_rate": ("[0, 1)", "a probability"),
    "model.drop_path_rate": ("[0, 1)", "a probability"),
    "model.freeze_stages": ("[-1, inf)", "-1 = the whole backbone"),
    "loss.margin": "[0, inf)",
    "loss.pos_margin": "[-1, 2]",
    "loss.neg_margin": "[-1, 2]",
    "loss.ms_alpha": "(0, inf)",
    "loss.ms_beta": "(0, inf)",
    "loss.ms_base": ("[-1, 1]", "a cosine similarity"),
    "loss.scale": "(0, inf)",
    "loss.sub_centers": "[1, inf)",
    "loss.miner_margin": ("[0, 2]", "unit vectors: similarities and distances differ by at most 2"),
    "loss.miner_epsilon": ("[0, 2]", "unit vectors: similarities differ by at most 2"),
    "optim.lr": "(0, inf)",
    "optim.backbone_lr_mult": ("[0, inf)", "0 = the backbone does not learn"),
    "optim.weight_decay": "[0, inf)",
    "optim.eps": "(0, inf)",
    "optim.betas": "[0, 1)",
    "optim.momentum": "[0, 1)",
    "optim.warmup_steps": "[0, inf)",
    "optim.t_max": ("[0, inf)", "0 = the whole run"),
    "optim.eta_min": "[0, inf)",
    "optim.step_size": ("[0, inf)", "0 = a third of the run"),
    "optim.gamma": ("[0, 1]", "0 = derived from the run length"),
    "optim.plateau_patience": "[0, inf)",
    "optim.plateau_factor": "(0, 1)",
    "train.batch_size": "[1, inf)",
    "train.m": ("[2, inf)", "a batch needs positive pairs"),
    "train.max_steps": ("[0, inf)", "0 = train.epochs"),
    "train.epochs": "[0, inf)",
    "train.grad_accum_steps": "[1, inf)",
    "train.grad_clip": ("[0, inf)", "0 = off"),
    "train.ema_decay": ("[0, 1)", "0 = off"),
    "train.seed": _SEED,
    "train.log_every": "[1, inf)",
    "train.val_every": ("[0, inf)", "0 = each epoch"),
    "train.val_batch_size": "[1, inf)",
    "train.ckpt_every": "[1, inf)",
    "train.keep_last": "[1, inf)",
    "train.num_workers": ("[-1, inf)", "-1 = from the CPU and process counts"),
    "train.prefetch_factor": "[1, inf)",
    "train.max_bad_steps": "[1, inf)",
    "distill.metric_weight": ("[0, inf)", "0 = off"),
    "distill.cosine_weight": ("[0, inf)", "0 = off"),
    "distill.relational_weight": ("[0, inf)", "0 = off"),
    "distill.agreement_images": ("[0, inf)", "0 = off"),
    "distill.mix_images": ("[0, inf)", "0 = off"),
    "distill.mix_alpha": "(0, inf)",
    "distill.unlabelled_images": ("[0, inf)", "0 = off"),
    "debug.stop_at_step": ("[-1, inf)", "-1 = off"),
    "debug.inject_nan_at": ("[-1, inf)", "-1 = never"),
    "debug.fail_rank": ("[-1, inf)", "-1 = never"),
    "debug.fail_step": ("[-1, inf)", "-1 = never"),
    "debug.slow_save_s": ("[0, inf)", "seconds"),
}
RANGES: dict[str, Range] = {key: Range.parse(*((spec,) if isinstance(spec, str) else spec))
                            for key, spec in _RANGE_SPECS.items()}


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_ranges(cfg: Config) -> None:
    """A one-line UserError for the first numeric key outside its range."""
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        if value is None:  # data.mean / data.std null: the backbone's own statistics
            continue
        if isinstance(value, list):
            if not all(v in allowed for v in value):
                raise UserError(f"{key}: each value must be {allowed}, got {value}")
        elif value not in allowed:
            raise UserError(f"{key}: must be {allowed}, got {value}")
