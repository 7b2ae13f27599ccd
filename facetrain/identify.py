"""1:N identification: who in a gallery folder does this photo show?

    python -m facetrain.identify --model runs/exp/bundle --gallery /data/staff probe.jpg [more.jpg] [--top-k 5]
    python -m facetrain.identify --model runs/exp/bundle --gallery /data/staff probe.jpg --json
    python -m facetrain.identify --model runs/exp/bundle --gallery /data/heldout --evaluate     # rank-1 / rank-5

The gallery is a folder `<gallery>/<identity>/<image>`; enrolling it embeds every image once (through the
evaluator's preprocessing, `embed.Embedder`) and caches the embeddings in
`<gallery>/.facetrain-cache/gallery-<model fingerprint>.safetensors` with a JSON manifest (file list, sizes,
mtimes, model fingerprint). A later run reuses the cache only if the manifest still matches the folder and
the model; otherwise it re-enrols. An identity's score is its best-matching image's cosine similarity; with a
calibrated threshold in the bundle, the top match is reported as a match only at or above it (open set).

`--evaluate` measures identification: the first image (by name) of each identity is the gallery, every other
image is a probe; rank-k rate = fraction of probes whose identity is among the k highest-scoring identities
(ties count in the probe's favour).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())

import numpy as np

from facetrain.cli import run_cli
from facetrain.data.images import MAX_IMAGE_PIXELS
from facetrain.errors import UserError

if TYPE_CHECKING:  # torch loads with the model, after the command line parsed
    import torch

CACHE_FORMAT = "facetrain-gallery"
CACHE_VERSION = 1
CACHE_DIR = ".facetrain-cache"  # a dot folder: scan_folder never takes it for an identity


def build_parser():
    from facetrain.cli import RECOGNISED, ArgumentParser, add_embedding_options, add_image_check_options

    p = ArgumentParser(prog="facetrain.identify", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle or checkpoint directory (or a run directory)")
    p.add_argument("--gallery", required=True, help="folder <gallery>/<identity>/<image>")
    p.add_argument("probes", nargs="*", help="probe image(s) to identify")
    p.add_argument("--top-k", type=int, default=5, help="identities listed per probe (default 5)")
    p.add_argument("--evaluate", action="store_true", help="report rank-1/rank-5 identification rates on the "
                   "gallery itself (first image per identity enrolled, the rest as probes)")
    p.add_argument("--cache-dir", default="", help=f"where enrolment caches go (default <gallery>/{CACHE_DIR})")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="always re-embed the gallery")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test (default: as used when the bundle's threshold was calibrated)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=-1)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_image_check_options(p, "enrol the gallery without them")
    add_embedding_options(p, "gallery and probes", RECOGNISED)
    return p


def _status(message: str) -> None:
    # stderr, so that --json output on stdout stays parseable
    print(f"facetrain.identify: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Enrolment with a cache


def model_fingerprint(embedder) -> str:
    """sha256 of the weights file and of everything else that changes an embedding."""
    from facetrain.model.files import WEIGHTS_FILE

    h = hashlib.sha256()
    weights = embedder.path / WEIGHTS_FILE if embedder.path.is_dir() else embedder.path  # or the exported .onnx
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    extra = {"model": embedder.meta["model"], "preprocess": embedder.preprocess.to_dict(), "flip": embedder.flip,
             "precision": embedder.precision, "alignment": embedder.alignment}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Gallery:
    paths: list[str]
    labels: np.ndarray
    names: list[str]
    embeddings: torch.Tensor  # (N, D) float32, L2-normalised
    cache_file: Path | None
    cache_status: str  # "hit", "built", "stale: <why>, rebuilt", "off"


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


def usable_files(paths: list[str], labels: np.ndarray, bad_images: str, what: str,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[str], np.ndarray]:
    """The training pre-flight's decode check of every gallery file: all unusable files named at once
    (`--bad-images error`), or left out and listed (`skip`)."""
    from facetrain.data.preflight import check_files

    report = check_files(paths, max_image_pixels, what, progress=False)
    if not report.bad:
        return paths, labels
    if bad_images == "error":
        raise UserError(report.error_message(remedy="pass --bad-images skip to enrol the gallery without them"))
    for bad in report.bad:
        _status(f"skipped (--bad-images skip): {bad['path']} ({bad['problem']}: {bad['detail']})")
    keep = np.array([p not in report.bad_paths for p in paths], dtype=bool)
    return [p for p, k in zip(paths, keep, strict=True) if k], labels[keep]


def enrol(embedder, gallery: str, cache: bool = True, cache_dir: str = "", bad_images: str = "error",
          max_image_pixels: int = MAX_IMAGE_PIXELS) -> Gallery:
    from safetensors.torch import load_file, save_file

    from facetrain.cli import labelled_folder

    root = Path(gallery)
    paths, labels, names = labelled_folder(root, "--gallery")
    paths, labels = usable_files(paths, labels, bad_images, str(root), max_image_pixels)
    align = not embedder.aligned_folder(root, "--gallery")  # crops of facetrain.align with the bundle's recipe
    if not cache:
        return Gallery(paths, labels, names, embedder.embed(paths, align=align), None, "off")
    fingerprint = model_fingerprint(embedder)
    folder = Path(cache_dir) if cache_dir else root / CACHE_DIR
    tensors_file = folder / f"gallery-{fingerprint[:16]}.safetensors"
    manifest_file = tensors_file.with_suffix(".json")
    files = _file_list(root, paths)
    reason = _stale_reason(manifest_file, fingerprint, files)
    if reason is None and tensors_file.is_file():
        try:
            emb = load_file(str(tensors_file))["embeddings"]
            if emb.shape[0] == len(paths):
                return Gallery(paths, labels, names, emb, tensors_file, "hit")
            reason = "row count differs"
        except Exception as err:  # a truncated or foreign file: rebuild rather than fail
            reason = f"unreadable embeddings ({type(err).__name__})"
    emb = embedder.embed(paths, align=align)
    status = "built" if reason in ("no cache", None) else f"stale: {reason}, rebuilt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = tensors_file.with_suffix(".tmp")
        save_file({"embeddings": emb.contiguous()}, str(tmp))
        os.replace(tmp, tensors_file)
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model_fingerprint": fingerprint,
                    "model": str(embedder.path), "names": names, "files": files}
        tmp = manifest_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, manifest_file)  # written last: a manifest always describes a complete embeddings file
    except OSError as err:
        _status(f"warning: cannot write the gallery cache in {folder} ({err.strerror or err}); "
                "set --cache-dir to a writable folder")
        return Gallery(paths, labels, names, emb, None, status + " (not saved)")
    return Gallery(paths, labels, names, emb, tensors_file, status)


# ----------------------------------------------------------------------------------------------------------
# Identification


def rank_identities(gallery: Gallery, probes: torch.Tensor, top_k: int) -> list[list[dict]]:
    """Per probe: the top_k identities by best-image cosine similarity, with that image."""
    import torch

    scores = probes.double() @ gallery.embeddings.double().T  # (P, N) cosines
    labels = torch.as_tensor(gallery.labels)
    n_ids = len(gallery.names)
    per_id = torch.full((scores.shape[0], n_ids), -torch.inf, dtype=scores.dtype)
    per_id.scatter_reduce_(1, labels.expand_as(scores), scores, reduce="amax")
    values, ids = per_id.topk(min(top_k, n_ids), dim=1)
    results = []
    for p in range(scores.shape[0]):
        rows = []
        for value, ident in zip(values[p].tolist(), ids[p].tolist(), strict=True):
            members = torch.nonzero(labels == ident).flatten()
            best = int(members[scores[p, members].argmax()])
            rows.append({"identity": gallery.names[ident], "score": value, "image": gallery.paths[best]})
        results.append(rows)
    return results


def evaluation_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(enrolled image per identity, probe images): the first image of each identity (scan_folder sorts them by
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


def identification_rates(gallery: Gallery, ks: tuple[int, ...], block: int = 4096) -> dict:
    """Closed-set rank-k rates over the `evaluation_split` of the gallery."""
    import torch

    labels = gallery.labels
    first, probe_idx = evaluation_split(labels)
    enrolled = gallery.embeddings[first].double()
    ranks = []
    for start in range(0, len(probe_idx), block):  # (block x identities) scores at a time: bounded memory
        rows = probe_idx[start:start + block]
        scores = gallery.embeddings[rows].double() @ enrolled.T
        true = scores[torch.arange(len(rows)), torch.as_tensor(labels[rows])]
        ranks.append(((scores > true[:, None]).sum(dim=1) + 1).numpy())
    rank = np.concatenate(ranks)
    out = {f"rank-{k}": float(np.mean(rank <= k)) for k in sorted(set(ks))}
    out.update({"n_probes": int(len(rank)), "n_enrolled_identities": int(len(first)),
                "mean_rank": float(rank.mean())})
    return out


def _print_matches(probe: str, rows: list[dict], threshold: float | None, far, n_ids: int) -> None:
    from rich.console import Console
    from rich.table import Table

    note = (f"threshold {threshold:.4f} at FAR {far:.0e}" if threshold is not None and far is not None
            else f"threshold {threshold:.4f}" if threshold is not None else "no calibrated threshold")
    table = Table(title=f"{probe}: top {len(rows)} of {n_ids} identities ({note})", title_justify="left")
    for col in ("rank", "identity", "score", "decision", "best gallery image"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for k, row in enumerate(rows, start=1):
        decision = "" if threshold is None or k > 1 else ("match" if row["score"] >= threshold else
                                                           "no match (unknown person)")
        table.add_row(str(k), row["identity"], f"{row['score']:.4f}", decision, row["image"])
    Console(highlight=False, width=None if Console().is_terminal else 120).print(table)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from facetrain.cli import require_files
    from facetrain.evaluation.embedding import load_embedder

    if args.top_k < 1:
        raise UserError(f"--top-k: must be >= 1, got {args.top_k}")
    if not args.probes and not args.evaluate:
        raise UserError("facetrain.identify: give probe image(s) to identify, or --evaluate")
    require_files(args.probes, "facetrain.identify")
    if args.evaluate:  # before any embedding: a gallery that cannot be evaluated fails fast
        from facetrain.cli import labelled_folder

        evaluation_split(labelled_folder(args.gallery, "--gallery")[1])
    embedder = load_embedder(args.backend, args.model, args.batch_size, args.num_workers, args.flip,
                             args.mixed_precision, aligned=args.aligned)
    path, meta = embedder.path, embedder.meta
    gallery = enrol(embedder, args.gallery, args.cache, args.cache_dir, args.bad_images, args.max_image_pixels)
    _status(f"gallery {args.gallery}: {len(gallery.paths)} images of {len(gallery.names)} identities "
            f"(cache: {gallery.cache_status})")
    threshold, far = meta.get("threshold"), meta.get("threshold_far")
    result: dict = {"model": str(path), "gallery": args.gallery, "cache": gallery.cache_status,
                    "threshold": threshold, "threshold_far": far}
    if args.probes:
        probes = embedder.embed(args.probes, num_workers=0)
        matches = rank_identities(gallery, probes, args.top_k)
        result["probes"] = []
        for probe, rows in zip(args.probes, matches, strict=True):
            top = rows[0]
            match = None if threshold is None else bool(top["score"] >= threshold)
            result["probes"].append({"probe": probe, "matches": rows, "match": match})
            if not args.json:
                _print_matches(probe, rows, threshold, far, len(gallery.names))
    if args.evaluate:
        rates = identification_rates(gallery, (1, 5, args.top_k))
        result["evaluation"] = rates
        if not args.json:
            ranks = ", ".join(f"{k} {v:.4f}" for k, v in rates.items() if k.startswith("rank-"))
            print(f"identification on {args.gallery}: {rates['n_probes']} probes vs {rates['n_enrolled_identities']} "
                  f"enrolled identities (one image each): {ranks}, mean rank {rates['mean_rank']:.2f}", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
