"""What distillation adds to a training step: facetrain's own `Trainer.train_step` with and without an online
teacher, the same student, data, batch and seed, measured side by side in one process.

    python bench/distill_step.py                        # SFace teaching tf_efficientnet_lite0 at 112 px on att_faces
    python bench/distill_step.py --smoke --no-write     # seconds: the tiny ONNX teacher of tests/data/legacy
    python bench/distill_step.py --mix cutmix --mix-images 16 --unlabelled ../shared/data/faces/ext_yale_b_cropped \
        --unlabelled-images 16                          # a third variant: distillation with extra views
    python bench/distill_step.py --cached               # also distill.targets cached (the teacher's targets read)
    python bench/distill_step.py --data synthetic --teacher-backbone tf_efficientnet_lite0 --batch 256
                                                        # no files needed (bench/gpu_check.sh): a random-weights
                                                        # bundle teacher, run in torch on the student's device

Two trainers are built once (`plain`: the metric loss alone; `distill`: plus distill.teacher with the cosine and
relational terms, i.e. one teacher forward pass of the student's augmented batch per step), then timed round by
round, alternating, each round --steps steps after one untimed step (so a neighbour's load hits both alike). The
figure to keep is the ratio distill / plain per round; wall times drift with the machine's load. With --mix or
--unlabelled a third trainer (`extra`: distillation plus those extra images per step, which only the distillation
terms see) joins the rounds, and its ratio to `distill` is reported too. --cached adds a
third trainer with distill.targets cached (a fresh cache, filled while it is built, before any timed step).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from teacher_cost import SFACE, SFACE_SPEC  # noqa: E402 -- the teacher benchmark's file and input, defined once

M = 4  # images per identity in a batch (train.m): the P x m batches of facetrain's default
SECTION = "Distillation: training step cost with and without the teacher (bench/distill_step.py)"
SHARED = REPO.parent / "shared"
TINY_TEACHER = REPO / "tests" / "data" / "legacy" / "model.onnx"  # a facetrain export: its metadata is its spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(SFACE), help="teacher file (default: SFace from ../shared/weights)")
    p.add_argument("--input-spec", default=SFACE_SPEC, help="its input spec (default SFace's; '' for facetrain files)")
    p.add_argument("--data", default=str(SHARED / "data" / "faces" / "att_faces"),
                   help="labelled image folder, or 'synthetic' (the built-in synthetic faces)")
    p.add_argument("--teacher-backbone", default="", help="instead of --teacher: a facetrain bundle of this timm "
                   "model with random weights (seed 0, 128-d, at --image-size), written to a temporary folder")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=112, help="student input side, px (default 112)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--mix", default="none", choices=("none", "mixup", "cutmix"), help="extra variant: distill.mix")
    p.add_argument("--mix-images", type=int, default=0, help="extra variant: mixed images per step")
    p.add_argument("--unlabelled", default="", help="extra variant: a folder of faces without labels")
    p.add_argument("--unlabelled-images", type=int, default=0, help="extra variant: unlabelled images per step")
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


def extra_overrides(args) -> list[str]:
    """The `extra` variant's distill.* settings ([] when neither --mix nor --unlabelled is given)."""
    out = ["--distill.mix", args.mix, "--distill.mix_images", str(args.mix_images)] if args.mix != "none" else []
    if args.unlabelled:
        out += ["--distill.unlabelled", args.unlabelled, "--distill.unlabelled_images", str(args.unlabelled_images)]
    return out


def synthetic_identities(args) -> int:
    """Synthetic identities enough for one batch of --batch / M people after the validation split (data.
    val_fraction's default holds some out), plus two for the split's rounding."""
    from facetrain.config.schema import DataConfig

    return math.ceil(args.batch / M / (1 - DataConfig().val_fraction)) + 2


def build(args, out: Path, teacher: str, extra: list[str] = ()):
    """A Trainer set up to its first step (no run directory writes beyond its own folder)."""
    from facetrain.config.load import load_config
    from facetrain.training.trainer import Trainer

    synthetic = ["--data.source", "synthetic", "--data.synthetic_identities", str(synthetic_identities(args))]
    data = synthetic if args.smoke or args.data == "synthetic" else ["--data.source", "folder", "--data.root",
                                                                     args.data]
    overrides = [*data, "--data.image_size", str(args.image_size), "--model.backbone", args.backbone,
                 "--model.pretrained", "false", "--train.batch_size", str(args.batch), "--train.m", str(M),
                 "--train.max_steps", "1000", "--train.output_dir", str(out), "--train.num_workers", "0",
                 "--train.tensorboard", "false"]
    if teacher:
        overrides += ["--distill.teacher", teacher] + (["--distill.teacher_input", args.input_spec]
                                                       if args.input_spec else []) + list(extra)
    trainer = Trainer(load_config(None, overrides))
    trainer.out.mkdir(parents=True, exist_ok=True)
    trainer.setup_data()
    trainer.setup()
    return trainer


def random_teacher(backbone: str, image_size: int, directory: Path) -> str:
    """A facetrain bundle of `backbone` with seeded random weights: a teacher of that architecture's cost."""
    from facetrain.model.bundle import write_random_bundle

    return str(write_random_bundle(directory, backbone, 128, image_size))


def endless(trainer):
    """The trainer's batches epoch after epoch (a small folder has only a few steps per epoch)."""
    epoch = 0
    while True:
        trainer.sampler.set_epoch(epoch)
        yield from trainer.loader
        epoch += 1


def timed(trainer, batches, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step over `steps` steps, after one untimed step. CPU
    time is what the step costs on a machine shared with other work, where wall time also counts the waits."""
    trainer.train_step(batches)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(batches)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def run(args) -> dict:
    import tempfile

    from facetrain.deploy.teacher import describe

    tmp = Path(tempfile.mkdtemp(prefix="distill_step_"))
    if args.teacher_backbone:
        args.teacher, args.input_spec = random_teacher(args.teacher_backbone, args.image_size, tmp / "teacher"), ""
    trainers = {"plain": build(args, tmp / "plain", ""), "distill": build(args, tmp / "distill", args.teacher)}
    if extra_overrides(args):
        trainers["extra"] = build(args, tmp / "extra", args.teacher, extra_overrides(args))
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
    result = {"teacher": describe(trainers["distill"].distiller.teacher),
              "student": f"{args.backbone} at {args.image_size} px, batch {args.batch}, on "
                         f"{trainers['distill'].accelerator.device}"}
    for name, times in per_step.items():
        result[f"{name}_s"] = [round(wall, 3) for wall, _ in times]
        result[f"{name}_cpu_s"] = [round(cpu, 3) for _, cpu in times]
    result["ratio"] = _ratios(result["distill_s"], result["plain_s"])
    if "cached" in trainers:
        result["cached_ratio"] = _ratios(result["cached_s"], result["plain_s"])
    if "extra" in trainers:
        result["extra_ratio"] = _ratios(result["extra_s"], result["distill_s"])
        result["extra_cpu_ratio"] = _ratios(result["extra_cpu_s"], result["distill_cpu_s"])
    return result


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [round(x / y, 3) for x, y in zip(a, b, strict=True)]


def _row(label: str, result: dict, name: str) -> str:
    med = statistics.median
    return (f"| {label} | {med(result[f'{name}_s']):.3f} | {', '.join(map(str, result[f'{name}_s']))} | "
            f"{med(result[f'{name}_cpu_s']):.3f} |")


def extra_rows(args, result: dict) -> tuple[list[str], list[str]]:
    """The `extra` variant's table row and closing sentence ([] without one)."""
    if "extra_s" not in result:
        return [], []
    med = statistics.median
    what = " + ".join(([f"{args.mix_images} {args.mix}"] if args.mix != "none" else [])
                      + ([f"{args.unlabelled_images} unlabelled"] if args.unlabelled else []))
    sentence = (f"The extra views cost **{med(result['extra_ratio']):.2f}x** the distillation step in wall time "
                f"(per round: {', '.join(f'{r:.2f}' for r in result['extra_ratio'])}), "
                f"**{med(result['extra_cpu_ratio']):.2f}x** in CPU time (per round: "
                f"{', '.join(f'{r:.2f}' for r in result['extra_cpu_ratio'])}).")
    return [_row(f"+ extra views ({what} images per step)", result, "extra")], ["", sentence]


def report(args, result: dict, command: str) -> str:
    med = statistics.median
    row, sentence = extra_rows(args, result)
    lines = [f"facetrain's `Trainer.train_step` (augmentation, P x m batch, triplet loss, AdamW), {args.rounds} "
             f"interleaved round(s) of {args.steps} timed steps per variant.", "",
             f"- date: {result['date']}, {result['minutes']:.1f} min",
             f"- machine: {result['machine']}; load average (1 min) before / after: {result['load'][0]:.2f} / "
             f"{result['load'][1]:.2f}",
             f"- command: `{command}`",
             f"- student: {result['student']}; teacher: {result['teacher']}", "",
             "| variant | s/step (median) | per round | CPU s/step (median) |", "|---|---:|---|---:|",
             _row("metric loss only", result, "plain"),
             _row("+ online teacher (cosine + relational)", result, "distill"), *row,
             *([_row("+ cached targets (cosine + relational)", result, "cached")] if "cached_s" in result else []),
             "", f"Distillation costs **{med(result['ratio']):.2f}x** the plain step (per round: "
             f"{', '.join(f'{r:.2f}' for r in result['ratio'])}).", *sentence]
    if "cached_s" in result:
        lines.append(f"Cached targets cost **{med(result['cached_ratio']):.2f}x** the plain step (per round: "
                     f"{', '.join(f'{r:.2f}' for r in result['cached_ratio'])}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from results_md import measure_and_publish  # imports torch (machine()) only once the run is over

    measure_and_publish(SECTION, "bench/distill_step.py", parse_args(argv), argv, run, report)


if __name__ == "__main__":
    main()
