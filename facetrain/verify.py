"""1:1 verification: are these two photos the same person?

    python -m facetrain.verify --model runs/exp/bundle alice_1.jpg alice_2.jpg
    python -m facetrain.verify --model runs/exp/bundle a.jpg b.jpg --threshold 0.42     # override the bundle's
    python -m facetrain.verify --model runs/exp/bundle a.jpg b.jpg --json               # one JSON object

Prints the cosine similarity of the two embeddings (-1..1, higher = more alike) and the decision "same person
if similarity >= threshold". The threshold is the one `facetrain.eval` calibrated into the bundle for a target
false-accept rate; without one (and without --threshold) only the similarity is printed, with a note saying
how to calibrate. Images go through exactly the evaluator's preprocessing (`evaluate.Embedder`), including
the flip test when the threshold was calibrated with it. Exit status 0 whatever the decision; errors exit 2.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads: idle OpenMP threads sleep instead of spinning, so DataLoader workers and other processes
# get the cores in between (why: facetrain/train.py). An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import json
from pathlib import Path

from facetrain.errors import run_cli


def build_parser():
    from facetrain.evaluate import ArgumentParser

    p = ArgumentParser(prog="facetrain.verify", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle or checkpoint directory (or a run directory)")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold on the cosine similarity (default: the bundle's calibrated one)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test (default: as used when the bundle's threshold was calibrated)")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def load_embedder(model: str | Path, flip: bool | None = None, mixed_precision: str = "auto"):
    """The evaluator's Embedder for a bundle; flip defaults to what the bundle's threshold was calibrated with."""
    from facetrain.evaluate import Embedder

    return Embedder.load(model, batch_size=2, num_workers=0, flip=flip, mixed_precision=mixed_precision)


def embed_pair(embedder, image_a: str, image_b: str):
    """(2, D) embeddings of two image files, through the evaluator's preprocessing."""
    return embedder.embed([image_a, image_b])


def verify(model: str, image_a: str, image_b: str, threshold: float | None = None, flip: bool | None = None,
           mixed_precision: str = "auto") -> dict:
    """Similarity and decision for one pair of image files (the result `--json` prints)."""
    from facetrain.evaluate import require_files
    from facetrain.metrics import pair_scores

    require_files([image_a, image_b], "facetrain.verify")  # before the model loads: a typo fails fast
    embedder = load_embedder(model, flip, mixed_precision)
    emb = embed_pair(embedder, image_a, image_b)
    similarity = float(pair_scores(emb[:1], emb[1:])[0])
    meta = embedder.meta
    if threshold is not None:
        source, far = "--threshold", None
    elif meta.get("threshold") is not None:
        threshold, source, far = float(meta["threshold"]), "bundle", meta.get("threshold_far")
    else:
        source, far = None, None
    return {
        "image_a": image_a, "image_b": image_b, "similarity": similarity,
        "threshold": threshold, "threshold_source": source, "threshold_far": far,
        "same": None if threshold is None else bool(similarity >= threshold),
        "model": str(embedder.path), "flip": embedder.flip,
    }


def describe(result: dict) -> str:
    lines = [f"similarity  {result['similarity']:.4f}  (cosine of the two embeddings, -1..1)"]
    if result["threshold"] is None:
        lines.append(f"decision    none: {result['model']} has no calibrated threshold; run "
                     f"`python -m facetrain.eval --model {result['model']} --data <held-out folder>` to calibrate "
                     "one, or pass --threshold")
        return "\n".join(lines)
    origin = (f"calibrated at FAR {result['threshold_far']:.0e}" if result["threshold_far"] is not None
              else result["threshold_source"])
    lines.append(f"threshold   {result['threshold']:.4f}  ({origin}; same person if similarity >= threshold)")
    lines.append("decision    " + ("SAME person" if result["same"] else "DIFFERENT people"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    result = verify(args.model, args.image_a, args.image_b, args.threshold, args.flip, args.mixed_precision)
    print(json.dumps(result) if args.json else describe(result), flush=True)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
