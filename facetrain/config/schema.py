"""Typed experiment configuration: dataclass defaults < YAML file < command-line overrides.

    accelerate launch -m facetrain.train --config configs/article.yaml --train.max_steps 500 --optim.lr 3e-4

Every key lives in one dataclass field with a docstring. A YAML file sets any subset of the keys (nested by
section); `--section.key value` on the command line beats the file. Unknown keys, wrong types, values outside
their range (`RANGES`) and impossible combinations are rejected here with one line naming the key, before any
data is read or model built. `python -m facetrain.train --help` lists every key (`describe_keys`). The
resolved config is written to the run directory and stored in every checkpoint and bundle.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from facetrain.errors import UserError


@dataclass
class AugmentConfig:
    """Training-time augmentation (the article's set). Validation/eval never augment."""

    enabled: bool = True
    """Master switch; false gives deterministic training inputs (resize + normalise only)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotation: float = 15.0
    """Maximum random rotation, degrees (uniform in [-rotation, rotation])."""
    crop_scale_min: float = 0.8
    """RandomResizedCrop: smallest crop area as a fraction of the image."""
    crop_scale_max: float = 1.0
    """RandomResizedCrop: largest crop area as a fraction of the image."""
    brightness: float = 0.2
    """ColorJitter brightness strength (0 = off)."""
    contrast: float = 0.2
    """ColorJitter contrast strength (0 = off)."""
    saturation: float = 0.2
    """ColorJitter saturation strength (0 = off)."""
    hue: float = 0.1
    """ColorJitter hue strength, in [0, 0.5] (0 = off)."""
    grayscale: float = 0.0
    """Probability of converting a training image to 3-channel gray (helps when test data is gray)."""
    native_resolution: bool = True
    """Augment an image smaller than data.image_size at its own size and enlarge it once, in the final crop
    (same augmentations, ~35% less CPU per image for 92x112 faces at 224 px); false enlarges it first."""
    on_device: bool = True
    """source=packed: augment whole uint8 batches on the training device (one affine warp + one colour matrix
    per image, facetrain/data/device_augment.py) instead of per image with PIL in DataLoader workers; other sources
    always use PIL."""


@dataclass
class DataConfig:
    """Where images come from, how identities are split, and how images are preprocessed."""

    source: str = "synthetic"
    """`synthetic` (built-in generated identities, no download), `folder` (root/<identity>/<image>), `hf`
    (Hugging Face datasets: a dataset name, or a local imagefolder via `root`) or `packed` (a pack file made by
    `python -m facetrain.pack`, given as `root`)."""
    root: str = ""
    """Image folder (source=folder), local imagefolder directory (source=hf without hf_name) or pack file
    (source=packed)."""
    hf_name: str = ""
    """Hugging Face dataset name for source=hf (e.g. `user/faces`); empty means `imagefolder` at `root`."""
    hf_split: str = "train"
    """Split of the Hugging Face dataset to read."""
    image_column: str = "image"
    """Column holding the image (source=hf)."""
    label_column: str = "label"
    """Column holding the identity (int or str) (source=hf)."""
    synthetic_identities: int = 100
    """Number of generated identities (source=synthetic)."""
    synthetic_images_per_identity: int = 12
    """Images generated per identity (source=synthetic)."""
    synthetic_seed: int = 0
    """Seed of the synthetic generator: same seed, same people and images."""
    val_fraction: float = 0.2
    """Fraction of identities held out for validation (whole identities, never single images)."""
    val_identities: int = 0
    """If > 0, hold out exactly this many identities instead of val_fraction."""
    split_seed: int = 0
    """Seed of the identity split (independent of the training seed, so runs compare on the same split)."""
    image_size: int = 64
    """Model input side, pixels (square)."""
    mean: list[float] | None = None
    """Normalisation mean per RGB channel; null = the backbone's own pretrained config."""
    std: list[float] | None = None
    """Normalisation std per RGB channel; null = the backbone's own pretrained config."""
    bad_images: str = "error"
    """Pre-flight policy for undecodable/oversized images: `error` (stop and list them) or `skip`."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels than this are refused as decompression bombs (PIL's own default)."""
    preflight: bool = True
    """Check every image header before training (fast, parallel); false skips the scan."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""


@dataclass
class ModelConfig:
    """Backbone + embedding head."""

    backbone: str = "tf_efficientnetv2_b0"
    """Any timm model name; its classifier is removed (num_classes=0)."""
    embedding_dim: int = 512
    """Output embedding size; outputs are L2-normalised so a dot product is the cosine score."""
    pretrained: bool = False
    """Start from pretrained weights: timm's hub weights, or `pretrained_file` when given."""
    pretrained_file: str = ""
    """Local weights file (.safetensors/.pth/.bin) for the backbone; works offline."""
    channels_last: bool = True
    """NHWC memory layout: faster convolutions on GPUs and on CPUs with oneDNN."""
    drop_rate: float = 0.0
    """Dropout before the embedding head."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate inside the backbone (where the backbone supports it)."""
    sync_bn: bool = False
    """With several processes: BatchNorm normalises with the statistics of the global batch, not each rank's
    slice (any backend: gloo on CPUs, NCCL on GPUs; two small all-reduces per layer per step), so a step equals
    one process's on the same batch."""
    compile: bool = False
    """Wrap the model in torch.compile (first steps are slow while it compiles)."""
    freeze_bn: bool = False
    """Keep every BatchNorm layer of the backbone at its pretrained running statistics while training (their
    scale/shift still learn): batches of a small, uniform training set would otherwise pull the statistics
    away from what other people's photos need."""
    fold_batchnorm: bool = True
    """At inference (validation, eval, verify, identify): embed with a copy whose BatchNorm layers are folded
    into the convolutions before them: same embeddings (fp32: to ~1e-6), a ~30% faster forward pass on a CPU
    (from 128 images on). Training and the saved weights are unaffected; an architecture where folding would
    change the outputs is left as it is."""
    freeze_stages: int = 0
    """Freeze the first N parameter groups of the backbone (timm's coarse grouping: 1 = the stem, 2 = stem +
    first stage, ...): weights get no gradient and BatchNorm statistics stop updating. -1 freezes the whole
    backbone (only the embedding head trains). Protects generic low-level pretrained features on small data."""


@dataclass
class LossConfig:
    """Metric-learning loss and miner (pytorch-metric-learning), chosen by name."""

    name: str = "triplet"
    """Pair/triplet losses on the batch: `triplet`, `contrastive`, `bce_pair` (the article's binary cross-entropy
    on pairs), `multi_similarity`. Margin-softmax heads with one weight vector per training identity: `arcface`,
    `cosface`, `subcenter_arcface` (ArcFace with `sub_centers` vectors per identity: tolerates label noise)."""
    margin: float | None = None
    """Margin in the loss's own unit; null = its standard value. triplet: cosine-similarity units (0.1);
    arcface / subcenter_arcface: degrees added to the angle (28.6 = 0.5 rad); cosface: subtracted from the
    cosine (0.35)."""
    distance: str = "cosine"
    """`cosine` (similarity) or `euclidean` (L2 distance) for triplet/contrastive."""
    pos_margin: float = 1.0
    """Contrastive: positives are pulled until similarity >= pos_margin (cosine) / distance <= it (L2)."""
    neg_margin: float = 0.0
    """Contrastive: negatives are pushed until similarity <= neg_margin (cosine) / distance >= it (L2)."""
    ms_alpha: float = 2.0
    """Multi-similarity loss alpha (positive weight)."""
    ms_beta: float = 50.0
    """Multi-similarity loss beta (negative weight)."""
    ms_base: float = 0.5
    """Multi-similarity loss base similarity."""
    scale: float = 30.0
    """Logit scale of the margin heads (arcface, cosface, subcenter_arcface) and of bce_pair."""
    sub_centers: int = 3
    """subcenter_arcface: weight vectors per identity (an image is scored against its closest one)."""
    miner: str = "none"
    """`none`, `triplet_all`, `triplet_hard`, `triplet_semihard`, `multi_similarity`."""
    miner_margin: float = 0.2
    """Margin used by the triplet-margin miner."""
    miner_epsilon: float = 0.1
    """Epsilon of the multi-similarity miner."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule, chosen by name."""

    preset: str = ""
    """Optional named pair that sets `name` and `scheduler` together: adam_cosine, adamw_plateau, sgd_step,
    ranger_exponential, schedulefree_adamw, adamw_cosine_warmup."""
    name: str = "adamw"
    """`adam`, `adamw`, `sgd`, `ranger`, `schedulefree_adamw`."""
    lr: float = 1e-3
    """Peak learning rate for the embedding head (and backbone, times backbone_lr_mult)."""
    backbone_lr_mult: float = 1.0
    """Backbone learning rate = lr x this; < 1 protects pretrained features."""
    weight_decay: float = 1e-5
    """Decoupled (AdamW) or L2 (Adam/SGD) weight decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    momentum: float = 0.9
    """SGD momentum."""
    fused: bool = True
    """adam, adamw, sgd: torch's fused update (one kernel over all parameters, CPU and GPU) instead of its
    default multi-tensor one; same update rule. tf_efficientnetv2_b0's AdamW step on a 2-core CPU: 4 ms vs 17 ms."""
    scheduler: str = "cosine_warmup"
    """`cosine`, `cosine_warmup`, `plateau`, `step`, `exponential`, `constant`."""
    scheduler_interval: str = "step"
    """Advance the schedule every optimizer `step` or every `epoch` (the article steps per epoch)."""
    warmup_steps: int = 0
    """Linear warm-up length in scheduler intervals (cosine_warmup)."""
    t_max: int = 0
    """Length of the cosine (warm-up included) in scheduler intervals, after which the lr stays at eta_min;
    0 = the whole run."""
    eta_min: float = 1e-6
    """Cosine floor learning rate."""
    step_size: int = 0
    """step: drop the lr by gamma every N scheduler intervals; 0 = a third of the run (lr, lr/10, lr/100)."""
    gamma: float = 0.0
    """step: factor per drop (0 = 0.1); exponential: factor per interval (0 = chosen so the run ends at lr/100)."""
    plateau_patience: int = 2
    """ReduceLROnPlateau: validations without improvement before the lr is cut."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau: lr multiplier on a plateau."""


@dataclass
class TrainConfig:
    """Loop, batching, precision, logging and checkpointing."""

    output_dir: str = "runs/default"
    """Run directory: config.yaml, TensorBoard logs, checkpoints/, bundle/."""
    batch_size: int = 32
    """Images per process per micro-step; global batch = batch_size x processes (x grad_accum_steps)."""
    m: int = 4
    """Images per identity in a batch (P identities x m images); batch_size must be a multiple of m."""
    max_steps: int = 0
    """Optimizer steps to train; 0 = `epochs` epochs."""
    epochs: int = 8
    """Epochs when max_steps is 0. One epoch ~ every training image once, every identity at least once."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step (mining happens within each micro-step's global batch)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (timm ModelEmaV3, with its warm-up: the average
    follows the weights closely in the first steps) with this decay per optimizer step, e.g. 0.998; validation
    and the exported best bundle use the averaged weights, checkpoints keep both. 0 = off."""
    mixed_precision: str = "auto"
    """`auto` (the launcher's setting if any, else bf16 where the hardware supports it), `no`, `fp16`,
    `bf16`."""
    seed: int = 0
    """Seed for weights, sampler order and augmentation."""
    log_every: int = 10
    """Log loss/lr/img/s every N optimizer steps: the hot loop's host syncs (also where skipped non-finite steps
    are reported and, with several processes, stop requests agreed on)."""
    val_every: int = 0
    """Validate every N optimizer steps; 0 = at the end of each epoch."""
    val_metric: str = "auc"
    """Metric that picks the best checkpoint: `auc`, `eer` (lower is better) or a key like `tar@far=1e-02`."""
    val_batch_size: int = 128
    """Images per process per forward pass during validation."""
    ckpt_every: int = 200
    """Write a full training checkpoint every N optimizer steps (and at the end / on a stop request)."""
    keep_last: int = 2
    """Full checkpoints kept (oldest deleted first); the best model is kept separately as a bundle."""
    resume: str = ""
    """`` (fresh; refuses to overwrite a run with checkpoints), `auto` (latest complete checkpoint in
    output_dir, else fresh) or a checkpoint directory."""
    num_workers: int = -1
    """DataLoader worker processes per rank; -1 = from the CPU count and process count."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker prepares ahead of the step (only with num_workers > 0)."""
    progress: bool = True
    """Rich progress bar on the main process."""
    tensorboard: bool = True
    """Log to TensorBoard under output_dir/tb."""
    max_bad_steps: int = 5
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped; with
    a fused optimizer the count is read at the next log step, validation or checkpoint: facetrain/training/guard.py)."""


@dataclass
class DebugConfig:
    """Knobs for tests, audits and benchmarks, kept apart from the training settings; none is needed to train."""

    stop_at_step: int = -1
    """Act as if a stop request arrived after this optimizer step: checkpoint and exit, resumable (-1 = off)."""
    record_samples: bool = False
    """Audit: append each rank's dataset positions per micro-step to output_dir/samples/rank<r>.jsonl."""
    inject_nan_at: int = -1
    """Make the loss NaN at this optimizer step (-1 = never): the non-finite-step guard's test."""
    fail_rank: int = -1
    """Make this rank raise at optimizer step fail_step (-1 = never): the other ranks must then stop promptly."""
    fail_step: int = -1
    """The step at which fail_rank raises."""
    slow_save_s: float = 0.0
    """Sleep this many seconds inside every checkpoint save, after its files and before it is marked complete and
    renamed into place, so that a test can kill the process in the middle of a save."""


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML + overrides with strict key and type checks.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise a one-line UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "0.5,0.5,0.5" from the command line
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise UserError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise UserError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `yes` as a boolean
            return "yes" if value else "no"
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _apply(obj: Any, updates: dict, prefix: str, source: str) -> None:
    """Set fields of dataclass `obj` from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = ", ".join(sorted(names))
            raise UserError(f"{source}: unknown key '{full}' (valid keys here: {close})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{full}' is a section; give it a mapping of keys, got {value!r}")
            _apply(current, value, f"{full}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {full}"))


def _parse_overrides(args: list[str]) -> dict:
    """`--a.b value` / `--a.b=value` pairs -> nested dict (values still strings, parsed by YAML rules)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"command line: expected --section.key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"command line: {arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = raw  # typed by the field's annotation in _coerce ("no" stays a string for a str field)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"command line: --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (give a YAML file, e.g. configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections (data, model, loss, optim, train)")
    return data


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < `--section.key value` overrides, then `validate`."""
    cfg = Config()
    if config_file:
        _apply(cfg, load_yaml(config_file), "", str(config_file))
    if overrides:
        _apply(cfg, _parse_overrides(overrides), "", "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict, source: str = "checkpoint") -> Config:
    cfg = Config()
    _apply(cfg, data, "", source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# Cross-field checks that need no data and no heavy imports.

_CHOICES = {
    "data.source": ("synthetic", "folder", "hf", "packed"),
    "data.bad_images": ("error", "skip"),
    "loss.distance": ("cosine", "euclidean"),
    "optim.scheduler_interval": ("step", "epoch"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
}


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

# The valid range of every numeric key (int, float, list of floats), checked by `validate` before any data is read.
# tests/test_config_ranges.py fails when a numeric field has no entry here, so a new key cannot skip it.
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


def _check_ranges(cfg: Config) -> None:
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        if value is None:  # data.mean / data.std null: the backbone's own statistics
            continue
        if isinstance(value, list):
            if not all(v in allowed for v in value):
                raise UserError(f"{key}: each value must be {allowed}, got {value}")
        elif value not in allowed:
            raise UserError(f"{key}: must be {allowed}, got {value}")


# Validation computes `metrics.verification_metrics` at metrics.DEFAULT_TARGET_FARS (a copy here keeps this module
# free of torch; tests/test_config_ranges.py checks that every name below is a key validation really reports).
VAL_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
VAL_METRICS: tuple[str, ...] = ("auc", "eer", "best_accuracy", *(f"tar@far={f:.0e}" for f in VAL_FARS))


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
        for f in VAL_FARS:
            if math.isclose(far, f, rel_tol=1e-9):
                return f"tar@far={f:.0e}"
        if math.isfinite(far):
            raise UserError(f"train.val_metric: validation does not report TAR at FAR {far:g}; {valid}")
    raise UserError(f"train.val_metric: unknown metric {name!r}; {valid}")


def val_metric_far(name: str) -> float | None:
    """The FAR of a canonical `tar@far=...` metric name (None for auc, eer, best_accuracy)."""
    return float(name[len("tar@far="):]) if name.startswith("tar@far=") else None


def validate(cfg: Config) -> None:
    """Reject impossible settings with one line naming the key. Name registries are checked lazily by their
    modules (losses/optim) so that this stays import-light; `facetrain.train` calls those checks too."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"{key}: unknown value {value!r} (choose one of: {', '.join(allowed)})")
    _check_ranges(cfg)
    d, t, m, o, lo = cfg.data, cfg.train, cfg.model, cfg.optim, cfg.loss
    if t.batch_size % t.m:
        raise UserError(f"train.batch_size ({t.batch_size}) must be a multiple of train.m ({t.m}): "
                        f"try {max(t.m, t.batch_size // t.m * t.m)}")
    if t.batch_size // t.m < 2:
        raise UserError(f"train.batch_size ({t.batch_size}) / train.m ({t.m}) must be >= 2 identities per batch "
                        "(a batch needs negatives)")
    if t.max_steps == 0 and t.epochs == 0:
        raise UserError("train.max_steps or train.epochs: set one of them > 0")
    if d.val_fraction == 0 and d.val_identities == 0:
        raise UserError(f"data.val_fraction: must be in (0, 1) when data.val_identities is 0, got {d.val_fraction}")
    if d.source == "folder" and not d.root:
        raise UserError("data.root: required when data.source is 'folder' (a folder of <identity>/<image>)")
    if d.source == "packed" and not d.root:
        raise UserError("data.root: required when data.source is 'packed' (a pack file from python -m facetrain.pack)")
    if d.source == "hf" and not (d.root or d.hf_name):
        raise UserError("data.hf_name or data.root: source 'hf' needs a dataset name or a local imagefolder")
    for key, stats in (("data.mean", d.mean), ("data.std", d.std)):
        if stats is not None and len(stats) != 3:
            raise UserError(f"{key}: give 3 values (R, G, B), got {stats}")
    a = d.augment
    if a.crop_scale_min > a.crop_scale_max:
        raise UserError(f"data.augment.crop_scale_min ({a.crop_scale_min}) must be <= data.augment.crop_scale_max "
                        f"({a.crop_scale_max})")
    if m.pretrained_file and not Path(m.pretrained_file).is_file():
        raise UserError(f"model.pretrained_file: file not found: {m.pretrained_file}")
    if m.pretrained_file and not m.pretrained:
        m.pretrained = True  # giving a weights file is an unambiguous request for them
    _check_loss(lo)
    if len(o.betas) != 2:
        raise UserError(f"optim.betas: give two values in [0, 1), got {o.betas}")
    if o.eta_min > o.lr:
        raise UserError(f"optim.eta_min ({o.eta_min:g}) must be <= optim.lr ({o.lr:g}): it is the floor the "
                        "schedule decays to, not a peak")
    if 0 < o.t_max <= o.warmup_steps:
        raise UserError(f"optim.t_max ({o.t_max}) must be longer than optim.warmup_steps ({o.warmup_steps}): "
                        "the cosine includes the warm-up (or set t_max 0 = the whole run)")
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        raise UserError(f"train.resume: {t.resume!r} is neither 'auto' nor a checkpoint directory")
    t.val_metric = normalise_val_metric(t.val_metric)


_USES_DISTANCE = ("triplet", "contrastive")
"""Losses built with loss.distance (facetrain/training/losses.py); the triplet_* miners use it too."""
STANDARD_MARGINS = {"triplet": 0.1, "arcface": 28.6, "subcenter_arcface": 28.6, "cosface": 0.35}
"""The losses that take loss.margin, and the value null stands for: triplet in cosine units (the article's),
ArcFace 0.5 rad in degrees (pytorch-metric-learning's unit), CosFace 0.35 (its paper's value)."""
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
    """Settings that the chosen loss would ignore or cannot use (names themselves are checked by losses.py)."""
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


# ----------------------------------------------------------------------------------------------------------
# `--help`: every key, generated from the dataclasses above (their field docstrings are the documentation).


def _field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal right after each field in the class's source."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _summary(doc: str) -> str:
    """The docstring's first line, continued to the end of its sentence when the sentence runs on."""
    first = doc.splitlines()[0] if doc else ""
    text = " ".join(doc.split())
    end = re.compile(r"[.!?](?=\s+[A-Z(`]|\s*$)").search(text, max(0, len(first) - 1))
    return text[: end.end()] if end else text


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else "null" if value is None else str(value)


def describe_keys() -> str:
    """Every key as `--section.key: TYPE = DEFAULT (valid values)` and the summary of its docstring, grouped by
    section in the order of the dataclasses: the `--help` of facetrain.train."""
    lines: list[str] = []

    def section(cls: type, prefix: str) -> None:
        docs = _field_docs(cls)
        lines.extend(["", f"{prefix}: {_summary(inspect.cleandoc(cls.__doc__ or ''))}"])
        nested = []
        for f in dataclasses.fields(cls):
            key, default = f"{prefix}.{f.name}", _default(f)
            if dataclasses.is_dataclass(default):
                nested.append((type(default), key))
                continue
            valid = ""
            if key in RANGES:
                valid = RANGES[key].interval() + (f"; {RANGES[key].note}" if RANGES[key].note else "")
            elif key in _CHOICES or key == "train.val_metric":
                valid = "one of " + " | ".join(_CHOICES.get(key, VAL_METRICS))
            lines.append(f"  --{key}: {f.type} = {_shown(default)}" + (f"  ({valid})" if valid else ""))
            lines.append(f"      {_summary(docs.get(f.name, ''))}")
        for nested_cls, nested_key in nested:
            section(nested_cls, nested_key)

    for f in dataclasses.fields(Config):
        section(type(_default(f)), f.name)
    return "\n".join(lines).lstrip("\n")
