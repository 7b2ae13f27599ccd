"""Align a folder of raw photos once: `<input>/<identity>/<image>` -> `<output>/<identity>/<image stem>.png`.

Each photo is decoded (`data.images.decode`), aligned (`alignment.recipe.align_image`) in one of `workers`
processes and written losslessly (PNG), so that training reads exactly the pixels `verify` computes from the
raw photo with the same recipe. The output folder also gets the recipe and counts (`recipe.MARKER_FILE`, which
training copies into the bundle), the report (`align.json`: every photo without a crop, and every crop worth
a look, by name) and a journal (`.facetrain-align/`) that makes a re-run skip finished files: after a crash or
on a grown input folder only new or changed files are aligned. `facetrain.align` is the command.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from facetrain.alignment.detectors import require_detector
from facetrain.alignment.recipe import MARKER_FILE, MARKER_FORMAT, align_image, recipe_of_folder
from facetrain.data.faceset import check_utf8_names
from facetrain.data.images import decode, is_image_file
from facetrain.errors import UserError
from facetrain.runtime.atomic_dir import DISK_ERRNOS, disk_error, write_atomic

JOURNAL_DIR = ".facetrain-align"
JOURNAL_FILE = "journal.jsonl"
REPORT_FILE = "align.json"
#: what to do when the output disk refuses a write (full, read-only): the journal keeps every finished photo
WRITE_TODO = "free disk space or choose another --output; a re-run of the same command resumes"
CHUNK = 4  # photos per task sent to a worker: few round trips, and a dead worker loses at most these

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


# ----------------------------------------------------------------------------------------------------------
# Finding the files


def scan_input(root: Path, output: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under root as sorted relative paths; dot folders and `output` are skipped.
    Folders that are symbolic links are followed, as training's folder scan follows them (an identity linked
    in from elsewhere is not left out), each real folder once (a link to an ancestor is no loop)."""
    images, others = [], []
    output = output.resolve()
    seen = {Path(root).resolve()}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            real = (here / d).resolve()
            if not d.startswith(".") and real != output and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = os.path.relpath(here / name, root)
            (images if is_image_file(name) else others).append(rel)
    return images, others


def output_names(images: list[str]) -> dict[str, str]:
    """Source relative path -> crop relative path: `<stem>.png`, or `<name>.png` where two files of a folder
    share a stem (a.jpg and a.png); a name still taken (a.jpg.png beside a.jpg and a.png) gets `.<k>` before
    `.png`. No crop overwrites another: each source has its own."""
    stems = Counter(str(Path(p).with_suffix("")) for p in images)
    out, taken = {}, set()
    for p in sorted(images, key=lambda q: (stems[str(Path(q).with_suffix(""))] > 1, q)):  # plain stems first
        q = Path(p)
        name = str(q.with_suffix(".png")) if stems[str(q.with_suffix(""))] == 1 else str(q) + ".png"
        k = 1
        while name in taken:
            name, k = f"{q}.{k}.png", k + 1
        taken.add(name)
        out[p] = name
    return {p: out[p] for p in images}


# ----------------------------------------------------------------------------------------------------------
# One file (runs in a worker process)


def _init_worker(threads: int) -> None:
    import torch  # the detector's; this module itself never imports it

    torch.set_num_threads(threads)
    # Above PIL's MAX_IMAGE_PIXELS (89.5 Mpx) PIL only warns: refuse those too (decompression bombs).
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def align_file(task: tuple[str, str, str, str, dict]) -> dict:
    """Align one photo; returns its journal record. Never raises for a bad file: the record says what happened."""
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
    except UnidentifiedImageError as err:  # images.UnsupportedImage: one line naming the format
        return {**rec, "status": "not_an_image", "reason": str(err)}
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
        # atomic: a crash never leaves a half-written crop that a re-run would skip
        write_atomic(dst, lambda tmp: _save_png(res.crop, tmp), WRITE_TODO)
        rec["out"] = out_rel
    return rec


def _save_png(crop: Image.Image, tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    crop.save(tmp, format="PNG")


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
    old = recipe_of_folder(output)
    if old is not None and old != recipe and not redo:
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in recipe.items() if old.get(k) != v)
        raise UserError(f"--output: {output} was aligned with another recipe ({changed}; {output / MARKER_FILE}): "
                        "choose another --output, or pass --redo to align everything again with the new one")


def _write_json_lines(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomic(path, lambda tmp: tmp.write_text(text), WRITE_TODO)


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2)
    write_atomic(path, lambda tmp: tmp.write_text(text), WRITE_TODO)


def build_report(records: dict[str, dict], others: list[str], recipe: dict, where: tuple[str, str], workers: int,
                 seconds: float, n_new: int) -> dict:
    """align.json's content: counts and lists per outcome (`OUTCOMES`, `NOTES`); `where` = (input, output)."""
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
        "input": where[0], "output": where[1], "recipe": recipe,
        "images": n_images, "aligned": counts["aligned"],
        "yield": round(counts["aligned"] / n_images, 6) if n_images else None,
        "counts": counts, "aligned_this_run": n_new, "seconds": round(seconds, 2),
        "images_per_s_this_run": round(n_new / seconds, 3) if seconds > 0 and n_new else None,
        "workers": workers, "date": datetime.now().isoformat(timespec="seconds"),
        "lists": {k: v for k, v in lists.items() if k != "aligned"},
    }


def _check_folders(root: Path, output: Path) -> None:
    if not root.is_dir():
        raise UserError(f"--input: folder not found: {root} (expected {root}/<identity>/<image>)")
    if root.resolve() == output.resolve():
        raise UserError("--output: must differ from --input (the crops would mix with the photos)")


def _write_marker(output: Path, root: Path, recipe: dict, report: dict | None = None) -> None:
    """The folder's marker: the recipe, and once the run is complete its counts (`alignment.recipe_of_folder`)."""
    marker = {"format": MARKER_FORMAT, "version": 1, "recipe": recipe, "input": str(root.resolve()),
              "complete": report is not None}
    if report is not None:
        marker.update({k: report[k] for k in ("images", "aligned", "counts", "date")})
    _write_json(output / MARKER_FILE, marker)


def _worker_counts(workers: int, todo: int) -> tuple[int, int]:
    """(detection processes, torch threads per process): `workers` 0 = the CPU count, never more than files."""
    cpus = os.cpu_count() or 1
    workers = workers or cpus
    workers = max(1, min(workers, todo)) if todo else 1
    return workers, max(1, cpus // workers)


def align_folder(input: str | Path, output: str | Path, recipe: dict, workers: int = 0, redo: bool = False,
                 progress: bool = True) -> dict:
    """Align every photo of `input`/<identity>/ into `output` (resumable through its journal) with the recipe
    dict `recipe` (`AlignmentRecipe.to_dict()`); returns the report also written to `output`/align.json.
    workers: detection processes (0 = the CPU count); redo: ignore the journal and align everything again."""
    started = time.perf_counter()
    root, out = Path(input), Path(output)
    _check_folders(root, out)
    images, others = scan_input(root, out)
    # training would refuse the crops' names: say so before aligning anything
    check_utf8_names([str(root / p) for p in images + others], root, "--input")
    if not images:
        raise UserError(f"--input: no image files under {root} (extensions: see facetrain.data.images)")
    require_detector(recipe["detector"])  # a missing package: its one line now, not in a worker process

    journal = out / JOURNAL_DIR / JOURNAL_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        _check_marker(out, recipe, redo)
        journal.parent.mkdir(exist_ok=True)
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        raise disk_error(err, Path(err.filename or out), WRITE_TODO) from None
    previous = _read_journal(journal)
    written_before = {r["out"] for r in previous.values() if r.get("out")}
    if redo:
        previous = {}
        journal.unlink(missing_ok=True)
    names = output_names(images)
    records = {rel: previous[rel] for rel in images if _still_valid(previous.get(rel), root / rel, out)}
    todo = [(rel, str(root / rel), str(out), names[rel], recipe) for rel in images if rel not in records]
    _write_marker(out, root, recipe)

    workers, threads = _worker_counts(workers, len(todo))
    t0 = time.perf_counter()
    _align_all(todo, records, journal, workers, threads, progress)
    seconds = time.perf_counter() - t0
    # Crops this command wrote earlier whose photo is gone, or now has no face (a changed photo, --redo with
    # another recipe), would otherwise be trained on: remove them. Files it never wrote are left alone.
    stale = sorted(written_before - {r["out"] for r in records.values() if r.get("out")})
    for rel in stale:
        (out / rel).unlink(missing_ok=True)
    _write_json_lines(journal, [records[rel] for rel in sorted(records)])  # compacted: one line per photo

    report = build_report(records, others, recipe, (str(input), str(output)), workers, seconds if todo else 0.0,
                          len(todo))
    report["removed_stale_crops"] = stale
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    _write_json(out / REPORT_FILE, report)
    _write_marker(out, root, recipe, report)
    return report


def _align_all(todo: list, records: dict, journal: Path, workers: int, threads: int, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(highlight=False, stderr=True)
    bar = Progress(TextColumn("[bold]align"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (progress and console.is_terminal))
    try:
        log = open(journal, "a")
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        raise disk_error(err, journal, WRITE_TODO) from None
    with bar, log:
        task = bar.add_task("align", total=len(todo))

        def done(rec: dict) -> None:
            records[rec["src"]] = rec
            try:
                log.write(json.dumps(rec) + "\n")
                log.flush()  # each finished file is on disk at once: a crash loses at most the files in flight
            except OSError as err:
                if err.errno not in DISK_ERRNOS:
                    raise
                raise disk_error(err, journal, WRITE_TODO) from None
            bar.advance(task)

        if not todo:
            return
        if workers == 1:  # in this process: no start-up cost of a worker
            with warnings.catch_warnings():
                _init_worker(threads)
                for t in todo:
                    done(align_file(t))
            return
        _align_in_workers(todo, workers, threads, done)


def align_chunk(tasks: list[tuple]) -> list[dict]:
    """`align_file` over a few photos (runs in a worker process)."""
    return [align_file(t) for t in tasks]


def _align_in_workers(todo: list, workers: int, threads: int, done: Callable[[dict], None]) -> None:
    """Align `todo` in `workers` processes, `done(record)` for each photo as it finishes. A worker that dies
    (the kernel's out-of-memory killer, a crash in native code) breaks the pool: one line, and the journal
    keeps every photo finished before it, so a re-run resumes (a `multiprocessing.Pool` would wait forever
    for the dead worker's photos)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    # spawn: torch's thread pools do not survive fork safely
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(threads,))
    finished_photos = 0
    try:
        pending, queued = set(), iter(chunks)
        while True:
            # two chunks per worker in flight: the workers stay busy, the finished ones are journaled at once
            pending |= {pool.submit(align_chunk, c) for c in _take(queued, 2 * workers - len(pending))}
            if not pending:
                return
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                for rec in future.result():
                    done(rec)
                    finished_photos += 1
    except BrokenProcessPool:
        raise UserError(f"--workers: a detection process died (killed by the system, e.g. out of memory, or "
                        f"crashed) with {len(todo) - finished_photos} of {len(todo)} photos left; the finished "
                        "ones are in the journal: run the same command again to resume (fewer --workers use "
                        "less memory)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _take(items, n: int) -> list:
    return [item for _, item in zip(range(max(0, n)), items, strict=False)]
