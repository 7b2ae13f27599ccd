"""Images per second of `python -m facetrain.align` with 1 and 2 worker processes, measured in one run.

    python bench/align_throughput.py                                  # 240 celeba_299 photos, workers 1 and 2
    python bench/align_throughput.py --photos 600 --workers 1 2 4 --write

Each setting aligns the same photos (the first --photos files of ../shared/data/faces_wild/celeba_299 in
sorted order, raw in-the-wild photos of at most 384 px) into a fresh output folder, in the order 1, 2, ... and
then once more in reverse order, so a change of machine load during the run shows up as a difference between
the two rounds instead of hiding inside one figure. Reported per setting: images/s over the alignment itself
(align.json `images_per_s_this_run`: from the first photo handed out to the last written, worker start-up
included) and the wall time of the whole command (Python and torch start-up, the scan, the report).
The ratio to 1 worker is the figure to compare across machines. `--write` replaces this benchmark's section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, write_section  # noqa: E402  (bench/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
CELEBA = REPO.parent / "shared" / "data" / "faces_wild" / "celeba_299"


def pick_photos(n: int, into: Path) -> int:
    """Symlink the first n photos (identity folders in name order) under `into`, mirroring the layout."""
    count = 0
    for ident in sorted(p for p in CELEBA.iterdir() if p.is_dir()):
        for f in sorted(ident.iterdir()):
            if count == n:
                return count
            (into / ident.name).mkdir(parents=True, exist_ok=True)
            (into / ident.name / f.name).symlink_to(f)
            count += 1
    return count


def run_once(raw: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "facetrain.align", "--input", str(raw), "--output", str(out),
                    "--workers", str(workers), "--no-progress"], check=True, capture_output=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    report = json.loads((out / "align.json").read_text())
    return {"workers": workers, "images": report["images"], "aligned": report["aligned"],
            "images_per_s": report["images_per_s_this_run"], "wall_s": round(wall, 2),
            "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=240)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--write", action="store_true", help="write the result into bench/RESULTS.md")
    p.add_argument("--note", default="", help="a sentence about the conditions (e.g. other jobs on the machine)")
    args = p.parse_args()
    if not CELEBA.is_dir():
        sys.exit(f"align_throughput: {CELEBA} not found (the shared in-the-wild photos)")
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        raw = Path(tmp) / "raw"
        n = pick_photos(args.photos, raw)
        order = list(args.workers) + list(reversed(args.workers))
        rows = [run_once(raw, Path(tmp) / f"out{w}", w) for w in order]
    by = {w: [r for r in rows if r["workers"] == w] for w in args.workers}
    base = sum(r["images_per_s"] for r in by[args.workers[0]]) / len(by[args.workers[0]])
    lines = [f"{date.today().isoformat()}, {machine()}. Command: `python bench/align_throughput.py --photos "
             f"{args.photos} --workers {' '.join(map(str, args.workers))} --write`. {n} celeba_299 photos (raw, "
             "<= 384 px), MTCNN + similarity warp to 112 px, two rounds (order "
             f"{', '.join(map(str, order))}). {args.note}".rstrip(), "",
             "| workers | images/s, round 1 / round 2 | vs 1 worker | wall s (with start-up) | aligned | load avg |",
             "| --- | --- | --- | --- | --- | --- |"]
    for w, rs in by.items():
        mean = sum(r["images_per_s"] for r in rs) / len(rs)
        speeds = " / ".join(f"{r['images_per_s']:.2f}" for r in rs)
        walls = " / ".join(f"{r['wall_s']:.1f}" for r in rs)
        loads = " / ".join(str(r["load"]) for r in rs)
        lines.append(f"| {w} | {speeds} | {mean / base:.2f}x | {walls} | {rs[0]['aligned']}/{rs[0]['images']} | "
                     f"{loads} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section("Alignment throughput (facetrain.align)", text)


if __name__ == "__main__":
    main()
