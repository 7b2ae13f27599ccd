"""A gallery of known people: enrolment (with its cache on disk), identity ranking and rank-k rates.

One implementation for `facetrain.identify` and the service's POST /identify, in numpy (never torch): an
embedder from either backend (`evaluation.embedding.Embedder`, `deploy.onnx_embedder.OnnxEmbedder`) embeds
the images, and the gallery keeps them as a (N, D) float32 array.

The cache: `<gallery>/.facetrain-cache/gallery-<model fingerprint[:16]>.safetensors` (one tensor,
"embeddings", (N, D) float32) with a JSON manifest next to it (format, version, model fingerprint, model path,
identity names, and per file its path relative to the gallery, size and mtime in ns). A later enrolment
reuses it only if the manifest still matches the folder and the model; otherwise it embeds again and rewrites
it. The fingerprint is the sha256 of the weights file and of everything else that changes an embedding.

Ranking: an identity's score is its best-matching image's cosine similarity. Identities with equal scores
keep the gallery's order (identity index, i.e. folder names sorted), and within an identity the first of
equally scoring images is reported, so equal scores always rank the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.errors import UserError
from facetrain.model.files import WEIGHTS_FILE

CACHE_FORMAT = "facetrain-gallery"
CACHE_VERSION = 1
CACHE_DIR = ".facetrain-cache"  # a dot folder: scan_identity_folder never takes it for an identity
CACHE_TENSOR = "embeddings"  # the one tensor of the cache file
FINGERPRINT_CHARS = 16  # hex characters of the model fingerprint in the cache file's name
HASH_CHUNK_BYTES = 1 << 20  # read size while hashing the weights
RATE_BLOCK = 4096  # probes scored at a time by identification_rates: (block x identities) float64 in memory


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
    cache_status: str = "off"  # "hit", "built", "stale: <why>, rebuilt", "off"


# ----------------------------------------------------------------------------------------------------------
# Enrolment


def usable_files(paths: list[str], labels: np.ndarray, bad_images: str, what: str,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, log: Callable[[str], None] = _stderr
                 ) -> tuple[list[str], np.ndarray]:
    """The training pre-flight's decode check of every gallery file: all unusable files named at once
    (`bad_images` "error"), or left out and listed (`skip`)."""
    from facetrain.data.preflight import check_files  # loads torch: only identify checks its gallery this way

    report = check_files(paths, max_image_pixels, what, progress=False)
    if not report.bad:
        return paths, labels
    if bad_images == "error":
        raise UserError(report.error_message(remedy="pass --bad-images skip to enrol the gallery without them"))
    for bad in report.bad:
        log(f"skipped (--bad-images skip): {bad['path']} ({bad['problem']}: {bad['detail']})")
    keep = np.array([p not in report.bad_paths for p in paths], dtype=bool)
    return [p for p, k in zip(paths, keep, strict=True) if k], labels[keep]


def model_fingerprint(embedder) -> str:
    """sha256 of the weights file and of everything else that changes an embedding."""
    h = hashlib.sha256()
    weights = embedder.path / WEIGHTS_FILE if embedder.path.is_dir() else embedder.path  # or the exported .onnx
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            h.update(chunk)
    extra = {"model": embedder.meta["model"], "preprocess": embedder.preprocess.to_dict(), "flip": embedder.flip,
             "precision": embedder.precision, "alignment": embedder.alignment}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _file_list(root: Path, paths: list[str]) -> list[list]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.relpath(p, root), st.st_size, st.st_mtime_ns])
    return out


def _stale_reason(manifest_file: Path, fingerprint: str, files: list[list]) -> str | None:
    """Why the cache cannot be used, or None if it can."""
    if not manifest_file.is_file():
        return "no cache"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable manifest"
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        return "other cache format"
    if manifest.get("model_fingerprint") != fingerprint:
        return "model changed"
    if manifest.get("files") != files:
        old = {tuple(f) for f in manifest.get("files", [])}
        new = {tuple(f) for f in files}
        return f"gallery changed ({len(new - old)} new or modified, {len(old - new)} removed or modified files)"
    return None


def _read_cache(tensors_file: Path, rows: int) -> tuple[np.ndarray | None, str | None]:
    """(embeddings, None) from a cache file of `rows` rows, or (None, why not)."""
    from safetensors.numpy import load_file

    try:
        emb = load_file(str(tensors_file))[CACHE_TENSOR]
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail
        return None, f"unreadable embeddings ({type(err).__name__})"
    return (emb, None) if emb.shape[0] == rows else (None, "row count differs")


def _write_cache(tensors_file: Path, manifest_file: Path, emb: np.ndarray, manifest: dict) -> None:
    from safetensors.numpy import save_file

    tensors_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensors_file.with_suffix(".tmp")
    save_file({CACHE_TENSOR: np.ascontiguousarray(emb)}, str(tmp))
    os.replace(tmp, tensors_file)
    tmp = manifest_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, manifest_file)  # written last: a manifest always describes a complete embeddings file


def _embed(embedder, paths: list[str], align: bool) -> np.ndarray:
    return np.asarray(embedder.embed(paths, align=align), dtype=np.float32)  # a torch tensor from the torch path


def enrol(embedder, root: str | Path, scan: tuple[list[str], np.ndarray, list[str]], cache: bool = False,
          cache_dir: str = "", log: Callable[[str], None] = _stderr) -> Gallery:
    """The gallery `root` (`scan`: its image paths, identity index per image, identity names) embedded by
    `embedder`; with `cache`, through the cache in `cache_dir` (default `<root>/.facetrain-cache`)."""
    name, root = str(root), Path(root)  # the folder as given names it in answers (serve's /health)
    paths, labels, names = scan
    # before the cache: crops cut with another recipe than the model's are refused even when cached
    align = not embedder.aligned_folder(root, "--gallery")  # crops of facetrain.align with the model's recipe
    if not cache:
        return Gallery(name, paths, labels, names, _embed(embedder, paths, align))
    fingerprint = model_fingerprint(embedder)
    folder = Path(cache_dir) if cache_dir else root / CACHE_DIR
    tensors_file = folder / f"gallery-{fingerprint[:FINGERPRINT_CHARS]}.safetensors"
    manifest_file = tensors_file.with_suffix(".json")
    files = _file_list(root, paths)
    reason = _stale_reason(manifest_file, fingerprint, files)
    if reason is None and tensors_file.is_file():
        emb, reason = _read_cache(tensors_file, len(paths))
        if emb is not None:
            return Gallery(name, paths, labels, names, emb, tensors_file, "hit")
    emb = _embed(embedder, paths, align)
    status = "built" if reason in ("no cache", None) else f"stale: {reason}, rebuilt"
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model_fingerprint": fingerprint,
                "model": str(embedder.path), "names": names, "files": files}
    try:
        _write_cache(tensors_file, manifest_file, emb, manifest)
    except OSError as err:
        log(f"warning: cannot write the gallery cache in {folder} ({err.strerror or err}); "
            "set --cache-dir to a writable folder")
        return Gallery(name, paths, labels, names, emb, None, status + " (not saved)")
    return Gallery(name, paths, labels, names, emb, tensors_file, status)


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
