"""Face-verification metrics: the one implementation shared by in-training validation and the evaluator CLI.

Conventions used throughout:

* A *score* is the cosine similarity of two L2-normalised embeddings: unitless, in [-1, 1], higher = more
  alike. A pair is *accepted* ("same person") when ``score >= threshold``.
* A *genuine* pair shows the same identity, an *impostor* pair two different identities.
* Rates are fractions in [0, 1]: TAR (true accept rate) = accepted genuine / genuine pairs,
  FAR (false accept rate) = accepted impostor / impostor pairs, FRR (false reject rate) = 1 - TAR.

Two protocols are covered:

* **All pairs** (:func:`all_pairs_roc`): every unordered pair ``i < j`` of a labelled embedding set is scored
  by blocked matrix products (:func:`all_pair_scores`). The ROC is either *exact* (every score kept, so memory
  grows with the number of pairs, i.e. quadratically with the number of images) or *histogram* (scores
  streamed into a fixed :class:`ScoreHistogram`, so memory is constant and thresholds are quantised to the
  bin width, 2/2**16 ~ 3.1e-5 by default).
* **LFW pairs** (:func:`parse_lfw_pairs`, :func:`resolve_pair_paths`, :func:`pair_scores`,
  :func:`kfold_accuracy`): a fixed list of pairs split into folds; each fold's accuracy is measured with a
  threshold chosen on the other folds.

:func:`verification_metrics` turns a :class:`RocCurve` of either mode into a flat, JSON-serialisable dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.data.images import IMAGE_EXTENSIONS  # tried in order when resolving LFW pair names to files
from facetrain.errors import UserError


class MetricsError(UserError, ValueError):
    """Bad input to a metric (no impostor pairs, a malformed pairs file): shown as one line by the CLIs."""


__all__ = [
    "DEFAULT_BINS",
    "IMAGE_EXTENSIONS",
    "PairSpec",
    "RocCurve",
    "ScoreHistogram",
    "all_pair_scores",
    "all_pairs_roc",
    "best_accuracy_threshold",
    "count_pairs",
    "far_needed",
    "kfold_accuracy",
    "pair_scores",
    "parse_lfw_pairs",
    "resolve_pair_paths",
    "roc_exact",
    "verification_metrics",
]

#: Histogram resolution: 2**16 bins over [-1, 1] are 2**-15 ~ 3.05e-5 wide. A power of two keeps the bin
#: edges exactly representable, so histogram bins and their edge thresholds agree bit for bit.
DEFAULT_BINS = 2**16

_SCORE_LOW, _SCORE_HIGH = -1.0, 1.0  # cosine range covered by ScoreHistogram
_HIST_CHUNK = 1 << 20  # scores binned per step in ScoreHistogram.add: bounds temporaries to ~24 MiB


# --------------------------------------------------------------------------------------------- pair scores


def _labels_to_numpy(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 1:
        raise MetricsError(f"labels must be 1-D, got shape {tuple(lab.shape)}")
    return lab


def far_needed(far: float) -> int:
    """Impostor pairs needed to resolve a false-accept rate `far`: FAR moves in steps of 1/n_impostor, so with
    fewer than 1/far impostor pairs one false accept already overshoots it."""
    return math.ceil(1.0 / far - 1e-9)


def count_pairs(labels: torch.Tensor | np.ndarray | Sequence[int]) -> tuple[int, int]:
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


def _score_dtype(device: torch.device) -> torch.dtype:
    # Scores are computed in float64 where the device supports it. This is not about float32 rounding
    # (~1e-7, far below the 3e-5 histogram bin) but about what float32 matmuls silently become: TF32 on
    # CUDA when a global flag is on (Accelerate turns it on with dynamo; ~1e-3 error) and fp16/bf16 under
    # autocast. float64 is exempt from both, needs no global-flag juggling, and the products are a small
    # part of the cost next to binning or sorting the N^2/2 scores. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _matmul_outside_autocast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 is exempt from autocast, but the float32 fallback (MPS) is not: compute it as asked.
    if torch.amp.is_autocast_available(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return a @ b
    return a @ b


def _checked_inputs(
    emb: torch.Tensor, labels: torch.Tensor | np.ndarray | Sequence[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised embeddings in the score dtype, labels on the same device), or a one-line MetricsError."""
    if emb.ndim != 2:
        raise MetricsError(f"embeddings must be 2-D (N, D), got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    lab = labels.detach() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    lab = lab.to(emb.device)
    if lab.shape != (n,):
        raise MetricsError(f"labels must have shape ({n},) to match the embeddings, got {tuple(lab.shape)}")
    if block_size < 1:
        raise MetricsError(f"block_size must be >= 1, got {block_size}")
    emb = emb.detach()
    if not bool(torch.isfinite(emb).all()):
        raise MetricsError("embeddings contain NaN or inf: cannot score pairs")
    return F.normalize(emb.to(_score_dtype(emb.device)), dim=1), lab


def all_pair_scores(
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    block_size: int = 4096,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(scores, genuine)`` blocks covering every unordered pair ``i < j`` of ``emb`` exactly once.

    Args:
        emb: (N, D) embeddings on any device. They are L2-normalised here (O(N*D), negligible next to the
            O(N^2*D) products), so the dot products are cosines in [-1, 1] even if the caller forgot to.
        labels: (N,) integer identity labels.
        block_size: rows/columns per block. One block holds ``block_size**2`` scores (4096 -> 16.8M scores,
            128 MiB in float64 on the device, 64 MiB as float32 on the host).

    Yields:
        ``scores`` (float32, 1-D) and ``genuine`` (bool, same length) for the pairs of one block
        ``emb[a:b] @ emb[c:d].T`` with ``c >= a``; diagonal blocks contribute only their strict upper
        triangle, so no self pairs and no pair twice.
    """
    x, lab = _checked_inputs(emb, labels, block_size)
    n = x.shape[0]
    for a in range(0, n, block_size):
        b = min(a + block_size, n)
        for c in range(a, n, block_size):
            d = min(c + block_size, n)
            scores = _matmul_outside_autocast(x[a:b], x[c:d].T)
            genuine = lab[a:b, None] == lab[None, c:d]
            if c == a:
                # Diagonal block: keep the strict upper triangle. Its lower half mirrors pairs already in
                # the upper half, and the diagonal holds self pairs (score 1, always "genuine").
                upper = torch.ones(b - a, b - a, dtype=torch.bool, device=x.device).triu_(diagonal=1)
                scores, genuine = scores[upper], genuine[upper]
            yield (
                scores.reshape(-1).to(torch.float32).cpu().numpy(),
                genuine.reshape(-1).cpu().numpy(),
            )


def pair_scores(emb_a: torch.Tensor, emb_b: torch.Tensor) -> np.ndarray:
    """Cosine score of each row pair ``(emb_a[k], emb_b[k])`` (LFW-style pair lists): float64, shape (K,)."""
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise MetricsError(
            f"pair embeddings must be two (K, D) tensors of equal shape, got {tuple(emb_a.shape)} "
            f"and {tuple(emb_b.shape)}"
        )
    dtype = _score_dtype(emb_a.device)
    a = F.normalize(emb_a.detach().to(dtype), dim=1)
    b = F.normalize(emb_b.detach().to(emb_a.device, dtype), dim=1)
    return (a * b).sum(dim=1).cpu().numpy().astype(np.float64)


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


def _require_both_classes(n_genuine: int, n_impostor: int) -> None:
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
    _require_both_classes(n_genuine, g.shape[0] - n_genuine)
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
        _require_both_classes(n_genuine, n_impostor)
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


def all_pairs_roc(
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    mode: Literal["auto", "exact", "histogram"] = "auto",
    max_exact_pairs: int = 20_000_000,
    block_size: int = 4096,
    bins: int = DEFAULT_BINS,
) -> RocCurve:
    """ROC over all unordered pairs of a labelled embedding set.

    ``mode="exact"`` keeps every score (5 bytes per pair for the scores and flags; sklearn's roc_curve then sorts
    and accumulates in int64/float64: ~70 bytes per pair at peak, measured: 0.7 GiB for 10^7 pairs);
    ``"histogram"`` streams blocks into a
    :class:`ScoreHistogram` (memory independent of N; thresholds quantised to ``2 / bins``); ``"auto"``
    picks exact when the total number of pairs is at most ``max_exact_pairs``.
    """
    if mode not in ("auto", "exact", "histogram"):
        raise MetricsError(f"mode must be 'auto', 'exact' or 'histogram', got {mode!r}")
    n_genuine, n_impostor = count_pairs(labels)
    _require_both_classes(n_genuine, n_impostor)
    if mode == "auto":
        mode = "exact" if n_genuine + n_impostor <= max_exact_pairs else "histogram"

    if mode == "exact":
        score_blocks, genuine_blocks = [], []
        for scores, genuine in all_pair_scores(emb, labels, block_size):
            score_blocks.append(scores)
            genuine_blocks.append(genuine)
        return roc_exact(np.concatenate(score_blocks), np.concatenate(genuine_blocks))

    hist = ScoreHistogram(bins)
    if bins >= 2 and bins & (bins - 1) == 0:
        _stream_all_pairs_into(hist, emb, labels, block_size)
    else:  # the fast kernel's exact binning needs a power-of-two bin count
        for scores, genuine in all_pair_scores(emb, labels, block_size):
            hist.add(scores, genuine)
    return hist.roc()


#: Rows/columns per block in the streaming histogram kernel: a 2048 x 2048 block (32 MiB of float64 scores)
#: keeps its element-wise passes in cache; measured fastest of 512..4096 on a 2-core AVX-512 CPU.
_STREAM_BLOCK = 2048


def _bincount(idx: torch.Tensor, minlength: int) -> np.ndarray:
    # numpy's bincount is ~8x faster than torch's on CPU; on an accelerator, count on the device.
    if idx.device.type == "cpu":
        return np.bincount(idx.numpy().reshape(-1), minlength=minlength)
    return torch.bincount(idx.reshape(-1), minlength=minlength).cpu().numpy()


def _stream_all_pairs_into(
    hist: ScoreHistogram,
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    block_size: int,
) -> None:
    """Add every unordered pair's score to ``hist`` (power-of-two ``bins``): the same counts as ``hist.add``
    over :func:`all_pair_scores`, several times faster (10^5 512-d embeddings = 5e9 pairs: ~170 CPU seconds,
    1.7 GB peak; see bench/eval_throughput.py).

    * The bin is computed on the block in torch: the float32 score times ``bins / 2`` (a power of two) is
      exact, so ``floor`` of it is the bin offset from 0, bit for bit what ``add`` computes in float64
      (except scores in (-6e-17, 0), which ``add``'s rounding of ``s + 1`` puts in the bin starting at 0).
      Only the float64 sums may differ in the last bit from :func:`all_pair_scores`' larger blocks.
    * Rows are sorted by label, so genuine pairs only occur in blocks whose label ranges touch; every other
      block is all impostors and is counted without building a genuine mask.
    * Blocks of at most ``_STREAM_BLOCK`` rows keep the element-wise passes in cache.
    """
    x, lab = _checked_inputs(emb, labels, block_size)
    order = torch.argsort(lab, stable=True)
    x, lab = x[order], lab[order]
    lab_host = lab.cpu().numpy()
    bins, half = hist.bins, hist.bins // 2
    block = min(block_size, _STREAM_BLOCK)
    n = x.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        for c in range(a, n, block):
            d = min(c + block, n)
            # Scaling the row block by bins/2 (a power of two) scales every product and sum exactly, so this
            # is float32(score) * bins/2 without a pass over the block; its floor + bins/2 is the bin index,
            # out-of-range cosines clamped into the end bins.
            scaled = _matmul_outside_autocast(x[a:b] * half, x[c:d].T).to(torch.float32)
            idx = scaled.floor_().clamp_(-half, half - 1).add_(half).to(torch.int32)
            if c > a and lab_host[b - 1] != lab_host[c]:
                hist.impostor_counts += _bincount(idx, bins)
                continue
            # One count over 2*bins slots (impostor bins, then genuine bins), as in ScoreHistogram.add.
            slot = idx + bins * (lab[a:b, None] == lab[None, c:d])
            if c == a:  # diagonal block: strict upper triangle only (no self pairs, no pair twice)
                slot = slot[torch.ones(b - a, b - a, dtype=torch.bool, device=x.device).triu_(diagonal=1)]
            counts = _bincount(slot, 2 * bins)
            hist.impostor_counts += counts[:bins]
            hist.genuine_counts += counts[bins:]


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
    needed = math.ceil(1.0 / far - 1e-9)  # - 1e-9: float noise just above an integer must not round up
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


def kfold_accuracy(scores: np.ndarray, genuine: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """LFW-protocol accuracy: for each fold, pick the best-accuracy threshold on the *other* folds and
    measure accuracy on this fold.

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
    fold_ids = np.unique(f)
    if fold_ids.shape[0] < 2:
        raise MetricsError(f"k-fold accuracy needs at least 2 folds, got {fold_ids.shape[0]}")
    accuracies: list[float] = []
    thresholds: list[float] = []
    for fold in fold_ids:  # a handful of folds; each iteration is vectorised over pairs
        test = f == fold
        threshold, _ = best_accuracy_threshold(s[~test], g[~test])
        accuracies.append(float(np.mean((s[test] >= threshold) == g[test])))
        thresholds.append(threshold)
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "fold_thresholds": thresholds,
    }


@dataclass(frozen=True)
class PairSpec:
    """One line of an LFW-style pairs file. Images are ``<root>/<name>/<name>_<index:04d>.<ext>``.

    ``path_a``/``path_b`` are None until :func:`resolve_pair_paths` fills them in.
    """

    name_a: str
    index_a: int
    name_b: str
    index_b: int
    genuine: bool
    fold: int
    line: int  # 1-based line number in ``source``
    source: str = ""  # the pairs file, for error messages
    path_a: Path | None = None
    path_b: Path | None = None


def _parse_count(token: str) -> int | None:
    """A non-negative decimal integer, or None (ASCII digits only: str.isdigit accepts '²')."""
    return int(token) if token.isascii() and token.isdigit() else None


def _parse_pair_line(parts: list[str]) -> tuple[str, int, str, int, bool] | None:
    """``(name_a, index_a, name_b, index_b, genuine)`` from a split pair line, or None if malformed."""
    if len(parts) == 3:  # name i j: two images of one person
        name_a, idx_a, name_b, idx_b, genuine = parts[0], parts[1], parts[0], parts[2], True
    elif len(parts) == 4:  # name1 i name2 j: two people
        name_a, idx_a, name_b, idx_b, genuine = parts[0], parts[1], parts[2], parts[3], False
    else:
        return None
    index_a, index_b = _parse_count(idx_a), _parse_count(idx_b)
    if index_a is None or index_b is None:
        return None
    return name_a, index_a, name_b, index_b, genuine


def parse_lfw_pairs(path: str | Path) -> list[PairSpec]:
    """Parse an LFW ``pairs.txt``.

    Line 1 is ``<folds> <n>`` (e.g. ``10 300``; a lone ``<n>`` means one fold, as in ``pairsDevTest.txt``).
    Each fold is n genuine lines ``name i j`` then n impostor lines ``name1 i name2 j``. Folds are assigned
    by position (pair p belongs to fold ``p // (2n)``), so files that interleave genuine and impostor lines
    differently within a fold are accepted too. Blank lines are ignored. Errors are one-line ValueErrors
    naming ``file:line``.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    header = lines[0].split() if lines else []
    sizes = [_parse_count(token) for token in header]
    if len(sizes) not in (1, 2) or any(size is None or size == 0 for size in sizes):
        shown = repr(lines[0].strip()) if lines else "(empty file)"
        raise MetricsError(
            f"{path}:1: malformed header {shown}: expected '<folds> <pairs per class>', e.g. '10 300'"
        )
    n_folds, per_class = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))

    pairs: list[PairSpec] = []
    for line_no, text in enumerate(lines[1:], start=2):
        parts = text.split()
        if not parts:
            continue
        parsed = _parse_pair_line(parts)
        if parsed is None:
            raise MetricsError(
                f"{path}:{line_no}: malformed pair line {text.strip()!r}: expected 'name i j' (genuine) or "
                "'name1 i name2 j' (impostor) with non-negative integer indices"
            )
        name_a, index_a, name_b, index_b, genuine = parsed
        pairs.append(
            PairSpec(
                name_a=name_a,
                index_a=index_a,
                name_b=name_b,
                index_b=index_b,
                genuine=genuine,
                fold=len(pairs) // (2 * per_class),
                line=line_no,
                source=str(path),
            )
        )
    expected = n_folds * 2 * per_class
    if len(pairs) != expected:
        raise MetricsError(
            f"{path}:1: header {lines[0].strip()!r} promises {n_folds} folds x {2 * per_class} pairs = "
            f"{expected} pairs, but the file has {len(pairs)}"
        )
    return pairs


def resolve_pair_paths(
    pairs: Sequence[PairSpec],
    root: str | Path,
    exts: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[PairSpec]:
    """Return copies of ``pairs`` with ``path_a``/``path_b`` set to existing files under ``root``.

    Each ``(name, index)`` is looked up once, trying ``exts`` in order (and their upper-case forms). A
    missing image raises a one-line ValueError naming the pairs-file line and the expected path.
    """
    root = Path(root)
    found: dict[tuple[str, int], Path] = {}

    def lookup(name: str, index: int, pair: PairSpec) -> Path:
        key = (name, index)
        if key not in found:
            stem = f"{name}_{index:04d}"
            folder = root / name
            candidates = (folder / f"{stem}{ext}" for e in exts for ext in dict.fromkeys((e, e.upper())))
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                where = f"{pair.source}:{pair.line}" if pair.source else f"line {pair.line}"
                raise MetricsError(
                    f"{where}: image {stem} not found: expected {folder / stem}{exts[0]} "
                    f"(also tried {', '.join(exts[1:]) or 'no other extension'})"
                )
            found[key] = path
        return found[key]

    return [
        replace(
            pair,
            path_a=lookup(pair.name_a, pair.index_a, pair),
            path_b=lookup(pair.name_b, pair.index_b, pair),
        )
        for pair in pairs
    ]
