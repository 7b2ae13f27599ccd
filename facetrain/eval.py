"""Evaluate a trained model on held-out identities and calibrate its threshold (logic: facetrain/evaluation/).

    python -m facetrain.eval --model runs/exp/bundle --data /data/heldout
    python -m facetrain.eval --model runs/exp/bundle --data /data/lfw --pairs /data/lfw/pairs.txt
    python -m facetrain.eval --model runs/exp/bundle --benchmarks /data/insightface_bins   # LFW, CFP-FP, AgeDB-30, ...
    python -m facetrain.eval --model runs/exp/checkpoints/step_00001200 --data /data/heldout --no-calibrate
    python -m facetrain.eval --model sface.onnx --input-spec size=112,order=rgb,range=0-255 --data /data/crops112
    accelerate launch --multi_gpu --num_processes 8 -m facetrain.eval --model ... --data ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --main_process_port <free port> -m facetrain.eval --model ... --data ...

Writes <output>/metrics.json, args.json, roc.png, far_frr.png, scores.png, errors.png (default output:
<model>/../eval-<timestamp>-<data name>) and stores the threshold for --target-far in the bundle.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())

from facetrain.cli import run_cli


def build_parser():
    from facetrain.cli import RECOGNISED, ArgumentParser, add_embedding_options, add_pixel_limit_option
    from facetrain.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_REPLICATES
    from facetrain.evaluation.fta import DEFAULT_FTA_POLICY, FTA_POLICIES
    from facetrain.evaluation.protocols import DEFAULT_CALIBRATION_FAR

    p = ArgumentParser(prog="facetrain.eval", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle or checkpoint directory (or a run directory: its bundle/)")
    p.add_argument("--data", default="", help="held-out folder <data>/<identity>/<image> (with --pairs: the "
                   "LFW root <data>/<name>/<name>_0001.jpg)")
    p.add_argument("--benchmarks", default="", metavar="DIR", help="instead of --data: the folder of insightface's "
                   "verification files (lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin; those present are "
                   "evaluated: 10-fold accuracy and TAR@FAR per set, no calibration)")
    p.add_argument("--pairs", default="", help="LFW pairs.txt, CALFW's / CPLFW's pairs list (images in --data "
                   "itself) or CFP's Protocol folder (CFP-FP; --data: the CFP folder holding Data/): evaluate the "
                   "listed pairs (10-fold protocol) instead of all pairs of --data")
    p.add_argument("--output", default="", help="run directory for metrics.json, plots and args "
                   "(default <model>/../eval-<timestamp>-<data name>)")
    p.add_argument("--target-far", type=float, default=None, help="FAR the bundle's threshold is calibrated "
                   f"for (default {DEFAULT_CALIBRATION_FAR:g} if resolvable, else the smallest resolvable)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="do not write the threshold into the bundle")
    p.add_argument("--flip", action="store_true", help="flip test: add the embedding of the mirrored image")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per process (default 64)")
    p.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers per process (-1 = from the "
                   "CPU count)")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                   help="autocast precision (auto = bf16 where it is faster, as in training)")
    p.add_argument("--no-fold-bn", dest="fold_batchnorm", action="store_const", const=False, default=None,
                   help="embed with the BatchNorm layers as trained instead of folded into the convolutions (the "
                   "bundle's model.fold_batchnorm; folding gives the same embeddings, a ~30%% faster forward "
                   "pass on a CPU)")
    p.add_argument("--roc-mode", default="auto", choices=("auto", "exact", "histogram"),
                   help="all-pairs ROC: exact (every score kept) or histogram (bounded memory); auto = exact up "
                   "to --max-exact-pairs")
    p.add_argument("--max-exact-pairs", type=int, default=20_000_000,
                   help="largest pair count scored exactly in auto mode (~70 bytes of memory per pair at "
                   "peak: 20M = 1.4 GB)")
    p.add_argument("--tensorboard", default="", metavar="LOGDIR", help="also log metrics, the ROC figure and the "
                   "embeddings with thumbnails (TensorBoard's projector) here")
    p.add_argument("--save-embeddings", action="store_true", help="write embeddings.safetensors (with the file "
                   "list) to the output directory")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_REPLICATES, metavar="N", help="bootstrap replicates "
                   "for the confidence intervals of AUC, EER, TAR@FAR and the calibrated threshold's FAR and TAR, "
                   "resampling identities (all pairs) or pairs within folds (--pairs); 0 = off "
                   f"(default {DEFAULT_REPLICATES})")
    p.add_argument("--ci-level", type=float, default=DEFAULT_LEVEL, help="confidence level of the intervals "
                   f"(default {DEFAULT_LEVEL})")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's draws (default 0)")
    p.add_argument("--fta", default="", choices=tuple(FTA_POLICIES), help="failures to acquire (a listed image "
                   "that is missing, does not decode or shows no usable face; rate and files in the report): "
                   + "; ".join(f"{k} = {v}" for k, v in FTA_POLICIES.items()) + f" (default {DEFAULT_FTA_POLICY})")
    p.add_argument("--bad-images", default="", choices=("error", "skip"),
                   help="former option, still accepted: error = --fta error, skip = --fta exclude")
    add_pixel_limit_option(p)
    p.add_argument("--input-spec", default="", metavar="SPEC", help="score a third-party ONNX face model (--model "
                   "FILE.onnx without facetrain metadata, aligned crops only) given its input: size=112,order=rgb,"
                   "range=0-255, or with mean=A:B:C,std=A:B:C applied after the range; its threshold goes to "
                   "metrics.json only, the file is never written")
    add_embedding_options(p, "the images", RECOGNISED)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    from facetrain.evaluation.evaluator import run  # heavy imports after the arguments parse
    from facetrain.evaluation.options import EvalOptions

    run(EvalOptions(**vars(args), argv=list(argv)))
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
