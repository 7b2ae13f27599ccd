"""Bootstrap confidence intervals for the verification figures (numpy only).

The sampling unit is what was drawn at random when the test set was collected:

* **all pairs of a labelled folder**: the *identities*. A genuine pair belongs to its identity; an impostor pair
  (i, j) belongs to both, so a replicate that draws identity i w_i times and j w_j times counts it w_i * w_j
  times. Pairs of one person share that person's face, so they are not independent: resampling pairs instead
  makes the intervals too narrow (tests/test_bootstrap.py measures it).
* **a pairs file** (LFW protocol): the listed *pairs*, resampled within each (fold, genuine/impostor) stratum,
  so every replicate keeps the protocol's fold sizes and its genuine/impostor balance.

Cost: a replicate never re-scores a pair. The pairs are counted once, per unit (or pair of units), at a grid of
thresholds (:class:`UnitCounts`, built from scores by the accumulator here or by `scoring.all_pairs_unit_counts`);
a replicate is then a weighted sum of those counts (impostors: a quadratic form in the unit weights), all
replicates at once with matrix products. With more identities than ``MAX_UNITS`` the identities are dealt at
random (seeded) into ``MAX_UNITS`` groups of near-equal size and the groups are resampled: groups of
independently drawn people are themselves independent, so the bootstrap stays valid with MAX_UNITS units.

Thresholds: the grid holds the ROC's thresholds at ``GRID_FARS`` log-spaced FARs and ``GRID_TARS`` evenly spaced
TARs plus every threshold reported (TAR@FAR, the calibrated one), so a replicate with every weight 1 gives the
reported TAR@FAR and delivered FAR exactly. AUC and EER on the grid differ slightly from their full-resolution
values; every interval is shifted by that (all-weights-1) grid offset.

Interval: the expanded percentile interval (:func:`tail_probability`): the replicates' quantiles, the tails
narrowed for few units, where the plain percentile interval is known to be too narrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from facetrain.errors import UserError
from facetrain.evaluation.metrics import RocCurve, far_needed

#: At most this many resampling units: (U, U, thresholds) float64 impostor counts are 256 * 256 * 8 bytes = 0.5 MiB
#: per threshold (~60 MiB for a grid of ~115), and the replicates cost replicates * U^2 multiply-adds per threshold.
MAX_UNITS = 256
GRID_FARS = 64  # log-spaced FAR points of the threshold grid, from 1 / n_impostor to 1
GRID_TARS = 48  # evenly spaced TAR points of the threshold grid
BAND_POINTS = 200  # FARs (log-spaced) at which roc.png's TAR band is drawn
DEFAULT_REPLICATES = 1000
DEFAULT_LEVEL = 0.95
_CHUNK = 8  # thresholds per matrix product in the impostor quadratic form: bounds the R x U x chunk temporary


def min_replicates(level: float) -> int:
    """Fewest replicates for a `level` interval: each tail must hold at least one replicate."""
    return math.ceil(2.0 / (1.0 - level) - 1e-9)


def tail_probability(level: float, n_units: int) -> float:
    """Probability in each tail of the replicates left outside a `level` interval from `n_units` resampled units:
    the expanded percentile interval (Hesterberg 2015, "What teachers should know about the bootstrap"). The
    plain percentile interval is too narrow for few units: the bootstrap's spread is sqrt((n-1)/n) of the true
    one, and it takes a normal quantile where Student's t with n-1 degrees of freedom is due. Widening the tails
    by both leaves (1 - level) / 2 for many units, e.g. 0.0226 instead of 0.025 at 80 units, 0.004 at 7."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    nu = max(n_units - 1, 1)
    # Student's t quantile from z by its Cornish-Fisher expansion (within 0.2% of the exact one from nu = 5)
    t = (z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3))
    return NormalDist().cdf(-math.sqrt(n_units / nu) * t)


def check_bootstrap_options(replicates: int, level: float) -> None:
    """One-line UserErrors for --bootstrap and --ci-level."""
    if not 0.5 <= level <= 0.999:
        raise UserError(f"--ci-level: must be in [0.5, 0.999], e.g. 0.95; got {level}")
    if replicates != 0 and replicates < min_replicates(level):
        raise UserError(f"--bootstrap: {replicates} replicates are too few for a {level:g} interval: use 0 (off) "
                        f"or >= {min_replicates(level)} (default {DEFAULT_REPLICATES})")


# ----------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True, eq=False)
class UnitCounts:
    """Pair counts per resampling unit at a descending threshold grid whose last entry is -inf (all pairs).

    ``genuine[u, k]`` / ``within[u, k]``: genuine / impostor pairs that belong to unit u alone with score >=
    ``thresholds[k]``; ``between[u, v, k]`` (symmetric, zero diagonal, or None): impostor pairs between units
    u != v; ``strata[u]``: units are resampled within their stratum.
    """

    thresholds: np.ndarray  # (T,) float64, descending, thresholds[-1] == -inf
    genuine: np.ndarray  # (U, T) float64
    within: np.ndarray  # (U, T) float64
    between: np.ndarray | None  # (U, U, T) float64
    strata: np.ndarray  # (U,) int64
    unit: Literal["identity", "pair"]
    n_identities: int  # identities behind the units (pairs: people named in the pairs, or 0 when unknown)


def threshold_grid(roc: RocCurve, fixed: list[float | None]) -> np.ndarray:
    """Descending grid: the ROC's thresholds at GRID_FARS log-spaced FARs and GRID_TARS TARs, every threshold in
    `fixed` (None ignored), then -inf. Only the ROC's own thresholds, so counts at them are exact."""
    finite = np.isfinite(roc.thresholds)
    far, tar, thr = roc.far[finite], roc.tar[finite], roc.thresholds[finite]
    fars = np.geomspace(1.0 / roc.n_impostor, 1.0, GRID_FARS)
    at_far = np.clip(np.searchsorted(far, fars * (1 + 1e-12), side="right") - 1, 0, len(thr) - 1)
    at_tar = np.clip(np.searchsorted(tar, np.linspace(0.0, 1.0, GRID_TARS), side="left"), 0, len(thr) - 1)
    picked = np.concatenate([thr[at_far], thr[at_tar], [t for t in fixed if t is not None]])
    return np.concatenate([np.unique(picked)[::-1], [-np.inf]])


def identity_units(labels: np.ndarray, seed: int, max_units: int = MAX_UNITS) -> tuple[np.ndarray, int]:
    """(unit of each image, number of units): one unit per identity, or identities dealt at random (seeded)
    into `max_units` groups when there are more."""
    _, identity = np.unique(np.asarray(labels), return_inverse=True)
    n_ids = int(identity.max()) + 1
    if n_ids <= max_units:
        return identity.astype(np.int64), n_ids
    group = np.empty(n_ids, dtype=np.int64)
    group[np.random.default_rng(seed).permutation(n_ids)] = np.arange(n_ids) % max_units
    return group[identity], max_units


def cumulative(bin_counts: np.ndarray) -> np.ndarray:
    """Counts per bin (last axis: bin i holds the scores with exactly i finite thresholds <= score) -> counts with
    score >= thresholds[k]."""
    return np.cumsum(bin_counts[..., ::-1], axis=-1)


class UnitPairAccumulator:
    """Sums blocks of grid bins into per-unit counts: impostor pairs per (unit, unit), genuine pairs per unit
    (a genuine pair's two images are one person, so one unit). `scoring.all_pairs_unit_counts` feeds it."""

    def __init__(self, n_units: int, thresholds: np.ndarray) -> None:
        self.n_units, self.thresholds = n_units, thresholds
        self.n_bins = len(thresholds)
        # float64: counts are exact up to 2**53, and the replicates' products need float64 anyway
        self.impostor = np.zeros((n_units, n_units, self.n_bins), dtype=np.float64)
        self.genuine = np.zeros((n_units, self.n_bins), dtype=np.float64)

    def add_local(self, local: np.ndarray, lo_a: int, lo_b: int) -> None:
        """Add one block's counts, `local` of shape (2 [impostor, genuine], units a, units b, bins), whose row units
        start at `lo_a` and column units at `lo_b` (rows are sorted by unit, so a block touches a few units)."""
        na, nb = local.shape[1:3]
        self.impostor[lo_a : lo_a + na, lo_b : lo_b + nb] += local[0]
        both = np.arange(max(lo_a, lo_b), min(lo_a + na, lo_b + nb))  # units on both sides of the block
        self.genuine[both] += local[1][both - lo_a, both - lo_b]  # genuine pairs: one person, so one unit

    def unit_counts(self, n_identities: int) -> UnitCounts:
        impostor = cumulative(self.impostor)
        impostor += impostor.transpose(1, 0, 2)  # each unordered pair was counted once, as (a, b) or (b, a)
        diag = np.arange(self.n_units)
        within = impostor[diag, diag] / 2  # the symmetrisation counted the diagonal twice
        impostor[diag, diag] = 0.0
        return UnitCounts(self.thresholds, cumulative(self.genuine), within, impostor if self.n_units > 1 else None,
                          np.zeros(self.n_units, dtype=np.int64), "identity", n_identities)


def _pairs_of(n: np.ndarray) -> np.ndarray:
    return n * (n - 1) / 2


def add_rejected_identity_pairs(counts: UnitCounts, labels: np.ndarray, units: np.ndarray,
                                acquired: np.ndarray) -> None:
    """Add, in place, the pairs that use an image failing to acquire (`acquired` False) as pairs accepted at no
    threshold: they count only in the last column (-inf, all pairs), so they lower TAR and FAR as --fta nonmatch
    scores them. Per identity i with a_i images of which o_i acquired, C(a_i, 2) - C(o_i, 2) genuine pairs were
    lost; between two units u != v, A_u*A_v - O_u*O_v impostor pairs (A, O: the units' image totals)."""
    ids, identity = np.unique(np.asarray(labels), return_inverse=True)
    a = np.bincount(identity, minlength=len(ids)).astype(np.float64)
    o = np.bincount(identity[acquired], minlength=len(ids)).astype(np.float64)
    unit_of = np.zeros(len(ids), dtype=np.int64)
    unit_of[identity] = units  # every image of an identity is in the same unit
    n_units = counts.genuine.shape[0]
    lost_genuine = np.bincount(unit_of, _pairs_of(a) - _pairs_of(o), minlength=n_units)
    big_a = np.bincount(unit_of, a, minlength=n_units)
    big_o = np.bincount(unit_of, o, minlength=n_units)
    same_unit = lambda n, big: _pairs_of(big) - np.bincount(unit_of, _pairs_of(n), minlength=n_units)  # noqa: E731
    counts.genuine[:, -1] += lost_genuine
    counts.within[:, -1] += same_unit(a, big_a) - same_unit(o, big_o)
    if counts.between is not None:
        lost = np.outer(big_a, big_a) - np.outer(big_o, big_o)
        np.fill_diagonal(lost, 0.0)
        counts.between[:, :, -1] += lost


def pair_unit_counts(scores: np.ndarray, genuine: np.ndarray, folds: np.ndarray | None,
                     thresholds: np.ndarray, n_identities: int = 0) -> UnitCounts:
    """Every listed pair its own unit, stratified by (fold, genuine/impostor)."""
    g = np.asarray(genuine, dtype=bool)
    above = (np.asarray(scores, dtype=np.float64)[:, None] >= thresholds[None, :]).astype(np.float64)
    fold = np.zeros(len(g), dtype=np.int64) if folds is None else np.unique(folds, return_inverse=True)[1]
    return UnitCounts(thresholds, above * g[:, None], above * ~g[:, None], None, fold * 2 + g, "pair", n_identities)


# ------------------------------------------------------------------------------------------- replicates


def replicate_weights(strata: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, U) multiplicities: each stratum's units drawn with replacement, as many as it has."""
    weights = np.zeros((replicates, len(strata)), dtype=np.float64)
    rows = np.arange(replicates)[:, None]
    for s in np.unique(strata):  # a handful of strata (pairs files: 2 x folds)
        members = np.flatnonzero(strata == s)
        n = len(members)
        # uniform draws counted per row (one bincount over all rows): the multinomial, ~30x faster than
        # Generator.multinomial with a thousand categories
        drawn = rng.integers(0, n, size=(replicates, n)) + rows * n
        weights[:, members] = np.bincount(drawn.reshape(-1), minlength=replicates * n).reshape(replicates, n)
    return weights


def weighted_rates(counts: UnitCounts, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(far, tar), each (R, T): the rates at every grid threshold for each row of unit weights."""
    genuine = weights @ counts.genuine
    impostor = weights @ counts.within
    if counts.between is not None:
        u, t = counts.between.shape[1:]
        for k in range(0, t, _CHUNK):
            block = counts.between[:, :, k : k + _CHUNK]
            product = (weights @ block.reshape(u, -1)).reshape(len(weights), u, -1)
            impostor[:, k : k + _CHUNK] += 0.5 * np.einsum("ru,ruk->rk", weights, product)
    with np.errstate(invalid="ignore", divide="ignore"):  # a replicate may draw no genuine pair at all
        return impostor / impostor[:, -1:], genuine / genuine[:, -1:]


# ---------------------------------------------------------------------------------------------- metrics


def tar_at_far(far: np.ndarray, tar: np.ndarray, target: float) -> np.ndarray:
    """Per row: the largest TAR at a grid point with FAR <= target (rows ascending in FAR, first point 0)."""
    last = (far <= target * (1.0 + 1e-12)).sum(axis=1) - 1
    return tar[np.arange(len(tar)), np.maximum(last, 0)]


def auc(far: np.ndarray, tar: np.ndarray) -> np.ndarray:
    """Trapezoid area per row (rows start at the (0, 0) point)."""
    return np.sum(np.diff(far, axis=1) * (tar[:, 1:] + tar[:, :-1]) / 2, axis=1)


def eer(far: np.ndarray, tar: np.ndarray) -> np.ndarray:
    """Per row: FAR where FAR = FRR, interpolated between the grid points that bracket it (as metrics._eer)."""
    diff = far - (1.0 - tar)
    i = np.maximum(np.argmax(diff >= 0, axis=1), 1)
    rows = np.arange(len(far))
    d0, d1 = diff[rows, i - 1], diff[rows, i]
    w = np.where(d1 > d0, -d0 / np.where(d1 > d0, d1 - d0, 1.0), 1.0)
    return far[rows, i - 1] + w * (far[rows, i] - far[rows, i - 1])


def with_origin(far: np.ndarray, tar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of grid rates with the reject-everything point (0, 0) in front, as an ROC starts."""
    zero = np.zeros((len(far), 1))
    return np.hstack([zero, far]), np.hstack([zero, tar])


@dataclass(frozen=True, eq=False)
class Intervals:
    """Bootstrap intervals (`summary`: metrics.json's `intervals`) and the replicates' grid ROCs for the band."""

    summary: dict
    far: np.ndarray  # (R, T + 1) each replicate's FAR at the grid thresholds, the (0, 0) point first
    tar: np.ndarray  # (R, T + 1)

    def as_dict(self) -> dict:
        return self.summary

    def tar_band(self, n_impostor: int, points: int = BAND_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fars, low, high): pointwise over `points` log-spaced FARs, the interval of TAR at that FAR."""
        fars = np.geomspace(1.0 / n_impostor, 1.0, points)
        tars = np.stack([tar_at_far(self.far, self.tar, f) for f in fars], axis=1)
        tail = self.summary["tail"]
        low, high = np.nanquantile(tars, [tail, 1.0 - tail], axis=0)
        return fars, low, high


def _interval(point: float | None, grid_point: np.ndarray, replicates: np.ndarray, tail: float) -> list | None:
    """Percentile interval of the replicates (`tail` left out on each side), shifted by the grid offset
    (point - grid_point); None if undefined."""
    values = replicates[np.isfinite(replicates)]
    if point is None or values.size == 0:
        return None
    lo, hi = np.quantile(values, [tail, 1.0 - tail]) + (point - float(grid_point[0]))
    return [float(np.clip(lo, 0.0, 1.0)), float(np.clip(hi, 0.0, 1.0))]


def bootstrap_intervals(counts: UnitCounts, metrics: dict, target_fars: list[float], threshold: float | None,
                        replicates: int, level: float, seed: int) -> Intervals:
    """The intervals of `metrics` (from `metrics.verification_metrics` on the same pairs) for AUC, EER, TAR at
    each of `target_fars` and, for the calibrated `threshold` (kept fixed), the FAR and TAR it delivers."""
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones((1, counts.genuine.shape[0])),
                         replicate_weights(counts.strata, replicates, rng)])
    far, tar = with_origin(*weighted_rates(counts, weights))
    point, reps = slice(0, 1), slice(1, None)
    # the smallest stratum sets the small-sample widening (pairs files: hundreds of pairs, so hardly any)
    tail = tail_probability(level, int(np.unique(counts.strata, return_counts=True)[1].min()))
    iv = {}
    for name, values in (("auc", auc(far, tar)), ("eer", eer(far, tar))):
        iv[name] = _interval(metrics[name], values[point], values[reps], tail)
    iv["tar_at_far"] = {}
    for f in target_fars:
        values = tar_at_far(far, tar, f)
        resolvable = metrics["n_impostor"] >= far_needed(f)
        iv["tar_at_far"][f"{f:.0e}"] = _interval(metrics.get(f"tar@far={f:.0e}") if resolvable else None,
                                                 values[point], values[reps], tail)
    iv["delivered_far"] = iv["tar_at_threshold"] = None
    if threshold is not None:
        k = 1 + int(np.flatnonzero(counts.thresholds == threshold)[0])  # +1: the origin column
        iv["delivered_far"] = _interval(float(far[0, k]), far[point, k], far[reps, k], tail)
        iv["tar_at_threshold"] = _interval(float(tar[0, k]), tar[point, k], tar[reps, k], tail)
    summary = {"level": level, "method": "expanded percentile", "tail": tail, "replicates": replicates,
               "unit": counts.unit, "units": int(counts.genuine.shape[0]),
               "identities": counts.n_identities, "seed": seed, "threshold": threshold,
               "grid_thresholds": int(len(counts.thresholds)), **iv}
    return Intervals(summary, far[reps], tar[reps])
