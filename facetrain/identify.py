"""1:N identification: who in a gallery folder does this photo show?

    python -m facetrain.identify --model runs/exp/bundle --gallery /data/staff probe.jpg [more.jpg] [--top-k 5]
    python -m facetrain.identify --model runs/exp/bundle --gallery /data/staff probe.jpg --json
    python -m facetrain.identify --model runs/exp/bundle --gallery /data/heldout --evaluate     # rank-1 / rank-5

The gallery is a folder `<gallery>/<identity>/<image>`; enrolling it checks every file (as eval does: all
undecodable or faceless photos named at once, or left out and counted with --bad-images skip), embeds every
image once (through the evaluator's preprocessing, `evaluation.embedding.Embedder`) and caches the embeddings
outside the gallery, in --cache-dir (default $XDG_CACHE_HOME/facetrain or ~/.cache/facetrain), one cache per
model and gallery folder, keyed by the content of every file (`deploy.gallery_cache`). A later run reuses the
cache only if nothing changed; otherwise it re-enrols. An identity's score is its best-matching image's cosine
similarity; with a calibrated threshold in the bundle, the top match is reported as a match only at or above
it (open set). A probe that does not decode or shows no usable face is a failure to acquire, as in verify: its
answer is "no match" with the file and problem named (`failure_to_acquire` in --json), and the other probes are
answered; exit status 0. A probe path that does not exist is an error (exit 2): most likely a typo.

`--evaluate` measures identification: the first image (by name) of each identity is the gallery, every other
image is a probe; rank-k rate = fraction of probes whose identity is among the k highest-scoring identities
(ties count in the probe's favour).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())

import numpy as np  # noqa: E402

from facetrain.cli import run_cli  # noqa: E402
from facetrain.deploy.gallery import enrol, evaluation_split, identification_rates, rank_identities  # noqa: E402
from facetrain.deploy.gallery_cache import default_cache_dir  # noqa: E402
from facetrain.errors import UserError  # noqa: E402


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
    p.add_argument("--cache-dir", default="", help="where enrolment caches go (default $XDG_CACHE_HOME/facetrain, "
                   "else ~/.cache/facetrain; one cache per model and gallery folder)")
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


def _identify(embedder, gallery, probes: list[str], top_k: int, threshold, far, as_json: bool) -> list[dict]:
    """Per probe: its top_k matches and the open-set decision at the threshold (tables unless --json). A probe
    that does not decode or shows no usable face is a failure to acquire, as in verify: no matches, decision
    "no match", the file and problem named (`failure_to_acquire`); the other probes are answered."""
    from facetrain.alignment.check import faces_used
    from facetrain.config.constants import MAX_IMAGE_PIXELS
    from facetrain.evaluation.fta import embed_acquired, unreadable

    unusable = unreadable(probes, MAX_IMAGE_PIXELS, "facetrain.identify")
    embedded, emb, failures = embed_acquired(embedder, probes, unusable, num_workers=0)  # a few probes: no workers
    failed = {r["path"]: r for r in failures}
    faces = (faces_used(embedder, len(embedded)) if embedded else None) or [None] * len(embedded)
    ok = [i for i, p in enumerate(embedded) if p not in failed]
    ranked = rank_identities(gallery, np.asarray(emb)[ok], top_k) if ok else []
    answered = {embedded[i]: (rows, faces[i]) for i, rows in zip(ok, ranked, strict=True)}
    out = []
    for probe in probes:
        if probe in failed:
            out.append({"probe": probe, "matches": [], "match": False,
                        "faces": None, "failure_to_acquire": [failed[probe]]})
            if not as_json:
                r = failed[probe]
                print(f"{probe}: failure to acquire ({r['problem']}: {r['reason']}, {r['detail']}); decision: no "
                      "match (nothing to compare)", flush=True)
            continue
        rows, face = answered[probe]
        match = None if threshold is None else bool(rows[0]["score"] >= threshold)
        out.append({"probe": probe, "matches": rows, "match": match, "faces": face, "failure_to_acquire": []})
        if not as_json:
            _print_matches(probe, rows, threshold, far, len(gallery.names))
            if face and face["faces"] > 1:
                print(f"{probe}: {face['faces']} faces; used the one at {face['box']} ({face['choice']})", flush=True)
    return out


def _evaluate(gallery, top_k: int, as_json: bool) -> dict:
    rates = identification_rates(gallery, (1, 5, top_k))
    if not as_json:
        ranks = ", ".join(f"{k} {v:.4f}" for k, v in rates.items() if k.startswith("rank-"))
        print(f"identification on {gallery.root}: {rates['n_probes']} probes vs {rates['n_enrolled_identities']} "
              f"enrolled identities (one image each): {ranks}, mean rank {rates['mean_rank']:.2f}", flush=True)
    return rates


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from facetrain.cli import require_files
    from facetrain.data.faceset import scan_identity_folder
    from facetrain.evaluation.embedding import load_embedder

    if args.top_k < 1:
        raise UserError(f"--top-k: must be >= 1, got {args.top_k}")
    if not args.probes and not args.evaluate:
        raise UserError("facetrain.identify: give probe image(s) to identify, or --evaluate")
    require_files(args.probes, "facetrain.identify")
    paths, labels, names = scan_identity_folder(args.gallery, "--gallery")
    if args.evaluate:  # before any embedding: a gallery that cannot be evaluated fails fast
        evaluation_split(labels)
    embedder = load_embedder(args.backend, args.model, args.batch_size, args.num_workers, args.flip,
                             args.mixed_precision, aligned=args.aligned)
    cache_dir = (args.cache_dir or default_cache_dir(os.environ)) if args.cache else None
    gallery = enrol(embedder, args.gallery, (paths, labels, names), cache_dir, args.bad_images,
                    args.max_image_pixels, log=_status)
    _status(f"gallery {args.gallery}: {len(gallery.paths)} images of {len(gallery.names)} identities "
            f"(cache: {gallery.cache_status})")
    threshold, far = embedder.meta.get("threshold"), embedder.meta.get("threshold_far")
    result: dict = {"model": str(embedder.path), "gallery": args.gallery, "cache": gallery.cache_status,
                    "threshold": threshold, "threshold_far": far, "skipped_images": gallery.skipped}
    if args.probes:
        result["probes"] = _identify(embedder, gallery, args.probes, args.top_k, threshold, far, args.json)
    if args.evaluate:
        result["evaluation"] = _evaluate(gallery, args.top_k, args.json)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
