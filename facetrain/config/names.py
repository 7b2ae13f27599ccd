"""The names a config may choose, defined once and free of torch.

The config rejects an unknown name when it loads (`config/checks.py`), before torch is imported, and `--help`
lists these names. The torch registries that build the pieces are keyed by the same tables (`keyed_by`):
training/losses.py (LOSSES, MINERS), training/optim.py (OPTIMIZERS, SCHEDULERS) and alignment/detectors.py
(DETECTORS); adding a name means adding it here and to its registry, or the registry's module fails at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from facetrain.errors import UserError

LOSS_NAMES: tuple[str, ...] = (
    "triplet", "contrastive", "bce_pair", "multi_similarity",  # pairs / triplets of the batch
    "arcface", "cosface", "subcenter_arcface",  # margin-softmax heads
)
"""loss.name: the losses of training/losses.py."""
MARGIN_HEADS: tuple[str, ...] = ("arcface", "cosface", "subcenter_arcface")
"""Classification losses with their own weights: one embedding is scored against every identity, no miner."""
STANDARD_MARGINS: dict[str, float] = {"triplet": 0.1, "arcface": 28.6, "subcenter_arcface": 28.6, "cosface": 0.35}
"""The losses that take loss.margin, and the value null stands for: triplet in cosine units (the article's),
ArcFace 0.5 rad in degrees (pytorch-metric-learning's unit), CosFace 0.35 (its paper's value)."""

DISTILL_LOSS_NAMES: tuple[str, ...] = ("cosine", "relational")
"""The distillation terms of training/losses.py (DISTILL_LOSSES), each weighted by distill.<name>_weight."""
PROJECTION_NAMES: tuple[str, ...] = ("auto", "linear", "none")
"""distill.projection: how the student's embedding is mapped to the teacher's (training/distill.py)."""
MIX_NAMES: tuple[str, ...] = ("none", "mixup", "cutmix")
"""distill.mix: how two faces of different identities are mixed into an extra view (training/extra_views.py)."""

DISTILL_TARGET_NAMES: tuple[str, ...] = ("online", "cached")
"""distill.targets: where the teacher's targets come from -- `online`, the teacher embeds the student's augmented view
every step (training/distill.py); `cached`, each image's fixed un-augmented view, embedded once and kept on disk
(training/target_cache.py; extra views are still embedded online)."""

MINER_NAMES: tuple[str, ...] = ("none", "triplet_all", "triplet_hard", "triplet_semihard", "multi_similarity")
"""loss.miner: the miners of training/losses.py (`none`: every pair / triplet of the batch)."""

OPTIMIZER_NAMES: tuple[str, ...] = ("adam", "adamw", "sgd", "ranger", "schedulefree_adamw")
"""optim.name: the optimizers of training/optim.py."""
SCHEDULER_NAMES: tuple[str, ...] = ("cosine", "cosine_warmup", "plateau", "step", "exponential", "constant")
"""optim.scheduler: the learning-rate schedules of training/optim.py."""

# preset -> (optim.name, optim.scheduler). Every scheduler adapts to the run's length by default (optim.t_max 0,
# optim.step_size 0, optim.gamma 0), so each preset gives a sensible curve for any train.max_steps / epochs:
#   adam_cosine          cosine from lr to eta_min over the run
#   adamw_plateau        lr, multiplied by plateau_factor after plateau_patience validations without progress
#   sgd_step             lr for the first third of the run, lr/10 for the second, lr/100 for the last
#   ranger_exponential   lr x gamma^t with gamma chosen so that the run ends at lr/100 (never below eta_min)
#   schedulefree_adamw   constant (schedule-free needs no schedule; its own warm-up is optim.warmup_steps)
#   adamw_cosine_warmup  linear warm-up over optim.warmup_steps, then cosine to eta_min
# Each stays at >= 1% of lr until the last tenth of the run (tests/test_schedules.py measures it on real runs).
PRESETS: dict[str, tuple[str, str]] = {
    "adam_cosine": ("adam", "cosine"),
    "adamw_plateau": ("adamw", "plateau"),
    "sgd_step": ("sgd", "step"),
    "ranger_exponential": ("ranger", "exponential"),
    "schedulefree_adamw": ("schedulefree_adamw", "constant"),
    "adamw_cosine_warmup": ("adamw", "cosine_warmup"),
}
"""optim.preset: a named (optimizer, scheduler) pair, applied when the config loads."""

TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio", "aim": "aim",
    "comet_ml": "comet-ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}
"""train.log_with: accelerate's experiment trackers (its `LoggerType`, tests/test_trackers.py keeps them equal)
-> the pip package that provides each."""
ALL_TRACKERS = "all"
"""train.log_with: every tracker of `TRACKERS` that is installed (accelerate's `all`)."""

DETECTOR_NAMES: tuple[str, ...] = ("mtcnn",)
"""alignment.detector (facetrain.align --detector): the face detectors of alignment/detectors.py."""


def check_name(key: str, value: str, names: tuple[str, ...] | Mapping[str, object], what: str) -> None:
    """A one-line UserError naming the key, the unknown value and the valid names, unless `value` is one."""
    if value not in names:
        raise UserError(f"{key}: unknown {what} {value!r} (choose one of: {', '.join(names)})")


Registry = TypeVar("Registry", bound=Mapping)


def keyed_by(names: tuple[str, ...] | Mapping[str, object], registry: Registry) -> Registry:
    """`registry`, after checking that its keys are exactly `names` in the same order (a name added to one
    table and not the other is a programming error: it fails when the registry's module is imported)."""
    if tuple(registry) != tuple(names):
        raise RuntimeError(f"registry keys {tuple(registry)} differ from the name table {tuple(names)} "
                           "(facetrain/config/names.py): add or remove the name in both")
    return registry
