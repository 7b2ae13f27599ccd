"""The teacher audits a labelled face folder: likely mislabels and likely duplicate identities, from embeddings.

Numpy only (torch-free); `python -m facetrain.audit` embeds the images with a teacher (deploy/teacher.py) and
calls `audit`. All scores are cosines of L2-normalised embeddings.

Likely mislabel: image i of identity c is scored against c's centroid computed WITHOUT i and robustly: the
centroid of c's "core", the `core_fraction` of its other images with the highest median cosine to the rest of c
(a mislabelled image has a low median cosine, so it never enters the core and cannot drag the centroid). i is
flagged when its score is below `max_cosine` (an absolute cut: the teacher does not call it the same person)
AND more than `margin` below the median score of c's images (a relative cut: identities whose photos are all
hard -- profile, blur -- are not flagged wholesale). For each flagged image the nearest other identity's
centroid is named when it is closer than i's own: the likely right label.

Likely duplicate: two identities whose core centroids have a cosine above `duplicate_cosine` (one person
under two names). Identities with a single image get no score (nothing to compare with) but take part in the
duplicate search.

What training should leave out (`exclude`, read by `data.exclude`, config/exclusions.py): every flagged image,
and for each duplicate pair the smaller identity (fewer images; ties: the later name). Leaving one out rather
than merging: a false alarm (two look-alike people) then costs a few images instead of planting wrong labels.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facetrain.config.exclusions import AUDIT_FORMAT, AUDIT_VERSION
from facetrain.errors import UserError

REPORT_JSON = "audit.json"
REPORT_TEXT = "audit.txt"
MIN_CORE_FRACTION = 0.01  # a centroid of at least one image is ensured anyway; 0 would mean "no centroid"
# threshold -> (its option, lowest, highest value)
THRESHOLD_RANGES = {"max_cosine": ("--max-cosine", -1.0, 1.0), "margin": ("--margin", 0.0, 2.0),
                    "duplicate_cosine": ("--duplicate-cosine", -1.0, 1.0),
                    "core_fraction": ("--core-fraction", MIN_CORE_FRACTION, 1.0)}


@dataclass(frozen=True)
class AuditThresholds:
    """The cuts (cosines). Defaults measured with SFace on att_faces and celeba_299 (docs/recipes.md)."""

    max_cosine: float = 0.25
    """An image is a likely mislabel only if its cosine to its identity's centroid is below this..."""
    margin: float = 0.2
    """...and this far below the median cosine of its identity's images."""
    duplicate_cosine: float = 0.7
    """Two identities whose centroids have a cosine above this are a likely duplicate pair."""
    core_fraction: float = 0.5
    """Fraction of an identity's other images (the most typical) its leave-one-out centroid is made of."""

    def check(self) -> None:
        """One line naming the option of a value outside its range."""
        for name, (option, lo, hi) in THRESHOLD_RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise UserError(f"{option}: must be in [{lo:g}, {hi:g}], got {value:g}")


def checked_folder(root: str, max_image_pixels: int, bad_images: str, progress: bool = True):
    """(paths, labels, names, refused) of root/<identity>/<image> after the pre-flight's decode check: refused
    files stop the audit (bad_images "error", one line) or are left out (listed in `refused`); identities left
    without a usable image drop out and the labels are renumbered."""
    from facetrain.data.faceset import scan_identity_folder
    from facetrain.data.preflight import check_files, enforce

    paths, labels, names = scan_identity_folder(root, "--data")
    pre = check_files(paths, max_image_pixels, root, progress=progress)
    enforce(pre, bad_images, policy_key="--bad-images")
    keep = np.asarray([p not in pre.bad_paths for p in paths])
    used = np.unique(labels[keep])
    remap = np.full(len(names), -1)
    remap[used] = np.arange(len(used))
    return [p for p, k in zip(paths, keep, strict=True) if k], remap[labels[keep]], [names[i] for i in used], pre.bad


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _typicality(e: np.ndarray) -> np.ndarray:
    """Per image of one identity: the median cosine to its other images (robust to a few bad ones)."""
    sims = e @ e.T
    np.fill_diagonal(sims, np.nan)
    return np.nanmedian(sims, axis=1)


def identity_scores(e: np.ndarray, core_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One identity's (n, D) embeddings -> (leave-one-out score per image, the identity's core centroid).
    A single image gets the score NaN."""
    n = len(e)
    if n < 2:
        return np.full(n, np.nan), _normalise(e.sum(axis=0))
    order = np.argsort(-_typicality(e), kind="stable")  # most typical first
    core = max(1, math.ceil(core_fraction * (n - 1)))  # images per leave-one-out centroid
    scores = np.empty(n)
    for i in range(n):
        others = order[order != i][:core]
        scores[i] = float(e[i] @ _normalise(e[others].sum(axis=0)))
    return scores, _normalise(e[order[:max(1, math.ceil(core_fraction * n))]].sum(axis=0))


def _mislabels(scores, labels, centroids, emb, names, paths, th: AuditThresholds) -> list[dict]:
    flagged = []
    for c in range(len(names)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        median = float(np.median(scores[idx]))
        for i in idx:
            if not (scores[i] < th.max_cosine and scores[i] < median - th.margin):
                continue
            to_others = centroids @ emb[i]
            to_others[c] = -np.inf
            best = int(np.argmax(to_others))
            closer = float(to_others[best]) > scores[i]
            flagged.append({"path": paths[i], "identity": names[c], "cosine": round(float(scores[i]), 4),
                            "identity_median": round(median, 4), "nearest_identity": names[best],
                            "nearest_cosine": round(float(to_others[best]), 4), "likely_label": names[best]
                            if closer else None})
    return sorted(flagged, key=lambda f: f["cosine"])


def _closest_pair(sims: np.ndarray, names: list[str]) -> dict | None:
    """The two identities whose centroids are closest, flagged or not (how near the duplicate cut the set is)."""
    if len(names) < 2:
        return None
    upper = np.where(np.triu(np.ones_like(sims, dtype=bool), k=1), sims, -np.inf)
    i, j = np.unravel_index(int(np.argmax(upper)), sims.shape)
    return {"identities": [names[i], names[j]], "cosine": round(float(sims[i, j]), 4)}


def _duplicates(sims, counts, names, th: AuditThresholds) -> list[dict]:
    a, b = np.nonzero(np.triu(sims > th.duplicate_cosine, k=1))
    pairs = []
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        drop = j if counts[j] <= counts[i] else i  # the smaller identity; a tie: the later name
        pairs.append({"identities": [names[i], names[j]], "images": [int(counts[i]), int(counts[j])],
                      "cosine": round(float(sims[i, j]), 4), "left_out": names[drop]})
    return sorted(pairs, key=lambda p: -p["cosine"])


def audit(emb: np.ndarray, labels: np.ndarray, names: list[str], paths: list[str],
          thresholds: AuditThresholds = AuditThresholds()) -> dict:
    """The findings for (N, D) L2-normalised embeddings with identity `labels` (0..len(names)-1) of `paths`:
    {"mislabels": [...], "duplicates": [...], "scores": per-image score summary, "thresholds": ...}."""
    scores = np.full(len(labels), np.nan)
    centroids = np.zeros((len(names), emb.shape[1]))
    counts = np.bincount(labels, minlength=len(names))
    for c in range(len(names)):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            scores[idx], centroids[c] = identity_scores(emb[idx], thresholds.core_fraction)
    scored = scores[np.isfinite(scores)]
    quantiles = {f"p{q}": round(float(np.percentile(scored, q)), 4) for q in (1, 5, 50)} if len(scored) else {}
    return {"images": int(len(labels)), "identities": int(len(names)),
            "score_quantiles": quantiles, "thresholds": asdict(thresholds),
            "mislabels": _mislabels(scores, labels, centroids, emb, names, paths, thresholds),
            "closest_identities": _closest_pair(centroids @ centroids.T, names),
            "duplicates": _duplicates(centroids @ centroids.T, counts, names, thresholds)}


def exclusions(findings: dict, labels: np.ndarray, names: list[str], paths: list[str], root: str) -> list[str]:
    """The paths (relative to `root`) training should leave out: the flagged images and every image of the
    identity left out of each duplicate pair."""
    drop = {f["path"] for f in findings["mislabels"]}
    gone = {names.index(p["left_out"]) for p in findings["duplicates"]}
    drop.update(p for p, c in zip(paths, labels.tolist(), strict=True) if c in gone)
    return sorted(Path(p).relative_to(root).as_posix() for p in drop)


def report(findings: dict, root: str, teacher: dict, exclude: list[str], skipped: list[dict]) -> dict:
    """audit.json's content: paths relative to `root` (data.exclude resolves them against data.root)."""
    def rel(p: str) -> str:
        return Path(p).relative_to(root).as_posix()

    mislabels = [{**f, "path": rel(f["path"])} for f in findings["mislabels"]]
    return {"format": AUDIT_FORMAT, "version": AUDIT_VERSION, "root": str(root), "teacher": teacher,
            **{k: v for k, v in findings.items() if k != "mislabels"}, "mislabels": mislabels,
            "skipped": skipped, "exclude": exclude}


def text(rep: dict, listed: int | None = None) -> str:
    """The plain-text report (audit.txt; the command prints it with `listed` rows per list)."""
    out = io.StringIO()
    th = rep["thresholds"]
    t = rep["teacher"]
    out.write(f"facetrain.audit: {rep['root']}: {rep['images']:,} images, {rep['identities']:,} identities\n"
              f"teacher: {t['description']} (sha256 {t['sha256'][:16]}...)\n"
              f"cosine to own identity (leave-one-out core centroid): {rep['score_quantiles']}\n")
    out.write(f"\nlikely mislabels ({len(rep['mislabels'])}): cosine < {th['max_cosine']:g} and < identity median "
              f"- {th['margin']:g}\n")
    for f in rep["mislabels"][:listed]:
        better = f"likely {f['likely_label']} ({f['nearest_cosine']:.3f})" if f["likely_label"] else \
            f"nearest other: {f['nearest_identity']} ({f['nearest_cosine']:.3f})"
        out.write(f"  {f['path']}  cosine {f['cosine']:.3f} (identity median {f['identity_median']:.3f}); {better}\n")
    out.write(f"\nlikely duplicate identities ({len(rep['duplicates'])}): centroid cosine > "
              f"{th['duplicate_cosine']:g}\n")
    if rep["closest_identities"]:
        pair = rep["closest_identities"]
        out.write(f"  (closest two identities: {' ~ '.join(pair['identities'])}, cosine {pair['cosine']:.3f})\n")
    for p in rep["duplicates"][:listed]:
        (a, b), (na, nb) = p["identities"], p["images"]
        out.write(f"  {a} ({na}) ~ {b} ({nb})  cosine {p['cosine']:.3f}; data.exclude leaves out {p['left_out']}\n")
    if rep["skipped"]:
        out.write(f"\nnot embedded (pre-flight, --bad-images skip): {len(rep['skipped'])}\n")
    out.write(f"\ndata.exclude with this audit.json leaves out {len(rep['exclude'])} image(s)\n")
    return out.getvalue()


def write(rep: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(rep, indent=2))
    (out / REPORT_TEXT).write_text(text(rep))
    return out / REPORT_JSON
