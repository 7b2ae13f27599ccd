"""Validation during training: the held-out identities embedded on every rank and all their pairs scored on rank 0
with the code `facetrain.eval` uses (evaluation/); the metric's feasibility, BatchNorm statistics for averaged
weights, the best-so-far rule, and the pictures of the final validation (`<output_dir>/validation/errors.png`,
TensorBoard's projector).

Failures to acquire: under `data.bad_images: skip` the pre-flight leaves undecodable files out of the face set
(`FaceSet.skipped`); those of validation identities are counted as eval's default counts them (`--fta nonmatch`):
their pairs are rejected at every threshold, and `val/fta_rate` is logged (failed / validation images). Costs
one pair count per validation, nothing per image. (Validation crops come from an aligned folder or a pack:
no face detection runs here, so "no face" cannot happen; a file that stops decoding mid-run follows
data.bad_images in `FaceDataset`.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from facetrain.config.checks import val_metric_far
from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.config.schema import Config
from facetrain.data.dataset import FaceDataset
from facetrain.data.transforms import ToModelInput, collate, eval_transform
from facetrain.errors import UserError
from facetrain.evaluation.embedding import embed_dataset
from facetrain.evaluation.metrics import count_pairs, far_needed, verification_metrics, with_rejected_pairs
from facetrain.evaluation.pictures import (
    ERRORS_FILE,
    WORST_PAIRS,
    Projector,
    error_grid,
    tensor_image,
    worst_pairs_report,
)
from facetrain.evaluation.protocols import calibration_far
from facetrain.evaluation.scoring import WorstPairs, all_pairs_roc
from facetrain.model.network import inference_model
from facetrain.runtime.atomic_dir import write_atomic
from facetrain.runtime.distributed import broadcast_object

PICTURES_DIR = "validation"
"""The final validation's pictures inside train.output_dir: errors.png and worst_pairs.json."""
WORST_PAIRS_FILE = "worst_pairs.json"
PROJECTOR_TAG = "validation"
"""The projector's tag for the validation embeddings in the run's TensorBoard (facetrain.eval logs "eval")."""
WRITE_TODO = "free disk space, or choose another train.output_dir"

BN_RECOMPUTE_IMAGES = 512
"""Schedule-free runs: training images whose BatchNorm statistics are recomputed for the averaged weights
before each validation (the schedule-free authors' advice; a few hundred images give stable statistics)."""


def check_val_metric_resolvable(val_metric: str, val_labels: np.ndarray) -> None:
    """TAR at FAR f needs >= 1/f impostor pairs, else it is never resolved: stop before training."""
    far = val_metric_far(val_metric)
    n_impostor = count_pairs(val_labels)[1]
    if far is not None and n_impostor < far_needed(far):
        usable = [f"tar@far={f:.0e}" for f in DEFAULT_TARGET_FARS if n_impostor >= far_needed(f)] + ["auc", "eer"]
        raise UserError(f"train.val_metric: {val_metric} needs >= {far_needed(far):,} impostor pairs, but the "
                        f"{len(np.unique(val_labels))} validation identities ({len(val_labels)} images) give "
                        f"{n_impostor:,}; choose {', '.join(usable)}, or hold out more identities "
                        "(data.val_identities)")


def is_better(value: float | None, best: float | None, decreasing: bool) -> bool:
    """`value` beats `best` (None: nothing yet); a metric validation could not compute (None) never does."""
    return value is not None and (best is None or (value < best if decreasing else value > best))


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, dataset, pre, batch_size: int, device, channels_last: bool) -> int:
    """Replace the running statistics of `model`'s BatchNorm layers by their exact average over `dataset`
    (every other layer in eval mode: no dropout, no RNG drawn). Returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    to_input = ToModelInput(pre, device, channels_last)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, _, _ in loader:
        model(to_input(images))
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)


class Validator:
    """The validation pass of a run: its datasets are built once, `metrics(model)` scores the model as it is."""

    def __init__(self, cfg: Config, faceset, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 pre, accelerator, workers: int, extra_metrics: Callable[[torch.Tensor, object], dict] | None = None):
        """`train` / `val`: (image indices into `faceset`, labels) of the training and validation identities.
        `extra_metrics(embeddings, validation dataset)`: more metrics, computed on rank 0 (the teacher's
        agreement, training/distill.py)."""
        self.cfg, self.pre, self.accelerator, self.workers = cfg, pre, accelerator, workers
        self.extra_metrics = extra_metrics
        self.val_labels = val[1]
        self.fta_labels = skipped_val_labels(faceset, *val)
        self.rejected = rejected_pairs(self.val_labels, self.fta_labels)
        self.val_ds = FaceDataset(faceset, *val, eval_transform(pre), cfg.data.bad_images)
        # what the pictures name each validation image by: its file (or synthetic / dataset key), its identity
        self.val_keys = [faceset.keys[int(i)] for i in val[0]]
        self.val_identities = [faceset.names[int(faceset.labels[int(i)])] for i in val[0]]
        self.scored: tuple | None = None
        """(embeddings, WorstPairs, metrics) of the last validation asked for pictures (rank 0)."""
        # schedule-free: training images (fixed, seeded) whose statistics BatchNorm recomputes before validation
        pick = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(train[0]))[:BN_RECOMPUTE_IMAGES])
        self.bn_ds = FaceDataset(faceset, train[0][pick], train[1][pick], eval_transform(pre), cfg.data.bad_images)

    def metrics(self, model: torch.nn.Module, recompute_bn: bool, pictures: bool = False) -> dict:
        """verification_metrics of `model` (in eval mode) on every rank. `recompute_bn`: first replace its BatchNorm
        statistics (schedule-free: they were gathered with the training sequence's weights, not the average's).
        `pictures`: also keep the embeddings and the worst pairs for `write_pictures` (rank 0)."""
        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
        if recompute_bn:
            recompute_batchnorm(model, self.bn_ds, self.pre, t.val_batch_size, acc.device, cfg.model.channels_last)
        # BatchNorm folded into a copy of the weights (model.fold_batchnorm): faster, same embeddings
        infer = inference_model(model, self.pre.image_size, len(self.val_ds), cfg.model.fold_batchnorm)
        emb = embed_dataset(infer, self.val_ds, self.pre, t.val_batch_size, acc, num_workers=self.workers,
                            channels_last=cfg.model.channels_last)
        metrics = None
        if acc.is_main_process:
            worst = WorstPairs(WORST_PAIRS) if pictures else None
            roc = all_pairs_roc(emb, torch.as_tensor(self.val_labels), worst=worst)
            metrics = verification_metrics(with_rejected_pairs(roc, *self.rejected))
            metrics["fta_rate"] = len(self.fta_labels) / (len(self.val_labels) + len(self.fta_labels))
            if self.extra_metrics is not None:
                metrics.update(self.extra_metrics(emb, self.val_ds))
            self.scored = (emb, worst, metrics) if pictures else None
        return broadcast_object(metrics, acc)

    def write_pictures(self, folder: Path, writer, step: int) -> None:
        """The last `metrics(..., pictures=True)`'s worst pairs as `folder`/errors.png and worst_pairs.json (the
        threshold: the one facetrain.eval would calibrate on this set), and, given a TensorBoard `writer`, its
        embeddings with their thumbnails in the projector."""
        emb, worst, metrics = self.scored
        far, _ = calibration_far(None, metrics["n_impostor"])
        threshold = None if far is None else metrics[f"threshold@far={far:.0e}"]
        report = worst_pairs_report(worst, self.val_keys, threshold)
        report["far"] = far

        def thumb(row: int):
            return tensor_image(self.val_ds[row][0])  # the model's input: synthetic faces have no file

        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / WORST_PAIRS_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), WRITE_TODO)
        grid = error_grid(report, thumb)
        write_atomic(folder / ERRORS_FILE, lambda tmp: grid.save(tmp, format="PNG"), WRITE_TODO)
        if writer is not None:
            Projector.build(emb, self.val_identities, self.val_keys, thumb).log(writer, step, PROJECTOR_TAG)


def skipped_val_labels(faceset, val_idx: np.ndarray, val_labels: np.ndarray) -> np.ndarray:
    """Validation label of each file the pre-flight left out (`faceset.skipped`) whose identity folder is a
    validation identity: the validation set's failures to acquire. An identity left with no image at all is in
    no split, and so not counted."""
    if not faceset.skipped or not len(val_idx):
        return np.zeros(0, dtype=np.int64)
    by_name = {faceset.names[faceset.labels[i]]: int(lab) for i, lab in zip(val_idx, val_labels, strict=True)}
    found = [by_name.get(Path(p).parent.name) for p in faceset.skipped]
    return np.asarray([lab for lab in found if lab is not None], dtype=np.int64)


def rejected_pairs(val_labels: np.ndarray, fta_labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) pairs that use at least one failed image: all pairs of the validation identities, failed
    images included, minus the pairs of the acquired ones."""
    if not len(fta_labels):
        return 0, 0
    everyone = count_pairs(np.concatenate([val_labels, fta_labels]))
    acquired = count_pairs(val_labels)
    return everyone[0] - acquired[0], everyone[1] - acquired[1]
