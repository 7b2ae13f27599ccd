"""What distillation adds to a training step: facetrain's own `Trainer.train_step` with and without an online
teacher, the same student, data, batch and seed, measured side by side in one process.

    python bench/distill_step.py                        # SFace teaching tf_efficientnet_lite0 at 112 px on att_faces
    python bench/distill_step.py --smoke --no-write     # seconds: the tiny ONNX teacher of tests/data/legacy
    python bench/distill_step.py --cached               # also distill.targets cached (the teacher's targets read)

Two trainers are built once (`plain`: the metric loss alone; `distill`: plus distill.teacher with the cosine and
relational terms, i.e. one teacher forward pass of the student's augmented batch per step), then timed round by
round, alternating, each round --steps steps after one untimed step (so a neighbour's load hits both alike). The
figure to keep is the ratio distill / plain per round; wall times drift with the machine's load. --cached adds a
third trainer with distill.targets cached (a fresh cache, filled while it is built, before any timed step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from teacher_cost import SFACE, SFACE_SPEC  # noqa: E402 -- the teacher benchmark's file and input, defined once

SECTION = "Distillation: training step cost with and without the teacher (bench/distill_step.py)"
SHARED = REPO.parent / "shared"
TINY_TEACHER = REPO / "tests" / "data" / "legacy" / "model.onnx"  # a facetrain export: its metadata is its spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(SFACE), help="teacher file (default: SFace from ../shared/weights)")
    p.add_argument("--input-spec", default=SFACE_SPEC, help="its input spec (default SFace's; '' for facetrain files)")
    p.add_argument("--data", default=str(SHARED / "data" / "faces" / "att_faces"), help="labelled image folder")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=112, help="student input side, px (default 112)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--cached", action="store_true", help="also time distill.targets cached (its cache is filled "
                   "before the timed steps, in a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny student and teacher, synthetic faces, 1 step x 1 round")
    p.add_argument("--json", default="", help="also write the raw figures here")
    p.add_argument("--no-write", dest="write", action="store_false", help="print only, leave RESULTS.md alone")
    args = p.parse_args(argv)
    if args.smoke:
        args.teacher, args.input_spec, args.backbone, args.image_size = str(TINY_TEACHER), "", "test_efficientnet", 32
        args.batch, args.steps, args.rounds = 8, 1, 1
    return args


def build(args, out: Path, teacher: str, extra: tuple[str, ...] = ()):
    """A Trainer set up to its first step (no run directory writes beyond its own folder)."""
    from facetrain.config.load import load_config
    from facetrain.training.trainer import Trainer

    data = (["--data.source", "synthetic", "--data.synthetic_identities", "12"] if args.smoke
            else ["--data.source", "folder", "--data.root", args.data])
    overrides = [*data, "--data.image_size", str(args.image_size), "--model.backbone", args.backbone,
                 "--model.pretrained", "false", "--train.batch_size", str(args.batch), "--train.m", "4",
                 "--train.max_steps", "1000", "--train.output_dir", str(out), "--train.num_workers", "0",
                 "--train.tensorboard", "false"]
    if teacher:
        overrides += ["--distill.teacher", teacher] + (["--distill.teacher_input", args.input_spec]
                                                       if args.input_spec else [])
    trainer = Trainer(load_config(None, [*overrides, *extra]))
    trainer.out.mkdir(parents=True, exist_ok=True)
    trainer.setup_data()
    trainer.setup()
    return trainer


def endless(trainer):
    """The trainer's batches epoch after epoch (a small folder has only a few steps per epoch)."""
    epoch = 0
    while True:
        trainer.sampler.set_epoch(epoch)
        yield from trainer.loader
        epoch += 1


def timed(trainer, batches, steps: int) -> float:
    """Seconds per step over `steps` steps, after one untimed step."""
    trainer.train_step(batches)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
    return (time.perf_counter() - start) / steps


def run(args) -> dict:
    import tempfile

    from facetrain.deploy.teacher import describe

    tmp = Path(tempfile.mkdtemp(prefix="distill_step_"))
    trainers = {"plain": build(args, tmp / "plain", ""), "distill": build(args, tmp / "distill", args.teacher)}
    if args.cached:
        trainers["cached"] = build(args, tmp / "cached", args.teacher,
                                   ("--distill.targets", "cached", "--distill.cache_dir", str(tmp / "cache")))
    batches = {name: endless(t) for name, t in trainers.items()}
    for name, trainer in trainers.items():  # first steps pay one-off costs (allocations, lazy kernels): untimed
        timed(trainer, batches[name], 1)
    per_step = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            per_step[name].append(timed(trainer, batches[name], args.steps))
    ratio = [d / p for d, p in zip(per_step["distill"], per_step["plain"], strict=True)]
    result = {"teacher": describe(trainers["distill"].distiller.teacher),
              "student": f"{args.backbone} at {args.image_size} px, batch {args.batch}",
              "plain_s": [round(s, 3) for s in per_step["plain"]],
              "distill_s": [round(s, 3) for s in per_step["distill"]],
              "ratio": [round(r, 3) for r in ratio]}
    if args.cached:
        result["cached_s"] = [round(s, 3) for s in per_step["cached"]]
        result["cached_ratio"] = [round(c / p, 3) for c, p in zip(per_step["cached"], per_step["plain"],
                                                                     strict=True)]
    return result


def report(args, result: dict, command: str) -> str:
    med = statistics.median
    lines = [f"facetrain's `Trainer.train_step` (augmentation, P x m batch, triplet loss, AdamW), {args.rounds} "
             f"interleaved round(s) of {args.steps} timed steps per variant.", "",
             f"- date: {result['date']}, {result['minutes']:.1f} min",
             f"- machine: {result['machine']}; load average (1 min) before / after: {result['load'][0]:.2f} / "
             f"{result['load'][1]:.2f}",
             f"- command: `{command}`",
             f"- student: {result['student']}; teacher: {result['teacher']}", "",
             "| variant | s/step (median) | per round |", "|---|---:|---|",
             f"| metric loss only | {med(result['plain_s']):.3f} | {', '.join(map(str, result['plain_s']))} |",
             f"| + online teacher (cosine + relational) | {med(result['distill_s']):.3f} | "
             f"{', '.join(map(str, result['distill_s']))} |",
             *([f"| + cached targets (cosine + relational) | {med(result['cached_s']):.3f} | "
                f"{', '.join(map(str, result['cached_s']))} |"] if "cached_s" in result else []), "",
             f"Distillation costs **{med(result['ratio']):.2f}x** the plain step (per round: "
             f"{', '.join(f'{r:.2f}' for r in result['ratio'])})."]
    if "cached_s" in result:
        lines.append(f"Cached targets cost **{med(result['cached_ratio']):.2f}x** (per round: "
                     f"{', '.join(f'{r:.2f}' for r in result['cached_ratio'])}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from results_md import measure_and_publish  # imports torch (machine()) only once the run is over

    measure_and_publish(SECTION, "bench/distill_step.py", parse_args(argv), argv, run, report)


if __name__ == "__main__":
    main()
