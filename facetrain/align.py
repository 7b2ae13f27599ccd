"""Align a folder of raw photos once: detect a face in each, warp it onto the 5-point template, mirror the tree.

    python -m facetrain.align --input /data/raw_photos --output /data/aligned [--size 112] [--workers N]
    python -m facetrain.align --input raw --output aligned --face-choice central --margin 0.2
    accelerate launch -m facetrain.train --config configs/small_data.yaml --data.root /data/aligned

`<input>/<identity>/<image>` becomes `<output>/<identity>/<image stem>.png` (lossless, so that training reads
exactly the pixels `verify` computes from the raw photo with the same recipe). The output folder also gets:

    facetrain_align.json   the recipe (detector, template, size, margin, face choice, ...) and the counts;
                           training copies the recipe into the bundle, and eval / verify / identify then align
                           raw photos the same way
    align.json             the report: every photo without a crop, and every crop worth a look, by name
    .facetrain-align/      the journal that makes a re-run skip finished files (delete it, or --redo, to redo)

Re-running the same command after a crash or on a grown input folder aligns only new or changed files.
Photos are decoded by facetrain.data.images (EXIF orientation applied; gray, CMYK and 16-bit converted to RGB);
alignment itself is facetrain.alignment.recipe.align_image, the run facetrain.alignment.folder.align_folder.
Detection runs in `--workers` processes.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from facetrain.alignment.detectors import DETECTORS  # noqa: E402  (torch-free: the detector loads with a photo)
from facetrain.alignment.folder import NOTES, OUTCOMES, REPORT_FILE, align_folder  # noqa: E402
from facetrain.alignment.recipe import FACE_CHOICES, AlignmentRecipe, recipe_of_folder  # noqa: E402
from facetrain.cli import ArgumentParser, run_cli  # noqa: E402
from facetrain.errors import UserError  # noqa: E402

#: AlignmentRecipe field (as its errors name it) -> the option of this command that sets it
RECIPE_OPTIONS = {"alignment.size": "--size", "alignment.margin": "--margin", "alignment.face_choice": "--face-choice",
                  "alignment.min_confidence": "--min-confidence", "alignment.min_face_px": "--min-face",
                  "alignment.detector": "--detector"}


def build_parser():
    d = AlignmentRecipe()
    p = ArgumentParser(prog="facetrain.align", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of raw photos, <input>/<identity>/<image>")
    p.add_argument("--output", required=True, help="folder for the aligned crops (created; mirrors --input)")
    p.add_argument("--size", type=int, default=d.size, help=f"crop side in px (default {d.size}; the 112 px "
                   "ArcFace template is scaled to it)")
    p.add_argument("--margin", type=float, default=d.margin, help="extra context around the face: the template "
                   f"shrinks by 1/(1+margin) (default {d.margin:g})")
    p.add_argument("--detector", default=d.detector, choices=sorted(DETECTORS))
    p.add_argument("--face-choice", default=None, choices=sorted(FACE_CHOICES),
                   help=f"photos with several faces: keep the largest, the most central, the best by size and "
                   f"centrality together (size_centre), or skip them (default: the choice --output was aligned "
                   f"with, else {d.face_choice}; docs/align.md has the measurement)")
    p.add_argument("--min-confidence", type=float, default=d.min_confidence,
                   help=f"ignore detections below this confidence (default {d.min_confidence:g})")
    p.add_argument("--min-face", type=int, default=d.min_face_px, help=f"smallest face searched for, px "
                   f"(default {d.min_face_px})")
    p.add_argument("--max-template-error", type=float, default=d.max_template_error,
                   help="flag crops whose landmarks lie further than this fraction of the inter-ocular distance "
                   f"from the template (default {d.max_template_error:g})")
    p.add_argument("--workers", type=int, default=0, help="detection processes (default: the CPU count)")
    p.add_argument("--redo", action="store_true", help="ignore the journal: align every file again")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--list", type=int, default=20, help="names listed per category in the printed table "
                   "(align.json lists all; default 20)")
    return p


def print_report(report: dict, listed: int, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if Console().is_terminal else 120)
    table = Table(title=f"facetrain.align: {report['input']} -> {report['output']}", title_justify="left")
    for col in ("", "files", "what happened"):
        table.add_column(col, justify="right" if col == "files" else "left")
    for key, (label, action) in {**OUTCOMES, **NOTES}.items():
        n = report["counts"].get(key, 0)
        if n or key in ("aligned", "no_face"):
            table.add_row(label, f"{n:,}", action)
    console.print(table)
    y = report["yield"]
    console.print(f"{report['aligned']:,} of {report['images']:,} photos aligned"
                  + (f" ({100 * y:.1f}%)" if y is not None else "")
                  + f"; {report['aligned_this_run']:,} processed this run in {report['seconds']:.1f} s"
                  + (f" ({report['images_per_s_this_run']:.2f} images/s)" if report["images_per_s_this_run"] else ""))
    for key, entries in report["lists"].items():
        if not entries or key == "converted":
            continue
        label = {**OUTCOMES, **NOTES}[key][0]
        console.print(f"[bold]{label}[/] ({len(entries)}):")
        for e in entries[:listed]:
            detail = e.get("reason") or e.get("kept") or ""
            console.print(f"  {e['path']}" + (f"  ({detail})" if detail else ""))
        if len(entries) > listed:
            console.print(f"  ... {len(entries) - listed} more in {Path(report['output']) / REPORT_FILE}")


def build_recipe(args) -> dict:
    """The recipe dict of the command line's options; a value out of range names the option that set it."""
    # a folder aligned with an earlier default resumes with its own choice instead of asking for --redo
    face_choice = args.face_choice or (recipe_of_folder(args.output) or {}).get("face_choice") \
        or AlignmentRecipe.face_choice
    try:
        return AlignmentRecipe(detector=args.detector, size=args.size, margin=args.margin,
                               face_choice=face_choice, min_confidence=args.min_confidence,
                               min_face_px=args.min_face, max_template_error=args.max_template_error).to_dict()
    except UserError as err:  # the recipe speaks in its own keys; name the option that set the value
        message = str(err)
        for key, option in RECIPE_OPTIONS.items():
            message = message.replace(key + ":", option + ":")
        raise UserError(message) from None


def run(args) -> dict:
    recipe = build_recipe(args)
    if args.workers < 0:
        raise UserError(f"--workers: must be >= 0 (0 = the CPU count), got {args.workers}")
    if args.list < 0:
        raise UserError(f"--list: must be >= 0, got {args.list}")
    report = align_folder(args.input, args.output, recipe, args.workers, args.redo, args.progress)
    print_report(report, args.list)
    return report


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
