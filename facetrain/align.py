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
alignment itself is facetrain.alignment.recipe.align_image. Detection runs in `--workers` processes.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())

import json
import sys
import time
import warnings
from collections import Counter
from datetime import datetime
from pathlib import Path

from facetrain.cli import run_cli
from facetrain.errors import UserError

JOURNAL_DIR = ".facetrain-align"
JOURNAL_FILE = "journal.jsonl"
REPORT_FILE = "align.json"

# Report category -> (label in the table, what happened). A photo is in exactly one of the first group; the
# second group annotates photos that were written (several_faces, far_from_template, converted) or other files.
OUTCOMES = {
    "aligned": ("aligned", "crop written"),
    "no_face": ("no face found", "no crop"),
    "several_skipped": ("several faces, skipped", "no crop (--face-choice skip)"),
    "too_small": ("image smaller than a face", "no crop"),
    "empty_file": ("zero-byte files", "no crop"),
    "not_an_image": ("not an image", "no crop"),
    "corrupt": ("truncated / corrupt", "no crop"),
    "unreadable": ("cannot be read (permissions, removed)", "no crop"),
    "too_large": ("over PIL's pixel limit", "no crop (decompression bomb)"),
    "failed": ("detector / warp errors", "no crop"),
}
NOTES = {
    "several_faces": ("several faces, one kept", "crop written (which one and why: listed)"),
    "far_from_template": ("landmarks far from template", "crop written, worth a look"),
    "converted": ("not 8-bit RGB", "converted to RGB"),
    "ignored": ("non-image files", "not read"),
}


#: AlignmentRecipe field (as its errors name it) -> the option of this command that sets it
RECIPE_OPTIONS = {"alignment.size": "--size", "alignment.margin": "--margin", "alignment.face_choice": "--face-choice",
                  "alignment.min_confidence": "--min-confidence", "alignment.min_face_px": "--min-face",
                  "alignment.detector": "--detector"}


def build_parser():
    from facetrain.alignment.detectors import DETECTORS
    from facetrain.alignment.recipe import FACE_CHOICES, AlignmentRecipe
    from facetrain.cli import ArgumentParser

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
    p.add_argument("--face-choice", default=d.face_choice, choices=sorted(FACE_CHOICES),
                   help=f"photos with several faces: keep the largest, the most central, or skip them "
                   f"(default {d.face_choice})")
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


# ----------------------------------------------------------------------------------------------------------
# Finding the files


def scan_input(root: Path, output: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under root as sorted relative paths; dot folders and `output` are skipped."""
    images, others = [], []
    output = output.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != output)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = os.path.relpath(here / name, root)
            from facetrain.data.images import is_image_file

            (images if is_image_file(name) else others).append(rel)
    return images, others


def output_names(images: list[str]) -> dict[str, str]:
    """Source relative path -> crop relative path: `<stem>.png`, or `<name>.png` where two files of a folder
    share a stem (a.jpg and a.png), so no crop overwrites another."""
    stems = Counter(str(Path(p).with_suffix("")) for p in images)
    out = {}
    for p in images:
        q = Path(p)
        out[p] = str(q.with_suffix(".png")) if stems[str(q.with_suffix(""))] == 1 else str(q) + ".png"
    return out


# ----------------------------------------------------------------------------------------------------------
# One file (runs in a worker process)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # Above PIL's MAX_IMAGE_PIXELS (89.5 Mpx) PIL only warns: refuse those too (decompression bombs).
    from PIL import Image

    warnings.simplefilter("error", Image.DecompressionBombWarning)


def align_file(task: tuple[str, str, str, str, dict]) -> dict:
    """Align one photo; returns its journal record. Never raises for a bad file: the record says what happened."""
    from PIL import Image, UnidentifiedImageError

    from facetrain.alignment.recipe import align_image
    from facetrain.data.images import decode

    rel, src, out_root, out_rel, recipe = task
    dst = os.path.join(out_root, out_rel)
    try:
        st = os.stat(src)
    except OSError as err:  # removed or made unreachable since the scan
        return {"src": rel, "size": None, "mtime_ns": None, "status": "unreadable", "out": None,
                "reason": f"{type(err).__name__}: {err.strerror or err}"}
    rec = {"src": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "status": "", "out": None, "reason": ""}
    if st.st_size == 0:
        return {**rec, "status": "empty_file", "reason": "0 bytes"}
    try:
        img = decode(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return {**rec, "status": "too_large", "reason": str(err).split(",")[0][:200]}
    except UnidentifiedImageError:
        return {**rec, "status": "not_an_image", "reason": "no image format recognised"}
    except (PermissionError, FileNotFoundError, IsADirectoryError) as err:
        return {**rec, "status": "unreadable", "reason": f"{type(err).__name__}: {err.strerror or err}"}
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        return {**rec, "status": "corrupt", "reason": f"{type(err).__name__}: {err}"[:200]}
    rec["mode"] = img.mode
    try:
        res = align_image(img, recipe)
    except UserError:
        raise  # a missing package: the whole run stops with its one line
    except Exception as err:  # a detector or warp failure on one odd photo must not stop the run
        return {**rec, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:200]}
    rec.update(status=res.status, reason=res.reason, n_faces=res.n_faces, choice=res.choice,
               template_error=None if res.template_error is None else round(res.template_error, 4),
               score=None if res.score is None else round(res.score, 4))
    if res.crop is not None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = dst + ".tmp"
        res.crop.save(tmp, format="PNG")
        os.replace(tmp, dst)  # atomic: a crash never leaves a half-written crop that a re-run would skip
        rec["out"] = out_rel
    return rec


# ----------------------------------------------------------------------------------------------------------
# The run


def _read_journal(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            done[rec["src"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash: that file is simply aligned again
    return done


def _still_valid(rec: dict | None, src: Path, output: Path) -> bool:
    if rec is None:
        return False
    try:
        st = src.stat()
    except OSError:
        return False
    if rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
        return False
    return rec.get("out") is None or (output / rec["out"]).is_file()


def _check_marker(output: Path, recipe: dict, redo: bool) -> None:
    from facetrain.alignment.recipe import MARKER_FILE, recipe_of_folder

    old = recipe_of_folder(output)
    if old is not None and old != recipe and not redo:
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in recipe.items() if old.get(k) != v)
        raise UserError(f"--output: {output} was aligned with another recipe ({changed}; {output / MARKER_FILE}): "
                        "choose another --output, or pass --redo to align everything again with the new one")


def _write_json_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def build_report(records: dict[str, dict], others: list[str], recipe: dict, args, seconds: float,
                 n_new: int) -> dict:
    lists: dict[str, list[dict]] = {k: [] for k in (*OUTCOMES, *NOTES)}
    for rel in sorted(records):
        rec = records[rel]
        status = rec["status"]
        key = "aligned" if status in ("ok", "far_from_template") else status
        entry = {"path": rel, "reason": rec.get("reason", "")}
        if key != "aligned":
            lists.setdefault(key, []).append(entry)
            continue
        lists["aligned"].append({"path": rel, "out": rec["out"]})
        if status == "far_from_template":
            lists["far_from_template"].append({**entry, "template_error": rec.get("template_error")})
        if (rec.get("n_faces") or 0) > 1:
            lists["several_faces"].append({"path": rel, "n_faces": rec["n_faces"], "kept": rec.get("choice", "")})
        if rec.get("mode") and rec["mode"] != "RGB":
            lists["converted"].append({"path": rel, "mode": rec["mode"]})
    for rec in records.values():  # photos without a crop were converted too: say so
        if rec["status"] not in ("ok", "far_from_template") and rec.get("mode") not in (None, "RGB"):
            lists["converted"].append({"path": rec["src"], "mode": rec["mode"]})
    lists["converted"].sort(key=lambda e: e["path"])
    lists["ignored"] = [{"path": p, "reason": "not an image extension"} for p in others]
    n_images = len(records)
    counts = {k: len(v) for k, v in lists.items()}
    return {
        "input": str(args.input), "output": str(args.output), "recipe": recipe,
        "images": n_images, "aligned": counts["aligned"],
        "yield": round(counts["aligned"] / n_images, 6) if n_images else None,
        "counts": counts, "aligned_this_run": n_new, "seconds": round(seconds, 2),
        "images_per_s_this_run": round(n_new / seconds, 3) if seconds > 0 and n_new else None,
        "workers": args.workers, "date": datetime.now().isoformat(timespec="seconds"),
        "lists": {k: v for k, v in lists.items() if k != "aligned"},
    }


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


def run(args) -> dict:
    from facetrain.alignment.recipe import MARKER_FILE, MARKER_FORMAT, AlignmentRecipe

    started = time.perf_counter()
    root, output = Path(args.input), Path(args.output)
    if not root.is_dir():
        raise UserError(f"--input: folder not found: {root} (expected {root}/<identity>/<image>)")
    if root.resolve() == output.resolve():
        raise UserError("--output: must differ from --input (the crops would mix with the photos)")
    try:
        recipe = AlignmentRecipe(detector=args.detector, size=args.size, margin=args.margin,
                                 face_choice=args.face_choice, min_confidence=args.min_confidence,
                                 min_face_px=args.min_face, max_template_error=args.max_template_error).to_dict()
    except UserError as err:  # the recipe speaks in its own keys; name the option that set the value
        message = str(err)
        for key, option in RECIPE_OPTIONS.items():
            message = message.replace(key + ":", option + ":")
        raise UserError(message) from None
    if args.workers < 0:
        raise UserError(f"--workers: must be >= 0 (0 = the CPU count), got {args.workers}")
    if args.list < 0:
        raise UserError(f"--list: must be >= 0, got {args.list}")
    images, others = scan_input(root, output)
    if not images:
        raise UserError(f"--input: no image files under {root} (extensions: see facetrain.data.images)")
    # Fail on a missing package now, with its one line, rather than in a worker process
    from facetrain.alignment.detectors import require_detector

    require_detector(recipe["detector"])

    output.mkdir(parents=True, exist_ok=True)
    _check_marker(output, recipe, args.redo)
    journal_dir = output / JOURNAL_DIR
    journal_dir.mkdir(exist_ok=True)
    journal = journal_dir / JOURNAL_FILE
    previous = _read_journal(journal)
    written_before = {r["out"] for r in previous.values() if r.get("out")}
    if args.redo:
        previous = {}
        journal.unlink(missing_ok=True)
    names = output_names(images)
    records = {rel: previous[rel] for rel in images if _still_valid(previous.get(rel), root / rel, output)}
    todo = [(rel, str(root / rel), str(output), names[rel], recipe) for rel in images if rel not in records]
    _write_json(output / MARKER_FILE, {"format": MARKER_FORMAT, "version": 1, "recipe": recipe,
                                       "input": str(root.resolve()), "complete": False})

    workers = args.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(todo))) if todo else 1
    args.workers = workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    t0 = time.perf_counter()
    _align_all(todo, records, journal, workers, threads, args.progress)
    seconds = time.perf_counter() - t0
    # Crops this command wrote earlier whose photo is gone, or now has no face (a changed photo, --redo with
    # another recipe), would otherwise be trained on: remove them. Files it never wrote are left alone.
    stale = sorted(written_before - {r["out"] for r in records.values() if r.get("out")})
    for rel in stale:
        (output / rel).unlink(missing_ok=True)
    _write_json_lines(journal, [records[rel] for rel in sorted(records)])  # compacted: one line per photo

    report = build_report(records, others, recipe, args, seconds if todo else 0.0, len(todo))
    report["removed_stale_crops"] = stale
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    _write_json(output / REPORT_FILE, report)
    _write_json(output / MARKER_FILE, {"format": MARKER_FORMAT, "version": 1, "recipe": recipe,
                                       "input": str(root.resolve()), "complete": True, "images": report["images"],
                                       "aligned": report["aligned"], "counts": report["counts"],
                                       "date": report["date"]})
    print_report(report, args.list)
    return report


def _align_all(todo: list, records: dict, journal: Path, workers: int, threads: int, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(highlight=False, stderr=True)
    bar = Progress(TextColumn("[bold]align"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (progress and console.is_terminal))
    with bar, open(journal, "a") as log:
        task = bar.add_task("align", total=len(todo))

        def done(rec: dict) -> None:
            records[rec["src"]] = rec
            log.write(json.dumps(rec) + "\n")
            log.flush()  # each finished file is on disk at once: a crash loses at most the files in flight
            bar.advance(task)

        if not todo:
            return
        if workers == 1:  # in this process: no start-up cost of a worker
            with warnings.catch_warnings():
                _init_worker(threads)
                for t in todo:
                    done(align_file(t))
            return
        import multiprocessing as mp

        # spawn: torch's thread pools do not survive fork safely; chunks of 4 keep the workers busy while
        # the progress bar still moves
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
            for rec in pool.imap_unordered(align_file, todo, chunksize=4):
                done(rec)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
