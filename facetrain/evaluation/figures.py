"""The figures of an evaluation: ROC, FAR/FRR against the threshold, genuine vs impostor score histogram.

Drawn on matplotlib's Agg canvas directly: no pyplot state, no display needed. matplotlib is imported only
when a figure is drawn (verify and identify never pay for it).
"""

from __future__ import annotations

import numpy as np

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.evaluation.bootstrap import Intervals
from facetrain.evaluation.metrics import RocCurve


def _plot_points(roc: RocCurve, points: int = 3000) -> np.ndarray:
    """Indices of ROC points to draw: a curve with millions of points looks the same with a few thousand
    taken on a log-FAR grid (the low-FAR end matters), a linear FAR grid and a linear TAR grid."""
    last = len(roc.far) - 1
    if last + 1 <= points:
        return np.arange(last + 1)
    positive = roc.far[roc.far > 0]
    low = float(positive[0]) if positive.size else 1e-12
    picks = [
        np.searchsorted(roc.far, np.geomspace(low, 1.0, points // 2), side="right") - 1,
        np.searchsorted(roc.far, np.linspace(0.0, 1.0, points // 4), side="right") - 1,
        np.searchsorted(roc.tar, np.linspace(0.0, 1.0, points // 4), side="left"),
        [0, last],
    ]
    return np.unique(np.clip(np.concatenate(picks), 0, last))


def _new_figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def roc_figure(roc: RocCurve, metrics: dict, threshold: float | None, far: float | None,
               intervals: Intervals | None = None):
    idx = _plot_points(roc)
    fig = _new_figure()
    ax = fig.add_subplot()
    if intervals is not None:  # pointwise over FAR: each FAR's TAR interval across the bootstrap replicates
        iv = intervals.as_dict()
        ax.fill_between(*intervals.tar_band(roc.n_impostor), step="post", alpha=0.25,
                        lw=0, label=f"{iv['level']:.0%} TAR band ({iv['unit']} bootstrap, "
                        f"{iv['replicates']} replicates)")
    keep = roc.far[idx] > 0
    ax.plot(roc.far[idx][keep], roc.tar[idx][keep], lw=1.5, label=f"ROC (AUC {metrics['auc']:.4f})")
    for f in DEFAULT_TARGET_FARS:
        tar = metrics.get(f"tar@far={f:.0e}")
        if tar is not None:
            ax.plot([f], [tar], "o", ms=4, color="gray")
            ax.annotate(f"{tar:.3f}", (f, tar), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if threshold is not None and far is not None:
        ax.axvline(far, ls="--", lw=1, color="tab:red", label=f"calibration FAR {far:.0e} (t = {threshold:.4f})")
    ax.set_xscale("log")
    ax.set_xlim(min(1.0, 0.5 / roc.n_impostor), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate, log scale)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(f"ROC: {roc.n_genuine:,} genuine / {roc.n_impostor:,} impostor pairs, EER {metrics['eer']:.4f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def far_frr_figure(roc: RocCurve, metrics: dict, threshold: float | None):
    idx = _plot_points(roc)
    idx = idx[np.isfinite(roc.thresholds[idx])]
    fig = _new_figure()
    ax = fig.add_subplot()
    t = roc.thresholds[idx]
    ax.plot(t, roc.far[idx], label="FAR (impostors accepted)")
    ax.plot(t, 1.0 - roc.tar[idx], label="FRR (genuine rejected)")
    ax.set_yscale("log", nonpositive="mask")
    if metrics.get("eer_threshold") is not None:
        ax.axvline(metrics["eer_threshold"], ls=":", color="gray", label=f"EER {metrics['eer']:.4f}")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="tab:red", label=f"calibrated threshold {threshold:.4f}")
    ax.set_xlabel("threshold (cosine similarity; accept if score >= threshold)")
    ax.set_ylabel("error rate (log scale)")
    ax.set_title("FAR and FRR vs threshold")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def score_histogram_figure(roc: RocCurve, threshold: float | None, bins: int = 100):
    """Genuine vs impostor score distributions, recovered from the ROC itself (each point's step in TAR/FAR
    is the number of pairs at that score), so both ROC modes plot without keeping the scores. Pairs without a
    score (failures to acquire: the ROC's closing point at threshold -inf) are not drawn."""
    scored = np.isfinite(roc.thresholds[1:])
    scores = roc.thresholds[1:][scored]
    genuine = np.diff(np.rint(roc.tar * roc.n_genuine))[scored]
    impostor = np.diff(np.rint(roc.far * roc.n_impostor))[scored]
    edges = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, bins + 1)
    fig = _new_figure()
    ax = fig.add_subplot()
    for counts, total, label in ((impostor, roc.n_impostor, "impostor"), (genuine, roc.n_genuine, "genuine")):
        hist, _ = np.histogram(scores, bins=edges, weights=counts / total)
        ax.stairs(hist, edges, fill=True, alpha=0.45, label=f"{label} ({total:,} pairs)")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="tab:red", label=f"calibrated threshold {threshold:.4f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of pairs per bin")
    ax.set_title("Genuine vs impostor scores")
    ax.legend(fontsize=8)
    return fig


def make_figures(roc: RocCurve, metrics: dict, threshold: float | None, far: float | None,
                 intervals: Intervals | None = None) -> dict:
    return {
        "roc.png": roc_figure(roc, metrics, threshold, far, intervals),
        "far_frr.png": far_frr_figure(roc, metrics, threshold),
        "scores.png": score_histogram_figure(roc, threshold),
    }

