"""Evaluation protocols: what to embed, and how to turn the embeddings into an ROC; and the FAR the
bundle's threshold is calibrated at.

Protocols (`PROTOCOLS`):
* `all_pairs` (default): every unordered pair of a labelled folder `<data>/<identity>/<image>`. The ROC is
  exact up to `--max-exact-pairs` pairs (every score kept), else a fixed histogram of 2**16 bins streamed
  block by block (memory independent of the number of pairs, thresholds quantised to 3.05e-5).
* `pairs_file` (`--pairs FILE`): an LFW `pairs.txt` over `<data>/<name>/<name>_<0001>.<ext>`; 10-fold
  accuracy (threshold chosen on the other nine folds) plus AUC/EER/TAR@FAR over all listed pairs.

A protocol `plan`s the files to embed and the pair counts before any model runs (`preflight_plan` finds the
missing and undecodable files first), takes the images that failed to acquire (those and the photos without a
usable face) `without` their pairs, remembering how many it left out, and `score`s the embeddings with `metrics`
(the code the trainer validates with): under `--fta nonmatch` the left-out pairs are rejected at every
threshold (`metrics.with_rejected_pairs`, and in the 10-fold accuracy), under `exclude` they stay out (`fta`).
Scoring also collects the worst pairs of the scored images (`scoring.WorstPairs`).

Threshold calibration: the decision rule is "same person if cosine >= threshold". The threshold written to
the bundle is the highest one whose FAR on this data is <= the target FAR (`--target-far`; by default 1e-3
when the data has >= 1000 impostor pairs, else the smallest of 1e-1/1e-2 that it can resolve). A FAR f is
resolvable only with >= 1/f impostor pairs: below that, one false accept already overshoots the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.data.faceset import scan_identity_folder
from facetrain.errors import UserError
from facetrain.evaluation.bootstrap import (
    UnitCounts,
    UnitPairAccumulator,
    add_rejected_identity_pairs,
    identity_units,
    pair_unit_counts,
)
from facetrain.evaluation.fta import stop_if_asked, unreadable
from facetrain.evaluation.metrics import (
    RocCurve,
    count_pairs,
    far_needed,
    kfold_accuracy,
    roc_exact,
    with_rejected_pairs,
)
from facetrain.evaluation.pairfile import read_pairs
from facetrain.evaluation.scoring import WorstPairs, all_pairs_roc, all_pairs_unit_counts, pair_scores

if TYPE_CHECKING:
    from facetrain.evaluation.options import EvalOptions

#: FAR the bundle's threshold is calibrated for when --target-far is not given: a common operating point for
#: 1:1 verification (1 false accept in 1000 impostor attempts), resolvable by any set with >= 1000
#: impostor pairs (e.g. 5 identities x 10 images).
DEFAULT_CALIBRATION_FAR = 1e-3


def calibration_far(requested: float | None, n_impostor: int) -> tuple[float | None, str]:
    """(FAR to calibrate the threshold at, where that choice came from); None when nothing is resolvable."""
    if requested is not None:
        return requested, "--target-far"
    if n_impostor >= far_needed(DEFAULT_CALIBRATION_FAR):
        return DEFAULT_CALIBRATION_FAR, "default"
    resolvable = [f for f in DEFAULT_TARGET_FARS if n_impostor >= far_needed(f)]
    if resolvable:
        return min(resolvable), f"smallest resolvable ({n_impostor} impostor pairs < {far_needed(1e-3)})"
    return None, f"no standard FAR is resolvable with {n_impostor} impostor pairs (need >= 10)"


@dataclass
class Plan:
    """What a protocol needs embedded, and the pair counts known before any model runs."""

    paths: list[str]
    n_genuine: int
    n_impostor: int
    n_identities: int
    describe: str
    labels: np.ndarray | None = None
    pair_index: np.ndarray | None = None  # (K, 2) rows into `paths` (pairs_file)
    pair_genuine: np.ndarray | None = None
    pair_fold: np.ndarray | None = None
    left_out_genuine: int = 0
    """Pairs taken out `without` their images (failures to acquire), genuine and impostor."""
    left_out_impostor: int = 0
    left_out_pairs: np.ndarray | None = None
    """pairs_file: (R, 2) int64 rows (genuine 0/1, fold) of the pairs left out."""
    left_out_labels: np.ndarray | None = None
    """all_pairs: the labels of the images left out (the bootstrap gives their rejected pairs to identities)."""

    def scored_impostors(self, policy: str) -> int:
        """Impostor pairs in the FAR denominator: the left-out ones count too when they are non-matches."""
        return self.n_impostor + (self.left_out_impostor if policy == "nonmatch" else 0)


class AllPairs:
    """Every unordered pair of a labelled folder."""

    name = "all_pairs"

    def plan(self, opts: EvalOptions) -> Plan:
        paths, labels, names = scan_identity_folder(opts.data, "--data")
        n_genuine, n_impostor = count_pairs(labels)
        if len(names) < 2:
            raise UserError(f"--data: {opts.data} has only one identity ({names[0]}, {len(paths)} images), so "
                            "there are no impostor pairs and FAR is undefined: add folders of other people")
        if n_genuine == 0:
            raise UserError(f"--data: every identity in {opts.data} has a single image, so there are no "
                            "genuine pairs and TAR is undefined: add a second image of some people")
        return Plan(paths, n_genuine, n_impostor, len(names), f"all pairs of {opts.data}", labels=labels)

    def without(self, plan: Plan, emb: torch.Tensor, dropped: set[int]) -> tuple[Plan, torch.Tensor]:
        """The plan and embeddings without the images at `dropped` (failures to acquire) and their pairs."""
        keep = np.array([i not in dropped for i in range(len(plan.paths))], dtype=bool)
        labels = plan.labels[keep]
        n_genuine, n_impostor = count_pairs(labels)
        n_ids = len(np.unique(labels))
        if n_ids < 2 or n_genuine == 0:
            raise UserError(f"--data: {len(dropped)} of {len(plan.paths)} image(s) failed to acquire (missing, "
                            f"undecodable or without a usable face), leaving {n_ids} identities and {n_genuine} "
                            "genuine pairs: too few to evaluate (python -m facetrain.align reports which photos "
                            "have no face)")
        paths = [p for p, k in zip(plan.paths, keep, strict=True) if k]
        return dataclasses.replace(
            plan, paths=paths, labels=labels, n_genuine=n_genuine, n_impostor=n_impostor, n_identities=n_ids,
            left_out_genuine=plan.left_out_genuine + plan.n_genuine - n_genuine,
            left_out_impostor=plan.left_out_impostor + plan.n_impostor - n_impostor,
            left_out_labels=np.concatenate([plan.left_out_labels if plan.left_out_labels is not None
                                            else plan.labels[:0], plan.labels[~keep]])), emb[torch.as_tensor(keep)]

    def score(self, emb: torch.Tensor, plan: Plan, opts: EvalOptions, worst: WorstPairs) -> tuple[RocCurve, dict]:
        roc = all_pairs_roc(emb, torch.as_tensor(plan.labels), mode=opts.roc_mode,
                            max_exact_pairs=opts.max_exact_pairs, worst=worst)
        if opts.fta == "nonmatch":
            roc = with_rejected_pairs(roc, plan.left_out_genuine, plan.left_out_impostor)
        return roc, {}

    def unit_counts(self, emb: torch.Tensor, plan: Plan, thresholds: np.ndarray, seed: int,
                    policy: str) -> UnitCounts:
        """Bootstrap counts with the identities (or seeded groups of them) as the resampled units; under
        --fta nonmatch the pairs of the images left out belong to their identities, rejected at every threshold."""
        lost = plan.left_out_labels if policy == "nonmatch" and plan.left_out_labels is not None else plan.labels[:0]
        units, n_units = identity_units(np.concatenate([plan.labels, lost]), seed)
        accumulator = UnitPairAccumulator(n_units, thresholds)
        all_pairs_unit_counts(emb, torch.as_tensor(plan.labels), units[:len(plan.labels)], accumulator)
        counts = accumulator.unit_counts(plan.n_identities)
        if len(lost):
            add_rejected_identity_pairs(counts, np.concatenate([plan.labels, lost]), units,
                                        np.arange(len(units)) < len(plan.labels))
        return counts


class PairsFile:
    """The pairs listed in an LFW-format pairs.txt, with the 10-fold accuracy protocol."""

    name = "pairs_file"

    def plan(self, opts: EvalOptions) -> Plan:
        if not Path(opts.data).is_dir():
            raise UserError(f"--data: folder not found: {opts.data} (the LFW root: <data>/<name>/<name>_0001.jpg)")
        specs = read_pairs(opts.pairs, opts.data, missing_ok=True)  # a missing image is a failure to acquire
        files = list(dict.fromkeys(str(p) for s in specs for p in (s.path_a, s.path_b)))
        row = {p: i for i, p in enumerate(files)}
        index = np.array([[row[str(s.path_a)], row[str(s.path_b)]] for s in specs], dtype=np.int64)
        genuine = np.array([s.genuine for s in specs], dtype=bool)
        folds = np.array([s.fold for s in specs], dtype=np.int64)
        n_genuine = int(genuine.sum())
        people = {s.name_a for s in specs} | {s.name_b for s in specs}
        return Plan(files, n_genuine, len(specs) - n_genuine, len(people),
                    f"{len(specs)} pairs of {opts.pairs} ({len(np.unique(folds))} folds)",
                    pair_index=index, pair_genuine=genuine, pair_fold=folds)

    def without(self, plan: Plan, emb: torch.Tensor, dropped: set[int]) -> tuple[Plan, torch.Tensor]:
        """The plan without the pairs that use an image at `dropped` (failures to acquire; embedding rows are
        kept, unused)."""
        keep = ~np.isin(plan.pair_index, list(dropped)).any(axis=1)
        n_genuine = int(plan.pair_genuine[keep].sum())
        if n_genuine == 0 or n_genuine == int(keep.sum()):
            raise UserError(f"--pairs: {len(dropped)} image(s) failed to acquire (missing, undecodable or without a "
                            f"usable face), leaving {int(keep.sum())} pairs ({n_genuine} genuine): too few to "
                            "evaluate")
        gone = np.stack([plan.pair_genuine[~keep].astype(np.int64), plan.pair_fold[~keep]], axis=1)
        before = plan.left_out_pairs if plan.left_out_pairs is not None else np.zeros((0, 2), dtype=np.int64)
        return dataclasses.replace(
            plan, n_genuine=n_genuine, n_impostor=int(keep.sum()) - n_genuine, pair_index=plan.pair_index[keep],
            pair_genuine=plan.pair_genuine[keep], pair_fold=plan.pair_fold[keep],
            left_out_genuine=plan.left_out_genuine + int(gone[:, 0].sum()),
            left_out_impostor=plan.left_out_impostor + int((gone[:, 0] == 0).sum()),
            left_out_pairs=np.concatenate([before, gone])), emb

    def score(self, emb: torch.Tensor, plan: Plan, opts: EvalOptions, worst: WorstPairs) -> tuple[RocCurve, dict]:
        scores = pair_scores(emb[plan.pair_index[:, 0]], emb[plan.pair_index[:, 1]])
        roc = roc_exact(scores, plan.pair_genuine)
        worst.add_pairs(scores, plan.pair_genuine, plan.pair_index[:, 0], plan.pair_index[:, 1])
        genuine, folds = plan.pair_genuine, plan.pair_fold
        rejected = np.zeros(len(scores), dtype=bool)
        if opts.fta == "nonmatch" and plan.left_out_pairs is not None:
            roc = with_rejected_pairs(roc, plan.left_out_genuine, plan.left_out_impostor)
            # the left-out pairs join their folds, rejected (their score is never read)
            gone = plan.left_out_pairs
            scores = np.concatenate([scores, np.zeros(len(gone))])
            genuine = np.concatenate([genuine, gone[:, 0].astype(bool)])
            folds = np.concatenate([folds, gone[:, 1]])
            rejected = np.concatenate([rejected, np.ones(len(gone), dtype=bool)])
        extra = {}
        if len(np.unique(folds)) >= 2:
            extra["kfold"] = kfold_accuracy(scores, genuine, folds, rejected)
        return roc, extra

    def unit_counts(self, emb: torch.Tensor, plan: Plan, thresholds: np.ndarray, seed: int,
                    policy: str) -> UnitCounts:
        """Bootstrap counts with the listed pairs as the units, resampled within (fold, genuine/impostor); under
        --fta nonmatch the left-out pairs are units too, scored -inf (accepted at no threshold)."""
        # the float64 cosines score() gave roc_exact, so each pair falls on the ROC's side of every threshold
        scores = pair_scores(emb[plan.pair_index[:, 0]], emb[plan.pair_index[:, 1]])
        genuine, folds = plan.pair_genuine, plan.pair_fold
        if policy == "nonmatch" and plan.left_out_pairs is not None and len(plan.left_out_pairs):
            gone = plan.left_out_pairs
            scores = np.concatenate([scores, np.full(len(gone), -np.inf)])
            genuine = np.concatenate([genuine, gone[:, 0].astype(bool)])
            folds = np.concatenate([folds, gone[:, 1]])
        return pair_unit_counts(scores, genuine, folds, thresholds, plan.n_identities)


PROTOCOLS = {"all_pairs": AllPairs(), "pairs_file": PairsFile()}


def preflight_plan(protocol, plan: Plan, opts: EvalOptions) -> tuple[Plan, list[dict]]:
    """The failures to acquire found before any model loads: missing files and the training pre-flight's decode
    check of every file the plan reads. Every one is named at once (`--fta error`), or taken out with the pairs
    that use it (which the protocol then scores by `--fta`); returns the plan and the failures."""
    failures = unreadable(plan.paths, opts.max_image_pixels, opts.data)
    stop_if_asked(opts.fta, failures)
    if not failures:
        return plan, []
    row = {p: i for i, p in enumerate(plan.paths)}
    plan, _ = protocol.without(plan, torch.zeros((len(plan.paths), 0)), {row[b["path"]] for b in failures})
    if plan.pair_index is not None:  # pairs_file keeps the rows of dropped files: do not read them at all
        used = np.unique(plan.pair_index)
        new_row = np.full(len(plan.paths), -1, dtype=np.int64)
        new_row[used] = np.arange(len(used))
        plan = dataclasses.replace(plan, paths=[plan.paths[i] for i in used], pair_index=new_row[plan.pair_index])
    return plan, failures

