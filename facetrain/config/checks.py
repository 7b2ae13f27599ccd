"""Checks of a whole config that need no data and no heavy imports: names, ranges, cross-field settings.

`validate` runs when the config loads (`config/load.py`), before torch is imported: an unknown name, a value
outside its range or an impossible combination is one line naming the key, the value and what to do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

from facetrain.config.constants import DEFAULT_TARGET_FARS, IMAGE_EXTENSIONS
from facetrain.config.exclusions import read_exclusions
from facetrain.config.names import (
    ALL_TRACKERS,
    DISTILL_TARGET_NAMES,
    LOSS_NAMES,
    MARGIN_HEADS,
    MINER_NAMES,
    MIX_NAMES,
    OPTIMIZER_NAMES,
    PRESETS,
    PROJECTION_NAMES,
    SCHEDULER_NAMES,
    STANDARD_MARGINS,
    TRACKERS,
    check_name,
)
from facetrain.config.ranges import Range, check_ranges
from facetrain.config.schema import (
    Config,
    DataConfig,
    DistillConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from facetrain.errors import UserError

CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {  # key: (what a value is called in the error, valid values)
    "data.source": ("value", ("synthetic", "folder", "hf", "packed")),
    "data.bad_images": ("value", ("error", "skip")),
    "loss.name": ("loss", LOSS_NAMES),
    "loss.miner": ("miner", MINER_NAMES),
    "loss.distance": ("value", ("cosine", "euclidean")),
    "optim.name": ("optimizer", OPTIMIZER_NAMES),
    "optim.scheduler": ("scheduler", SCHEDULER_NAMES),
    "optim.scheduler_interval": ("value", ("step", "epoch")),
    "train.mixed_precision": ("value", ("auto", "no", "fp16", "bf16")),
    "distill.projection": ("projection", PROJECTION_NAMES),
    "distill.mix": ("mixer", MIX_NAMES),
    "distill.targets": ("value", DISTILL_TARGET_NAMES),
}
"""Every key whose value is one of a few names; optim.preset and train.val_metric have their own checks."""

# Validation computes `metrics.verification_metrics` at DEFAULT_TARGET_FARS; tests/test_config.py checks that
# every name below is a key validation really reports.
VAL_METRICS: tuple[str, ...] = ("auc", "eer", "best_accuracy", *(f"tar@far={f:.0e}" for f in DEFAULT_TARGET_FARS))


def normalise_val_metric(name: str) -> str:
    """The canonical key for a spelling of a validation metric (`AUC`, `tar@far=1e-2`, `tar@far=0.01`,
    `tar@far=1%` -> `auc`, `tar@far=1e-02`), or a one-line UserError listing the valid names."""
    text = name.strip().lower().replace(" ", "")
    if text in VAL_METRICS:
        return text
    valid = f"choose one of: {', '.join(VAL_METRICS)} (a FAR may also be written 0.01 or 1e-2)"
    if text.startswith("tar@far="):
        number = text[len("tar@far="):]
        try:
            far = float(number[:-1]) / 100 if number.endswith("%") else float(number)
        except ValueError:
            far = math.nan
        for f in DEFAULT_TARGET_FARS:
            if math.isclose(far, f, rel_tol=1e-9):
                return f"tar@far={f:.0e}"
        if math.isfinite(far):
            raise UserError(f"train.val_metric: validation does not report TAR at FAR {far:g}; {valid}")
    raise UserError(f"train.val_metric: unknown metric {name!r}; {valid}")


def val_metric_far(name: str) -> float | None:
    """The FAR of a canonical `tar@far=...` metric name (None for auc, eer, best_accuracy)."""
    return float(name[len("tar@far="):]) if name.startswith("tar@far=") else None


def apply_preset(o: OptimConfig) -> None:
    """optim.preset (if any) sets optim.name and optim.scheduler, beating what the file or command line gave."""
    if o.preset:
        check_name("optim.preset", o.preset, PRESETS, "preset")
        o.name, o.scheduler = PRESETS[o.preset]


def check_choices(cfg: Config) -> None:
    for key, (what, names) in CHOICES.items():
        section, name = key.split(".")
        check_name(key, getattr(getattr(cfg, section), name), names, what)


def validate(cfg: Config) -> None:
    """Reject unknown names and impossible settings with one line naming the key (and resolve optim.preset,
    model.pretrained with a weights file, the spelling of train.val_metric)."""
    apply_preset(cfg.optim)
    check_choices(cfg)
    check_ranges(cfg)
    _check_batch(cfg.train)
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_loss(cfg.loss)
    _check_optim(cfg.optim)
    _check_distill(cfg.distill)
    _check_extra_views(cfg.distill, cfg.data)
    t = cfg.train
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        raise UserError(f"train.resume: {t.resume!r} is neither 'auto' nor a checkpoint directory")
    t.val_metric = normalise_val_metric(t.val_metric)
    for name in t.log_with:
        check_name("train.log_with", name, (*TRACKERS, ALL_TRACKERS), "tracker")


def _check_batch(t: TrainConfig) -> None:
    if t.batch_size % t.m:
        raise UserError(f"train.batch_size ({t.batch_size}) must be a multiple of train.m ({t.m}): "
                        f"try {max(t.m, t.batch_size // t.m * t.m)}")
    if t.batch_size // t.m < 2:
        raise UserError(f"train.batch_size ({t.batch_size}) / train.m ({t.m}) must be >= 2 identities per batch "
                        "(a batch needs negatives)")
    if t.max_steps == 0 and t.epochs == 0:
        raise UserError("train.max_steps or train.epochs: set one of them > 0")


def _check_data(d: DataConfig) -> None:
    if d.val_fraction == 0 and d.val_identities == 0:
        raise UserError(f"data.val_fraction: must be in (0, 1) when data.val_identities is 0, got {d.val_fraction}")
    if d.source == "folder" and not d.root:
        raise UserError("data.root: required when data.source is 'folder' (a folder of <identity>/<image>)")
    if d.source == "packed" and not d.root:
        raise UserError("data.root: required when data.source is 'packed' (a pack file from python -m facetrain.pack)")
    if d.source == "hf" and not (d.root or d.hf_name):
        raise UserError("data.hf_name or data.root: source 'hf' needs a dataset name or a local imagefolder")
    if d.exclude and d.source != "folder":
        raise UserError(f"data.exclude: leaves files of an image folder out, but data.source is {d.source!r}: use "
                        "data.source folder, or drop data.exclude")
    if d.exclude:
        read_exclusions(d.exclude, d.root)  # a missing or malformed file is one line now, not after the scan
    for key, stats in (("data.mean", d.mean), ("data.std", d.std)):
        if stats is not None and len(stats) != 3:
            raise UserError(f"{key}: give 3 values (R, G, B), got {stats}")
    a = d.augment
    if a.crop_scale_min > a.crop_scale_max:
        raise UserError(f"data.augment.crop_scale_min ({a.crop_scale_min}) must be <= data.augment.crop_scale_max "
                        f"({a.crop_scale_max})")


def _check_model(m: ModelConfig) -> None:
    if m.pretrained_file and not m.init_from and not Path(m.pretrained_file).is_file():  # init_from replaces it
        raise UserError(f"model.pretrained_file: file not found: {m.pretrained_file}")
    if m.pretrained_file and not m.pretrained:
        m.pretrained = True  # giving a weights file is an unambiguous request for them
    if m.init_from and not Path(m.init_from).exists():
        raise UserError(f"model.init_from: not found: {m.init_from} (give a facetrain bundle, checkpoint or run "
                        "directory, e.g. runs/distill/bundle)")


def _check_optim(o: OptimConfig) -> None:
    if len(o.betas) != 2:
        raise UserError(f"optim.betas: give two values in [0, 1), got {o.betas}")
    if o.eta_min > o.lr:
        raise UserError(f"optim.eta_min ({o.eta_min:g}) must be <= optim.lr ({o.lr:g}): it is the floor the "
                        "schedule decays to, not a peak")
    if 0 < o.t_max <= o.warmup_steps:
        raise UserError(f"optim.t_max ({o.t_max}) must be longer than optim.warmup_steps ({o.warmup_steps}): "
                        "the cosine includes the warm-up (or set t_max 0 = the whole run)")


def _check_distill(d: DistillConfig) -> None:
    """Distillation settings without a teacher would be ignored; a teacher with every weight 0 trains nothing."""
    default = DistillConfig()
    if not d.teacher:
        changed = [f"distill.{k}" for k, v in vars(d).items() if k != "teacher" and v != getattr(default, k)]
        if changed:
            raise UserError(f"{changed[0]}: set only with distill.teacher (a face model file to learn from); set "
                            f"distill.teacher or remove {changed[0]}")
        return
    if not Path(d.teacher).exists():  # a file (ONNX), or a folder (a facetrain bundle: train.py checks it)
        raise UserError(f"distill.teacher: not found: {d.teacher}; give the path of an ONNX face model or a "
                        "facetrain bundle")
    if Path(d.teacher).is_dir() and d.teacher_input:
        raise UserError(f"distill.teacher_input: {d.teacher} is a facetrain bundle, which states its own input; "
                        "remove distill.teacher_input")
    if d.metric_weight == d.cosine_weight == d.relational_weight == 0:
        raise UserError("distill.metric_weight, distill.cosine_weight, distill.relational_weight: all 0 leaves "
                        "nothing to train; set at least one > 0")
    if d.targets == "cached" and d.cosine_weight == d.relational_weight == 0:
        raise UserError("distill.targets cached: distill.cosine_weight and distill.relational_weight are 0, so no "
                        "target is ever used; set one > 0 or leave distill.targets online")
    if d.cache_dir and d.targets != "cached":  # the online teacher keeps nothing on disk
        raise UserError(f"distill.cache_dir: used only with distill.targets cached (it is {d.targets!r}); set "
                        "distill.targets cached or remove distill.cache_dir")


def image_files(root: str | Path) -> Iterator[str]:
    """Every image file (by extension) under `root`, at any depth, dot folders and dot files skipped, folders in
    sorted order: the one walk behind distill.unlabelled's check here and its pool (data/unlabelled.py)."""
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (os.path.join(here, f) for f in files
                    if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)


def _check_extra_views(d: DistillConfig, data: DataConfig) -> None:
    """Mixed and unlabelled images (training/extra_views.py) feed only the distillation terms: each setting needs
    its partner, a term to feed, and an unlabelled folder that exists and holds images."""
    if not d.teacher:
        return  # _check_distill: these keys need a teacher
    if (d.mix == "none") != (d.mix_images == 0):
        raise UserError(f"distill.mix ({d.mix!r}) and distill.mix_images ({d.mix_images}): set both (mixup or "
                        "cutmix, and > 0 mixed images per process per step) or neither")
    if d.mix == "none" and d.mix_alpha != DistillConfig().mix_alpha:
        raise UserError("distill.mix_alpha: used only with distill.mix mixup or cutmix; set distill.mix or remove "
                        "distill.mix_alpha")
    pool = bool(d.unlabelled) or d.unlabelled_unsampled
    if pool != (d.unlabelled_images > 0):
        raise UserError(f"distill.unlabelled_images ({d.unlabelled_images}): set it > 0 together with "
                        "distill.unlabelled (a folder) or distill.unlabelled_unsampled true, or neither")
    if (d.mix_images or d.unlabelled_images) and d.cosine_weight == d.relational_weight == 0:
        raise UserError("distill.mix_images / distill.unlabelled_images: extra images feed only the distillation "
                        "terms, but distill.cosine_weight and distill.relational_weight are 0; set one > 0")
    if d.unlabelled:
        _check_unlabelled_folder(d.unlabelled, data)


def _check_unlabelled_folder(folder: str, data: DataConfig) -> None:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"distill.unlabelled: folder not found: {folder}; give a folder of aligned face images")
    if next(image_files(root), None) is None:  # stops at the first image found
        raise UserError(f"distill.unlabelled: no image files under {folder} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} at any depth)")
    if data.source == "packed" and data.augment.on_device:
        raise UserError("distill.unlabelled: a folder of unlabelled faces is augmented by the PIL path only, not "
                        "on the device: set data.augment.on_device false (or use distill.unlabelled_unsampled)")


_USES_DISTANCE = ("triplet", "contrastive")
"""Losses built with loss.distance (facetrain/training/losses.py); the triplet_* miners use it too."""
_ANGULAR = ("arcface", "subcenter_arcface")
"""Losses whose margin is an angle in degrees (pytorch-metric-learning's unit)."""


def _check_margin(name: str, margin: float) -> None:
    if name == "triplet" and margin > 2:
        raise UserError(f"loss.margin: must be in [0, 2] for triplet (unit vectors: similarities and distances "
                        f"differ by at most 2), got {margin}")
    if name in _ANGULAR and not 1 <= margin < 90:
        # below 1 degree is almost surely radians (0.5 rad = 28.6 degrees), which would silently train no margin
        raise UserError(f"loss.margin: must be in [1, 90) degrees for {name}, got {margin} (radians? "
                        f"{margin} rad = {math.degrees(margin):.1f} degrees; null = the standard 28.6)")
    if name == "cosface" and margin >= 1:
        raise UserError(f"loss.margin: must be in [0, 1) for cosface (subtracted from a cosine), got {margin}")
    if name not in STANDARD_MARGINS:
        raise UserError(f"loss.margin: loss {name!r} has no margin (its margins are loss.pos_margin / "
                        "loss.neg_margin / loss.ms_base); remove loss.margin")


def _check_loss(lo: LossConfig) -> None:
    """Settings that the chosen loss would ignore or cannot use (its name is known: `check_choices`)."""
    if lo.name in MARGIN_HEADS and lo.miner != "none":
        raise UserError(f"loss.miner: {lo.name} is a classification loss (each image against every identity's "
                        "weights) and takes no miner; set loss.miner: none")
    default_distance = LossConfig().distance
    if lo.distance != default_distance and lo.name not in _USES_DISTANCE and not lo.miner.startswith("triplet_"):
        raise UserError(f"loss.distance: loss {lo.name!r} ignores it (only the {' and '.join(_USES_DISTANCE)} losses "
                        f"and the triplet_* miners use a distance); remove loss.distance {lo.distance!r} or choose "
                        "one of those")
    if lo.margin is not None:
        _check_margin(lo.name, lo.margin)
    if lo.sub_centers != LossConfig().sub_centers and lo.name != "subcenter_arcface":
        raise UserError(f"loss.sub_centers: loss {lo.name!r} ignores it (only subcenter_arcface has sub-centers); "
                        "remove loss.sub_centers or set loss.name: subcenter_arcface")
    if lo.name == "contrastive":
        span = Range(-1.0, 1.0, note="cosine similarity") if lo.distance == "cosine" else Range(
            0.0, 2.0, note="L2 distance of unit vectors")
        for key, value in (("loss.pos_margin", lo.pos_margin), ("loss.neg_margin", lo.neg_margin)):
            if value not in span:
                raise UserError(f"{key}: must be {span} with loss.distance {lo.distance!r}, got {value}")
