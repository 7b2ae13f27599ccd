"""What a teacher costs per image on this CPU: `Teacher.embed` of 112 px images through onnxruntime.

    python bench/teacher_cost.py                        # SFace from ../shared/weights; its section of RESULTS.md
    python bench/teacher_cost.py --smoke --no-write     # seconds: checks the script runs

Variants, interleaved round by round (so a neighbour's load hits them alike): batch 1 and 32, onnxruntime
intra-op threads 1 and 2, and the int8 block-quantized weights either folded to fp32 once at load
(`fold_quantized=True`: onnxruntime's QDQ handling off, constant folding dequantizes the weights) or dequantized
in the graph at every run. Each measurement embeds at least --images images (whole batches) of random pixels
already at the teacher's side (resizing is the caller's view, not the teacher's cost). Reported per image: wall
time (median over rounds) and process CPU time (what the variant takes from the machine's cores; with one thread
it is the one-core cost, and it is less disturbed than wall time by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
SECTION = "Teacher cost per image (bench/teacher_cost.py)"
SFACE = REPO.parent / "shared" / "weights" / "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SPEC = "size=112,order=rgb,range=0-255"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SFACE), help="teacher file (default: SFace from ../shared/weights)")
    p.add_argument("--input-spec", default=SFACE_SPEC, help="its input spec (default SFace's)")
    p.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    p.add_argument("--threads", default="1,2", help="onnxruntime intra-op threads, comma-separated")
    p.add_argument("--images", type=int, default=64, help="images per measurement, at least (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--smoke", action="store_true", help="one round of 2 images per variant")
    p.add_argument("--json", default="", help="also write the raw figures here")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not touch RESULTS.md")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.images = 1, 2
    return args


def measure(teacher, batch: int, images: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per image over whole batches totalling >= `images`, after one warm-up call."""
    x = np.random.default_rng(0).random((batch, 3, teacher.image_size, teacher.image_size), dtype=np.float32)
    teacher.embed(x)
    calls = max(1, -(-images // batch))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        teacher.embed(x)
    done = calls * batch
    return 1000 * (time.perf_counter() - wall) / done, 1000 * (time.process_time() - cpu) / done


def run(args) -> dict:
    from facetrain.deploy.teacher import describe, load_teacher

    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    teachers = {(fold, t): load_teacher(args.model, args.input_spec, threads=t, fold_quantized=fold)
                for fold in (True, False) for t in threads}
    rows = {(fold, t, b): [] for (fold, t) in teachers for b in batches}
    for _ in range(args.rounds):
        for (fold, t, b), got in rows.items():
            got.append(measure(teachers[(fold, t)], b, args.images))
    return {"teacher": describe(next(iter(teachers.values()))), "rows": [
        {"fold_quantized": fold, "threads": t, "batch": b,
         "wall_ms": [round(w, 2) for w, _ in got], "cpu_ms": [round(c, 2) for _, c in got]}
        for (fold, t, b), got in rows.items()]}


def report(args, result: dict, command: str) -> str:
    lines = [f"One teacher's embedding of 112 px images, per image; {args.rounds} interleaved round(s) of >= "
             f"{args.images} images per variant.", "",
             f"- date: {result['date']}, {result['minutes']:.1f} min",
             f"- machine: {result['machine']}; load average (1 min) before / after: {result['load'][0]:.2f} / "
             f"{result['load'][1]:.2f}",
             f"- command: `{command}`",
             f"- teacher: {result['teacher']}", "",
             "| weights | threads | batch | wall ms/img (median) | per round | CPU ms/img (median) |",
             "|---|---:|---:|---:|---|---:|"]
    for row in result["rows"]:
        weights = "fp32, folded at load" if row["fold_quantized"] else "int8, dequantized per run"
        lines.append(f"| {weights} | {row['threads']} | {row['batch']} | {statistics.median(row['wall_ms']):.1f} | "
                     f"{', '.join(f'{w:.1f}' for w in row['wall_ms'])} | {statistics.median(row['cpu_ms']):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from results_md import measure_and_publish  # imports torch (machine()) only once the run is over

    measure_and_publish(SECTION, "bench/teacher_cost.py", parse_args(argv), argv, run, report)


if __name__ == "__main__":
    main()
