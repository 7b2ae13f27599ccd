"""1:1 verification: are these two photos the same person?

    python -m facetrain.verify --model runs/exp/bundle alice_1.jpg alice_2.jpg
    python -m facetrain.verify --model runs/exp/bundle a.jpg b.jpg --threshold 0.42     # override the bundle's
    python -m facetrain.verify --model runs/exp/bundle a.jpg b.jpg --json               # one JSON object

Prints the cosine similarity of the two embeddings (-1..1, higher = more alike) and the decision "same person
if similarity >= threshold". The threshold is the one `facetrain.eval` calibrated into the bundle for a target
false-accept rate; without one (and without --threshold) only the similarity is printed, with a note saying
how to calibrate. Images go through exactly the evaluator's preprocessing (`embed.Embedder`), including
the flip test when the threshold was calibrated with it. A photo that is missing, does not decode or shows no
usable face is a failure to acquire: the answer is "not the same person" without a similarity, naming the file
and the problem (`failure_to_acquire`), as `facetrain.eval --fta nonmatch` counts such pairs. Exit status 0
whatever the decision; errors exit 2.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())
from pathlib import Path

from facetrain.cli import print_result, run_cli


def build_parser():
    from facetrain.cli import ArgumentParser, add_embedding_options

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
    add_embedding_options(p, "the two images")
    return p


def load_embedder(model: str | Path, flip: bool | None = None, mixed_precision: str = "auto", aligned: bool = False,
                  backend: str = "torch"):
    """The evaluator's Embedder for a bundle; flip defaults to what the bundle's threshold was calibrated with.
    aligned=True: the images are crops already (the bundle's alignment recipe is not applied). backend
    "onnxruntime": an exported model.onnx instead (`embed.load_embedder`)."""
    from facetrain.evaluation.embedding import load_embedder as load

    return load(backend, model, batch_size=2, num_workers=0, flip=flip, mixed_precision=mixed_precision,
                aligned=aligned)


def embed_pair(embedder, image_a: str, image_b: str):
    """(2, D) embeddings of two image files, through the evaluator's preprocessing."""
    return embedder.embed([image_a, image_b])


def verify(model: str, image_a: str, image_b: str, threshold: float | None = None, flip: bool | None = None,
           mixed_precision: str = "auto", aligned: bool = False, backend: str = "torch") -> dict:
    """Similarity and decision for one pair of image files (the result `--json` prints); a failure to acquire
    either photo gives similarity None and same False, with `failure_to_acquire` naming the files."""
    from facetrain.alignment.check import faces_used
    from facetrain.config.constants import MAX_IMAGE_PIXELS
    from facetrain.evaluation.fta import embed_acquired, unreadable
    from facetrain.evaluation.scoring import pair_scores

    # missing and undecodable photos before the model loads; a photo without a face once it is aligned
    failures = unreadable([image_a, image_b], MAX_IMAGE_PIXELS, "facetrain.verify")
    embedder = load_embedder(model, flip, mixed_precision, aligned, backend)
    _, emb, failures = embed_acquired(embedder, [image_a, image_b], failures)
    similarity = None if failures else float(pair_scores(emb[:1], emb[1:])[0])
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
        "same": _decision(similarity, threshold),
        "model": str(embedder.path), "flip": embedder.flip, "alignment": embedder.alignment,
        "faces": None if failures else faces_used(embedder, 2),
        "failure_to_acquire": failures,
    }


def _decision(similarity: float | None, threshold: float | None) -> bool | None:
    """Same person? False without a similarity (a failure to acquire cannot match), None without a threshold."""
    if similarity is None:
        return False
    return None if threshold is None else bool(similarity >= threshold)


def describe_failure(result: dict) -> str:
    lines = [f"similarity  none: failure to acquire {r['path']} ({r['problem']}: {r['reason']}, {r['detail']})"
             for r in result["failure_to_acquire"]]
    lines.append("decision    DIFFERENT people (failure to acquire: nothing to compare)")
    return "\n".join(lines)


def describe(result: dict) -> str:
    if result.get("failure_to_acquire"):
        return describe_failure(result)
    lines = [f"similarity  {result['similarity']:.4f}  (cosine of the two embeddings, -1..1)"]
    for image, face in zip((result["image_a"], result["image_b"]), result.get("faces") or [], strict=False):
        if face["faces"] > 1:
            lines.append(f"face        {image}: {face['faces']} faces; used the one at {face['box']} "
                         f"({face['choice']})")
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
    result = verify(args.model, args.image_a, args.image_b, args.threshold, args.flip, args.mixed_precision,
                    args.aligned, args.backend)
    print_result(result, args.json, describe)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
