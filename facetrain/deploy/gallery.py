"""A gallery of known people: enrolment (through its cache on disk, `deploy.gallery_cache`), identity ranking
and rank-k rates.

One implementation for `facetrain.identify` and the service's POST /identify, in numpy (never torch): an
embedder from either backend (`evaluation.embedding.Embedder`, `deploy.onnx_embedder.OnnxEmbedder`) embeds
the images, and the gallery keeps them as a (N, D) float32 array.

Enrolment runs eval's pre-flight on every file (`data.preflight.check_files`: zero-byte, not an image,
truncated, too large) and records every photo without a usable face while embedding; all of them are named in
one line (`bad_images` "error"), or left out and counted in one line (`skip`, listed in `Gallery.skipped`).

Ranking: an identity's score is its best-matching image's cosine similarity. Identities with equal scores
keep the gallery's order (identity index, i.e. folder names sorted), and within an identity the first of
equally scoring images is reported, so equal scores always rank the same way.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facetrain.alignment.recipe import incomplete_alignment
from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.deploy import gallery_cache
from facetrain.errors import UserError

LIST_IN_LOG = 20  # photos named in the one-line "left out" message (all of them are in Gallery.skipped)
RATE_BLOCK = 4096  # probes scored at a time by identification_rates: (block x identities) float64 in memory

Scan = tuple[list[str], np.ndarray, list[str]]  # image paths, identity index per image, identity names


def _stderr(message: str) -> None:
    print(f"facetrain: {message}", file=sys.stderr, flush=True)


@dataclass
class Gallery:
    root: str
    paths: list[str]
    labels: np.ndarray  # (N,) identity index of each image
    names: list[str]  # identity index -> name
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    cache_file: Path | None = None
    cache_status: str = "off"  # "hit", "built", "stale: <why>, rebuilt", "off"; "(not saved)" appended
    skipped: list[dict] = field(default_factory=list)
    """Photos left out under bad_images "skip": {"path", "problem", "detail"} (undecodable or faceless)."""


# ----------------------------------------------------------------------------------------------------------
# Enrolment


def _preflight(paths: list[str], max_image_pixels: int, what: str) -> list[dict]:
    """eval's decode check of every gallery file: the refused ones, {"path", "problem", "detail"}."""
    from facetrain.data.preflight import check_files

    return check_files(paths, max_image_pixels, what, progress=False).bad


def _embed(embedder, paths: list[str], align: bool) -> tuple[np.ndarray, list[dict]]:
    """(embeddings of the photos with a usable face, the photos without one as {"path", "problem", "detail"})."""
    if not paths:  # every file refused by the pre-flight: nothing to embed (enrol then says so)
        return np.zeros((0, 0), dtype=np.float32), []
    emb = np.asarray(embedder.embed(paths, align=align, record_failures=True), dtype=np.float32)  # torch: a tensor
    failed = embedder.last_failures
    keep = np.ones(len(paths), dtype=bool)
    keep[[r["index"] for r in failed]] = False
    return emb[keep], [{"path": r["path"], "problem": r["status"], "detail": r["reason"]} for r in failed]


def _refuse(root: str, skipped: list[dict], max_image_pixels: int) -> UserError:
    from facetrain.data.preflight import PreflightReport

    report = PreflightReport(root, max_image_pixels, bad=sorted(skipped, key=lambda b: b["path"]))
    return UserError(report.error_message(remedy="pass --bad-images skip to enrol the gallery without them"))


def _left_out(root: str, skipped: list[dict], total: int) -> str:
    """The one-line count of photos left out under --bad-images skip, by problem, naming the first ones."""
    counts = ", ".join(f"{n} {problem}" for problem, n in sorted(Counter(b["problem"] for b in skipped).items()))
    names = ", ".join(b["path"] for b in skipped[:LIST_IN_LOG])
    more = f" and {len(skipped) - LIST_IN_LOG} more" if len(skipped) > LIST_IN_LOG else ""
    return f"gallery {root}: left out {len(skipped)} of {total} photos (--bad-images skip: {counts}): {names}{more}"


def _without(scan: Scan, drop: set[str]) -> Scan:
    """`scan` minus the paths in `drop`; identities left without a photo disappear, labels renumbered in order."""
    paths, labels, names = scan
    keep = np.array([p not in drop for p in paths], dtype=bool)
    used = np.unique(labels[keep])
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return [p for p, k in zip(paths, keep, strict=True) if k], remap[labels[keep]], [names[i] for i in used]


@dataclass
class _Enrolment:
    """How to enrol one gallery (the options of identify and serve)."""

    embedder: object
    root: Path
    align: bool
    """False: the folder holds facetrain.align crops cut with the model's recipe, embedded as they are."""
    bad_images: str
    max_image_pixels: int
    log: Callable[[str], None]

    def embed(self, paths: list[str]) -> tuple[np.ndarray, list[dict]]:
        """Check every file, embed the decodable ones; stop with every unusable photo named (error) or return
        (embeddings of the usable ones, the photos left out) (skip)."""
        bad = _preflight(paths, self.max_image_pixels, str(self.root))
        refused = {b["path"] for b in bad}
        emb, faceless = _embed(self.embedder, [p for p in paths if p not in refused], self.align)
        skipped = sorted(bad + faceless, key=lambda b: b["path"])
        self.refuse(skipped)
        return emb, skipped

    def refuse(self, skipped: list[dict]) -> None:
        if skipped and self.bad_images == "error":
            raise _refuse(str(self.root), skipped, self.max_image_pixels)

    def through_cache(self, scan: Scan, cache_dir: str | Path) -> tuple[np.ndarray, list[dict], Path | None, str]:
        """(embeddings, photos left out, cache file or None when not saved, cache status)."""
        fingerprint = gallery_cache.model_fingerprint(self.embedder)
        files = gallery_cache.CacheFiles.of(cache_dir, self.root, fingerprint)
        key = (fingerprint, self.root, self.embedder.path, not self.align, self.max_image_pixels, scan[2],
               gallery_cache.file_entries(self.root, scan[0]))
        found, reason = gallery_cache.read(files, gallery_cache.manifest(*key, []), self.root)
        status = gallery_cache.status(reason)
        if found is not None:
            self.refuse(found[1])
            return *found, files.tensors, status
        emb, skipped = self.embed(scan[0])
        try:
            gallery_cache.write(files, emb, gallery_cache.manifest(*key, skipped))
        except OSError as err:  # the cache is lost, never the enrolment
            self.log(f"warning: cannot write the gallery cache in {files.tensors.parent} ({err.strerror or err}); "
                     "set --cache-dir to a writable folder")
            return emb, skipped, None, status + " (not saved)"
        return emb, skipped, files.tensors, status


def enrol(embedder, root: str | Path, scan: Scan, cache_dir: str | Path | None = None, bad_images: str = "error",
          max_image_pixels: int = MAX_IMAGE_PIXELS, log: Callable[[str], None] = _stderr) -> Gallery:
    """The gallery `root` (`scan`: its image paths, identity index per image, identity names) embedded by
    `embedder`, every unusable photo named at once (`bad_images` "error") or left out and counted ("skip");
    through the cache in `cache_dir` when one is given (None: no cache)."""
    name, root = str(root), Path(root)  # the folder as given names it in answers
    warning = incomplete_alignment(root)
    if warning:
        log(warning)
    # before the cache: crops cut with another recipe than the model's are refused even when cached
    align = not embedder.aligned_folder(root, "--gallery")  # crops of facetrain.align with the model's recipe
    job = _Enrolment(embedder, root, align, bad_images, max_image_pixels, log)
    if cache_dir is None:
        (emb, skipped), cache_file, status = job.embed(scan[0]), None, "off"
    else:
        emb, skipped, cache_file, status = job.through_cache(scan, cache_dir)
    if skipped:
        log(_left_out(name, skipped, len(scan[0])))
    kept = _without(scan, {b["path"] for b in skipped})
    if not kept[0]:
        raise UserError(f"--gallery: no usable photo in {name} (all {len(scan[0])} left out): add photos with "
                        "one clearly visible face")
    return Gallery(name, *kept, emb, cache_file, status, skipped)


# ----------------------------------------------------------------------------------------------------------
# Identification


def rank_identities(gallery: Gallery, probes: np.ndarray, top_k: int) -> list[list[dict]]:
    """Per probe ((P, D) embeddings): the top_k identities by best-image cosine similarity, each with that
    image. Equal scores: the lower identity index first, the first of equally scoring images."""
    probes = np.asarray(probes, dtype=np.float64).reshape(-1, gallery.embeddings.shape[1])
    scores = probes @ gallery.embeddings.astype(np.float64).T  # (P, N) cosines
    labels = np.asarray(gallery.labels)
    per_id = np.full((len(scores), len(gallery.names)), -np.inf)
    np.maximum.at(per_id, (np.arange(len(scores))[:, None], labels[None, :]), scores)
    order = np.argsort(-per_id, axis=1, kind="stable")[:, :top_k]  # stable: ties keep the identity order
    results = []
    for p, idents in enumerate(order):
        rows = []
        for ident in idents:
            members = np.flatnonzero(labels == ident)
            best = int(members[np.argmax(scores[p, members])])  # argmax: the first of equal maxima
            rows.append({"identity": gallery.names[ident], "score": float(per_id[p, ident]),
                         "image": gallery.paths[best]})
        results.append(rows)
    return results


def evaluation_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(enrolled image per identity, probe images): the first image of each identity (scan_identity_folder sorts them by
    name) is enrolled, every other image probes. Row k of the enrolled set is identity k."""
    first = np.unique(labels, return_index=True)[1]
    probe_mask = np.ones(len(labels), dtype=bool)
    probe_mask[first] = False
    if len(first) < 2:
        raise UserError(f"--evaluate: {len(first)} identity in the gallery; identification needs >= 2")
    if not probe_mask.any():
        raise UserError("--evaluate: every identity in the gallery has one image, so there are no probes: add a "
                        "second image of some people")
    return first, np.flatnonzero(probe_mask)


def identification_rates(gallery: Gallery, ks: tuple[int, ...], block: int = RATE_BLOCK) -> dict:
    """Closed-set rank-k rates over the `evaluation_split` of the gallery: a probe's rank is 1 + the number of
    enrolled identities scoring strictly higher than its own (ties count in the probe's favour)."""
    labels = np.asarray(gallery.labels)
    first, probe_idx = evaluation_split(labels)
    emb = gallery.embeddings.astype(np.float64)
    enrolled = emb[first]
    ranks = []
    for start in range(0, len(probe_idx), block):
        rows = probe_idx[start:start + block]
        scores = emb[rows] @ enrolled.T
        true = scores[np.arange(len(rows)), labels[rows]]
        ranks.append((scores > true[:, None]).sum(axis=1) + 1)
    rank = np.concatenate(ranks)
    out = {f"rank-{k}": float(np.mean(rank <= k)) for k in sorted(set(ks))}
    out.update({"n_probes": int(len(rank)), "n_enrolled_identities": int(len(first)),
                "mean_rank": float(rank.mean())})
    return out
