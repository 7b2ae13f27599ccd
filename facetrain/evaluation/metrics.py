"""Face-verification metrics: the one implementation shared by in-training validation and the evaluator CLI.

Conventions used throughout:

* A *score* is the cosine similarity of two L2-normalised embeddings: unitless, in [-1, 1], higher = more
  alike. A pair is *accepted* ("same person") when ``score >= threshold``.
* A *genuine* pair shows the same identity, an *impostor* pair two different identities.
* Rates are fractions in [0, 1]: TAR (true accept rate) = accepted genuine / genuine pairs,
  FAR (false accept rate) = accepted impostor / impostor pairs, FRR (false reject rate) = 1 - TAR.

Scores come from `scoring` (embeddings -> pair scores, the all-pairs ROC; torch); this module is numpy only.
An ROC is either *exact* (:func:`roc_exact`, every score kept) or *histogram* (scores streamed into a fixed
:class:`ScoreHistogram`, so memory is constant and thresholds are quantised to the bin width, 2/2**16 ~ 3.1e-5
by default). :func:`verification_metrics` turns a :class:`RocCurve` of either mode into a flat,
JSON-serialisable dict. The LFW protocol's k-fold accuracy (:func:`kfold_accuracy`) measures each fold with a
threshold chosen on the other folds; its pairs file is read by `pairfile`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.errors import UserError


class MetricsError(UserError, ValueError):
    """Bad input to a metric (no impostor pairs, a malformed pairs file): shown as one line by the CLIs."""


#: Histogram resolution: 2**16 bins over [-1, 1] are 2**-15 ~ 3.05e-5 wide. A power of two keeps the bin
#: edges exactly representable, so histogram bins and their edge thresholds agree bit for bit.
DEFAULT_BINS = 2**16

_SCORE_LOW, _SCORE_HIGH = -1.0, 1.0  # cosine range covered by ScoreHistogram
_HIST_CHUNK = 1 << 20  # scores binned per step in ScoreHistogram.add: bounds temporaries to ~24 MiB


# --------------------------------------------------------------------------------------------- pair counts


def _labels_to_numpy(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """Labels as a 1-D numpy array; a torch tensor (on any device) is recognised by its `detach`, since this
    module does not import torch."""
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if lab.ndim != 1:
        raise MetricsError(f"labels must be 1-D, got shape {tuple(lab.shape)}")
    return lab


def far_needed(far: float) -> int:
    """Impostor pairs needed to resolve a false-accept rate `far`: FAR moves in steps of 1/n_impostor, so with
    fewer than 1/far impostor pairs one false accept already overshoots it."""
    return math.ceil(1.0 / far - 1e-9)  # - 1e-9: float noise just above an integer must not round up


def count_pairs(labels: np.ndarray | Sequence[int]) -> tuple[int, int]:
    """Return ``(genuine, impostor)``: the numbers of unordered pairs ``i < j`` with equal / different labels.

    Computed from per-identity image counts (an identity with c images has c*(c-1)/2 genuine pairs; every
    other pair is an impostor pair), so it costs O(N log N), not O(N^2).
    """
    lab = _labels_to_numpy(labels)
    n = lab.shape[0]
    _, counts = np.unique(lab, return_counts=True)
    counts = counts.astype(np.int64)
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


# ---------------------------------------------------------------------------------------------- ROC curves


@dataclass(frozen=True, eq=False)
class RocCurve:
    """An ROC curve as parallel arrays, ordered by ascending FAR (i.e. descending threshold).

    Point k is the operating point "accept if score >= thresholds[k]". Point 0 is always the
    reject-everything point (FAR = TAR = 0, threshold +inf) and the last point accepts everything
    (FAR = TAR = 1). ``bin_width`` is the threshold quantisation (score units): 0 for exact curves.
    """

    far: np.ndarray  # float64, non-decreasing, 0 .. 1
    tar: np.ndarray  # float64, non-decreasing, 0 .. 1
    thresholds: np.ndarray  # float64, non-increasing, +inf first
    n_genuine: int
    n_impostor: int
    mode: Literal["exact", "histogram"]
    bin_width: float = 0.0


def require_both_classes(n_genuine: int, n_impostor: int) -> None:
    """A one-line MetricsError when TAR (no genuine pairs) or FAR (no impostor pairs) is undefined."""
    if n_genuine == 0:
        raise MetricsError(
            f"no genuine pairs (0 genuine, {n_impostor} impostor): every identity has a single image, "
            "so TAR is undefined"
        )
    if n_impostor == 0:
        raise MetricsError(
            f"only one identity: no impostor pairs ({n_genuine} genuine, 0 impostor), so FAR is undefined"
        )


def roc_exact(scores: np.ndarray, genuine: np.ndarray) -> RocCurve:
    """Exact ROC with one point per distinct score (ties form a single point), plus the (0, 0) start."""
    s = np.asarray(scores).reshape(-1)
    g = np.asarray(genuine, dtype=bool).reshape(-1)
    if s.shape != g.shape:
        raise MetricsError(f"scores and genuine differ in length: {s.shape[0]} vs {g.shape[0]}")
    n_genuine = int(np.count_nonzero(g))
    require_both_classes(n_genuine, g.shape[0] - n_genuine)
    # imported here: sklearn (with scipy) takes 1-2 s to import, which verify / identify never need
    from sklearn.metrics import roc_curve

    # drop_intermediate=False keeps every threshold: collinear points matter for threshold reporting.
    far, tar, thresholds = roc_curve(g, s, pos_label=True, drop_intermediate=False)
    thresholds = thresholds.astype(np.float64)
    thresholds[0] = np.inf  # sklearn < 1.3 used max(score) + 1 for the reject-everything point
    return RocCurve(
        far=far.astype(np.float64),
        tar=tar.astype(np.float64),
        thresholds=thresholds,
        n_genuine=n_genuine,
        n_impostor=g.shape[0] - n_genuine,
        mode="exact",
        bin_width=0.0,
    )


class ScoreHistogram:
    """Fixed fine histogram of genuine and impostor scores over [-1, 1], for bounded-memory ROCs.

    Bin k holds scores in ``[-1 + k*w, -1 + (k+1)*w)`` with ``w = 2 / bins``; scores outside [-1, 1]
    (float rounding can give cosines like 1 + 1e-7) are clipped into the end bins. Counts are int64, so
    merging histograms from several processes or blocks is exact.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 1:
            raise MetricsError(f"bins must be >= 1, got {bins}")
        self.bins = int(bins)
        self.genuine_counts = np.zeros(self.bins, dtype=np.int64)
        self.impostor_counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def bin_width(self) -> float:
        """Width of one bin in score units (2 / bins)."""
        return (_SCORE_HIGH - _SCORE_LOW) / self.bins

    @property
    def edges(self) -> np.ndarray:
        """Lower edge of every bin, float64, ascending: these are the ROC thresholds."""
        return _SCORE_LOW + np.arange(self.bins, dtype=np.float64) * self.bin_width

    @property
    def n_genuine(self) -> int:
        return int(self.genuine_counts.sum())

    @property
    def n_impostor(self) -> int:
        return int(self.impostor_counts.sum())

    def add(self, scores: np.ndarray, genuine: np.ndarray) -> None:
        """Accumulate one block of scores (any float dtype) with their genuine flags."""
        s_all = np.asarray(scores).reshape(-1)
        g_all = np.asarray(genuine, dtype=bool).reshape(-1)
        if s_all.shape != g_all.shape:
            raise MetricsError(f"scores and genuine differ in length: {s_all.shape[0]} vs {g_all.shape[0]}")
        scale = self.bins / (_SCORE_HIGH - _SCORE_LOW)  # bins per score unit
        # Chunked so the float64/int64 temporaries stay small whatever the block size.
        for start in range(0, s_all.shape[0], _HIST_CHUNK):
            s = s_all[start : start + _HIST_CHUNK].astype(np.float64)
            g = g_all[start : start + _HIST_CHUNK]
            if np.isnan(s).any():
                raise MetricsError("scores contain NaN: cannot histogram them")
            # float64 arithmetic: exact for float32 scores with a power-of-two bin count, so a score equal
            # to an edge lands in the bin that starts there, matching the ">= threshold" rule in roc().
            idx = np.floor((s - _SCORE_LOW) * scale)
            np.clip(idx, 0, self.bins - 1, out=idx)
            # One bincount over 2*bins slots (impostor bins, then genuine bins) instead of two masked copies.
            slot = idx.astype(np.int64) + self.bins * g.astype(np.int64)
            counts = np.bincount(slot, minlength=2 * self.bins)
            self.impostor_counts += counts[: self.bins]
            self.genuine_counts += counts[self.bins :]

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """Add another histogram's counts into this one (e.g. from another process); returns self."""
        if other.bins != self.bins:
            raise MetricsError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        self.genuine_counts += other.genuine_counts
        self.impostor_counts += other.impostor_counts
        return self

    def roc(self) -> RocCurve:
        """ROC with thresholds at bin lower edges: TAR/FAR = fraction of genuine/impostor scores >= edge."""
        n_genuine, n_impostor = self.n_genuine, self.n_impostor
        require_both_classes(n_genuine, n_impostor)
        # Scores >= edge k are exactly those in bins k..bins-1: cumulative sums from the top bin down give
        # the accepted counts in ascending-FAR order, after the reject-everything point.
        tp = np.concatenate([[0], np.cumsum(self.genuine_counts[::-1])])
        fp = np.concatenate([[0], np.cumsum(self.impostor_counts[::-1])])
        thresholds = np.concatenate([[np.inf], self.edges[::-1]])
        # An empty bin repeats the previous point; keep only the highest threshold reaching each point,
        # as the exact ROC has one point per distinct score.
        keep = np.ones(tp.shape[0], dtype=bool)
        keep[1:] = (np.diff(tp) != 0) | (np.diff(fp) != 0)
        return RocCurve(
            far=fp[keep] / n_impostor,
            tar=tp[keep] / n_genuine,
            thresholds=thresholds[keep],
            n_genuine=n_genuine,
            n_impostor=n_impostor,
            mode="histogram",
            bin_width=self.bin_width,
        )


def with_rejected_pairs(roc: RocCurve, genuine: int, impostor: int) -> RocCurve:
    """`roc` with `genuine` + `impostor` more pairs that are rejected at every threshold (failures to acquire, ISO/IEC
    19795-1: no comparison score exists): they stay in the TAR / FAR denominators, so a rejected genuine pair is a
    false reject and a rejected impostor pair a true reject. Every point keeps its threshold and its accepted
    counts; the curve is closed by the point that would accept every pair (FAR = TAR = 1, threshold -inf, which
    no cosine threshold reaches), so AUC and EER stay defined, exactly as if these pairs scored below -1."""
    if genuine == 0 and impostor == 0:
        return roc
    n_genuine, n_impostor = roc.n_genuine + genuine, roc.n_impostor + impostor
    # accepted counts are integers: recover them exactly, then divide by the larger denominators
    far = np.rint(roc.far * roc.n_impostor) / n_impostor
    tar = np.rint(roc.tar * roc.n_genuine) / n_genuine
    return RocCurve(far=np.append(far, 1.0), tar=np.append(tar, 1.0), thresholds=np.append(roc.thresholds, -np.inf),
                    n_genuine=n_genuine, n_impostor=n_impostor, mode=roc.mode, bin_width=roc.bin_width)


# ------------------------------------------------------------------------------------------------ metrics


def _threshold_or_none(value: float) -> float | None:
    # +inf is the reject-everything threshold; JSON has no infinity, so it is reported as None.
    return float(value) if math.isfinite(value) else None


def _eer(roc: RocCurve) -> tuple[float, float | None]:
    """Equal error rate and its threshold, interpolated linearly between the points bracketing FAR = FRR."""
    diff = roc.far - (1.0 - roc.tar)  # FAR - FRR: -1 at the first point, +1 at the last, non-decreasing
    i = int(np.argmax(diff >= 0))  # first point at or past the crossing; i >= 1 since diff[0] = -1
    if diff[i] == 0:
        return float(roc.far[i]), _threshold_or_none(roc.thresholds[i])
    w = float(-diff[i - 1] / (diff[i] - diff[i - 1]))  # fraction of the way from point i-1 to point i
    eer = roc.far[i - 1] + w * (roc.far[i] - roc.far[i - 1])
    t_prev, t_next = roc.thresholds[i - 1], roc.thresholds[i]
    # The threshold is interpolated with the same weight; from the +inf start point that is impossible,
    # and the nearest finite threshold is the best available answer.
    threshold = t_prev + w * (t_next - t_prev) if math.isfinite(t_prev) else t_next
    return float(eer), _threshold_or_none(threshold)


def _best_accuracy(roc: RocCurve) -> tuple[float, float | None]:
    """Highest (TP + TN) / (n_genuine + n_impostor) over the ROC points, and its (highest) threshold."""
    correct = np.rint(roc.tar * roc.n_genuine) + np.rint((1.0 - roc.far) * roc.n_impostor)
    i = int(np.argmax(correct))  # first maximum = highest threshold among ties
    return float(correct[i] / (roc.n_genuine + roc.n_impostor)), _threshold_or_none(roc.thresholds[i])


def _tar_at_far(roc: RocCurve, far: float) -> tuple[float | None, float | None, str | None]:
    """``(tar, threshold, reason)``: the largest TAR with FAR <= ``far``; reason only when unresolvable."""
    if not 0.0 < far <= 1.0:
        raise MetricsError(f"target FAR must be in (0, 1], got {far}")
    # FAR moves in steps of 1/n_impostor: below 1/far impostor pairs the first false accept already
    # overshoots the target, and the reported TAR would be the FAR = 0 point, not TAR at that FAR.
    needed = far_needed(far)
    if roc.n_impostor < needed:
        reason = f"tar@far={far:.0e}: {roc.n_impostor} impostor pairs < 1/FAR = {needed}: FAR not resolvable"
        return None, None, reason
    j = int(np.searchsorted(roc.far, far * (1.0 + 1e-12), side="right")) - 1  # last point with FAR <= far
    # TAR is non-decreasing along the curve, so point j has the best TAR; among points with that same TAR
    # report the first one: the highest threshold (lowest FAR) achieving it.
    k = int(np.searchsorted(roc.tar[: j + 1], roc.tar[j], side="left"))
    return float(roc.tar[k]), _threshold_or_none(roc.thresholds[k]), None


def verification_metrics(
    roc: RocCurve,
    target_fars: Iterable[float] = DEFAULT_TARGET_FARS,
    target_far: float | None = None,
) -> dict[str, Any]:
    """Summarise an ROC as a flat, JSON-serialisable dict.

    Keys (rates are fractions in [0, 1], thresholds are cosine scores, accept if ``score >= threshold``):

    * ``auc``: area under the ROC (trapezoid rule; equals sklearn's ``roc_auc_score`` in exact mode).
    * ``eer``, ``eer_threshold``: equal error rate (FAR = FRR), linearly interpolated between the two ROC
      points bracketing the crossing, and the threshold interpolated the same way.
    * ``best_accuracy``, ``best_threshold``: highest (TP + TN) / (n_genuine + n_impostor) over thresholds.
    * ``tar@far=1e-02``, ``threshold@far=1e-02``, ... for each of ``target_fars``: the largest TAR at an
      operating point with FAR <= f and that point's threshold. Both are None when there are fewer than
      1/f impostor pairs (the FAR cannot be resolved); ``tar_unavailable`` lists one reason per such FAR.
    * ``target_far``, ``tar_at_target_far``, ``threshold_at_target_far``: the same for ``target_far``, only
      when it is given (e.g. the FAR the deployment threshold is chosen at).
    * ``n_genuine``, ``n_impostor``, ``mode`` ("exact"/"histogram"), ``bin_width`` (0 when exact).

    A threshold is None when the operating point rejects every pair (threshold +inf).
    """
    eer, eer_threshold = _eer(roc)
    best_accuracy, best_threshold = _best_accuracy(roc)
    out: dict[str, Any] = {
        "auc": float(np.trapezoid(roc.tar, roc.far)),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "best_accuracy": best_accuracy,
        "best_threshold": best_threshold,
    }
    unavailable: list[str] = []
    for far in target_fars:
        tar, threshold, reason = _tar_at_far(roc, far)
        out[f"tar@far={far:.0e}"] = tar
        out[f"threshold@far={far:.0e}"] = threshold
        if reason is not None:
            unavailable.append(reason)
    if target_far is not None:
        tar, threshold, reason = _tar_at_far(roc, target_far)
        out["target_far"] = float(target_far)
        out["tar_at_target_far"] = tar
        out["threshold_at_target_far"] = threshold
        if reason is not None:
            unavailable.append(reason)
    out["tar_unavailable"] = unavailable
    out["n_genuine"] = int(roc.n_genuine)
    out["n_impostor"] = int(roc.n_impostor)
    out["mode"] = roc.mode
    out["bin_width"] = float(roc.bin_width)
    return out


# ------------------------------------------------------------------------------------ LFW k-fold protocol


def best_accuracy_threshold(scores: np.ndarray, genuine: np.ndarray) -> tuple[float, float]:
    """``(threshold, accuracy)`` maximising accuracy of "accept if score >= threshold" on these pairs.

    All cut points are evaluated at once from one sort and two cumulative sums. The threshold returned is
    the midpoint between the lowest accepted and the highest rejected score: every threshold in that gap
    gives the same accuracy here, and the middle of it does not favour either side on unseen pairs. Ties
    in accuracy go to the highest threshold.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(genuine, dtype=bool).reshape(-1)
    if s.shape != g.shape or s.shape[0] == 0:
        raise MetricsError(f"need equally long, non-empty scores and genuine: got {s.shape[0]}, {g.shape[0]}")
    order = np.argsort(-s, kind="stable")  # descending score
    s, g = s[order], g[order]
    n, n_impostor = s.shape[0], int(np.count_nonzero(~g))
    # Accepting the top m+1 scores gives tp[m] true accepts and n_impostor - fp[m] true rejects; a cut is
    # only realisable after the last of a run of tied scores.
    tp = np.cumsum(g)
    fp = np.cumsum(~g)
    cut = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    correct = np.r_[n_impostor, tp[cut] + (n_impostor - fp[cut])]  # entry 0: reject everything
    best = int(np.argmax(correct))
    if best == 0:
        threshold = float(np.nextafter(s[0], np.inf))  # just above the top score
    else:
        m = int(cut[best - 1])
        threshold = float(s[m])
        if m + 1 < n:
            mid = s[m + 1] + (s[m] - s[m + 1]) / 2
            threshold = float(mid) if mid > s[m + 1] else threshold  # adjacent floats: no midpoint exists
    return threshold, float(correct[best] / n)


def kfold_accuracy(scores: np.ndarray, genuine: np.ndarray, folds: np.ndarray,
                   rejected: np.ndarray | None = None) -> dict[str, Any]:
    """LFW-protocol accuracy: for each fold, pick the best-accuracy threshold on the *other* folds and
    measure accuracy on this fold.

    ``rejected`` (bool per pair, optional): pairs rejected at every threshold (failures to acquire; their
    score is ignored). They count in their fold's accuracy (right when impostor) and add the same number of
    correct decisions at every threshold of the other folds, so the threshold is chosen on the scored pairs.

    Returns ``accuracy_mean``, ``accuracy_std`` (population std over folds, as in the usual LFW scripts),
    ``fold_accuracies`` and ``fold_thresholds`` (lists in ascending fold-id order).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(genuine, dtype=bool).reshape(-1)
    f = np.asarray(folds).reshape(-1)
    if not s.shape == g.shape == f.shape:
        raise MetricsError(
            f"scores, genuine and folds differ in length: {s.shape[0]}, {g.shape[0]}, {f.shape[0]}"
        )
    rej = np.zeros(s.shape, dtype=bool) if rejected is None else np.asarray(rejected, dtype=bool).reshape(-1)
    if rej.shape != s.shape:
        raise MetricsError(f"rejected has {rej.shape[0]} entries for {s.shape[0]} pairs")
    fold_ids = np.unique(f)
    if fold_ids.shape[0] < 2:
        raise MetricsError(f"k-fold accuracy needs at least 2 folds, got {fold_ids.shape[0]}")
    accuracies: list[float] = []
    thresholds: list[float] = []
    for fold in fold_ids:  # a handful of folds; each iteration is vectorised over pairs
        test = f == fold
        train = ~test & ~rej
        # no scored pair in the other folds: nothing to choose a threshold on, so accept nothing
        threshold = best_accuracy_threshold(s[train], g[train])[0] if train.any() else math.inf
        accepted = (s[test] >= threshold) & ~rej[test]
        accuracies.append(float(np.mean(accepted == g[test])))
        thresholds.append(threshold)
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "fold_thresholds": thresholds,
    }


