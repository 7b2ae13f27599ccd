"""Data pre-flight: check every file of an image folder before hours of training (or an evaluation) start.

Training calls `apply_preflight` automatically for `data.source: folder` (turn it off with
`--data.preflight false`); `facetrain.eval` and `identify`'s gallery enrolment run the same decode check on
exactly the files they read (`check_files`, with `--bad-images error|skip`):

    accelerate launch -m facetrain.train --data.source folder --data.root /data/faces                 # error mode
    accelerate launch -m facetrain.train --data.source folder --data.root /data/faces --data.bad_images skip

What is checked (root/<identity>/<image>), and what happens:

    refused (data.bad_images decides: `error` stops and lists them, `skip` trains without them)
      empty_file        zero-byte file
      not_an_image      no image format facetrain reads (a text file named .jpg, a macOS `._x.jpg` resource file,
                        a HEIC/PDF/EPS/SVG file: named, to convert to JPEG or PNG)
      corrupt           header fine but the pixels do not decode (truncated download, damaged file)
      too_large         more than data.max_image_pixels pixels (decompression bombs)
    counted and reported, never refused
      converted         not RGB (grayscale, palette, RGBA, CMYK, 16-bit): converted to RGB on load
      wrong_extension   content format differs from the extension (a PNG named .jpg is decoded by content and
                        used; an image named .dat is not read by training: rename it)
      ignored           non-image files, nested folders, files outside identity folders (training never reads them)
      empty_identity    identity folder without a usable image (dropped)
      single_image      identity with one usable image (no genuine pair: never sampled for training batches)

Cost/benefit of "truncated": a header check (`Image.open`, ~0.025 ms per file) cannot see a truncated body and
`verify()` only checks PNG chunk CRCs, so every image is fully decoded once. JPEGs are decoded in draft mode
(libjpeg DCT scaling to 1/8 size): every byte of the entropy-coded stream is still read, so truncation is found,
for about 2/3 of the full-decode time. Measured on one core of this project's CPU: 0.11 ms for a 112 px JPEG,
0.27 ms at 250 px, 3.3 ms at 1024 px. PIL releases the GIL while reading and decoding, so a thread pool
scales with cores: about a minute for a million 250 px face crops on 4 cores, against hours of training.

The scan runs on the main process only; every rank receives the same result (`broadcast_object`), so all ranks
train on the identical filtered list. The run directory gets `preflight.json` (counts and every listed file)
and `preflight.txt` (the summary table and the lists).
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from facetrain.data.faceset import FaceSet, check_utf8_names
from facetrain.data.images import IMAGE_EXTENSIONS, open_image
from facetrain.errors import UserError

# Problem key -> (label in the summary table, what facetrain does). REFUSED follow data.bad_images.
REFUSED = {
    "empty_file": ("zero-byte files", "refused"),
    "not_an_image": ("not an image", "refused"),
    "corrupt": ("truncated / corrupt", "refused"),
    "too_large": ("over data.max_image_pixels", "refused (decompression bomb)"),
}
NOTED = {
    "converted": ("not RGB", "converted to RGB on load"),
    "wrong_extension": ("extension does not match content", "used if the extension is an image one"),
    "ignored": ("non-image files / folders", "not read"),
    "empty_identity": ("identities without a usable image", "dropped"),
    "single_image": ("identities with a single image", "not sampled for training batches"),
    "excluded": ("left out by data.exclude", "not read (an audit's likely mislabels / duplicates)"),
}

# Format PIL should find behind each image extension (a mismatch is reported, not refused).
# PIL names multi-picture camera JPEGs "MPO"; PGM files are read by its "PPM" plugin.
_EXT_FORMAT = {".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",), ".ppm": ("PPM",),
               ".pgm": ("PPM",), ".bmp": ("BMP",), ".tif": ("TIFF",), ".tiff": ("TIFF",), ".webp": ("WEBP",),
               ".gif": ("GIF",)}
_FORMAT_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "PPM": ".ppm", "BMP": ".bmp", "TIFF": ".tif",
               "WEBP": ".webp", "GIF": ".gif"}
LIST_IN_MESSAGE = 20  # refused files named in the one-line error; the full list is in preflight.txt/json


@dataclass(frozen=True)
class FileCheck:
    """Outcome of decoding one file."""

    path: str
    problem: str | None = None
    """A key of REFUSED, or None when the image is usable."""
    detail: str = ""
    mode: str = ""
    """PIL mode from the header (RGB, L, P, RGBA, CMYK, I;16, ...)."""
    format: str = ""
    """Format recognised from the content (JPEG, PNG, ...), whatever the extension says."""


def check_image(path: str, max_image_pixels: int) -> FileCheck:
    """Open and fully decode one file (JPEG in draft mode); never raises."""
    try:
        if os.path.getsize(path) == 0:
            return FileCheck(path, "empty_file", "0 bytes")
        with open_image(path) as im:
            (w, h), mode, fmt = im.size, im.mode, im.format or ""
            if w * h > max_image_pixels:
                return FileCheck(path, "too_large", f"{w}x{h} = {w * h:,} pixels > data.max_image_pixels "
                                 f"{max_image_pixels:,}", mode, fmt)
            if fmt in ("JPEG", "MPO"):  # DCT scaling: reads the whole stream, skips most of the inverse DCT work
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Image.DecompressionBombError as err:  # beyond 2x PIL's own limit: refused before decoding
        return FileCheck(path, "too_large", str(err).split(",")[0])
    except Image.UnidentifiedImageError as err:  # images.UnsupportedImage: one line naming the format
        return FileCheck(path, "not_an_image", str(err))
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        return FileCheck(path, "corrupt", f"{type(err).__name__}: {err}"[:200])
    return FileCheck(path, None, "", mode, fmt)


@dataclass
class PreflightReport:
    """What a scan found. `bad` follow the policy; `notes` are counted only."""

    root: str
    max_image_pixels: int
    identities: int = 0
    """Identity folders with at least one usable image."""
    images: int = 0
    """Usable images (not refused)."""
    modes: dict[str, int] = field(default_factory=dict)
    """Usable images per PIL mode; everything but RGB is converted on load."""
    bad: list[dict] = field(default_factory=list)
    """Refused files: {"path", "problem", "detail"}, sorted by path."""
    notes: list[dict] = field(default_factory=list)
    """Counted, never refused: {"path", "problem", "detail"} (converted images are counted in `modes` only)."""
    seconds: float = 0.0

    @property
    def bad_paths(self) -> set[str]:
        return {b["path"] for b in self.bad}

    def counts(self) -> dict[str, int]:
        """Every problem key with its count (zeros included), plus identities and images."""
        found = Counter(b["problem"] for b in self.bad) + Counter(n["problem"] for n in self.notes)
        out = {"identities": self.identities, "images": self.images}
        out.update({k: found.get(k, 0) for k in REFUSED})
        out.update({k: found.get(k, 0) for k in NOTED})
        out["converted"] = sum(v for k, v in self.modes.items() if k != "RGB")
        return out

    def to_dict(self) -> dict:
        return {"counts": self.counts(), **asdict(self)}

    def table(self) -> Table:
        counts = self.counts()
        table = Table(title=f"data pre-flight: {self.root} ({self.seconds:.1f} s)", title_justify="left")
        table.add_column("check")
        table.add_column("count", justify="right")
        table.add_column("action")
        table.add_row("identities (usable)", str(self.identities), "")
        table.add_row("images (usable)", str(self.images), "")
        for key, (label, action) in REFUSED.items():
            table.add_row(label, str(counts[key]), action if counts[key] else "", style="red" if counts[key] else "")
        for key, (label, action) in NOTED.items():
            if key == "converted" and counts[key]:
                label += " (" + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items()) if m != "RGB") + ")"
            table.add_row(label, str(counts[key]), action if counts[key] else "",
                          style="yellow" if counts[key] else "")
        return table

    def text(self) -> str:
        """The table plus every listed file, as plain text (preflight.txt)."""
        buf = io.StringIO()
        console = Console(file=buf, width=120, color_system=None, highlight=False)
        console.print(self.table())
        for title, rows in (("refused", self.bad), ("noted", self.notes)):
            if rows:
                console.print(f"\n{title} ({len(rows)}):")
                for r in rows:
                    console.print(f"  {r['problem']:<16} {r['path']}  {r['detail']}", soft_wrap=True)
        return buf.getvalue()

    def write(self, out_dir: str | Path, stem: str = "preflight") -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(self.to_dict(), indent=2))
        (out / f"{stem}.txt").write_text(self.text())

    def error_message(self, policy_key: str = "data.bad_images", saved_to: Path | None = None,
                      remedy: str = "") -> str:
        """One line: how many files are refused, which (the first LIST_IN_MESSAGE), and what to do."""
        shown = "; ".join(f"{b['path']} ({b['problem']})" for b in self.bad[:LIST_IN_MESSAGE])
        more = f"; and {len(self.bad) - LIST_IN_MESSAGE} more" if len(self.bad) > LIST_IN_MESSAGE else ""
        where = f" (full list: {saved_to})" if saved_to else ""
        remedy = remedy or f"set {policy_key}: skip to train without them"
        return (f"{self.root}: {len(self.bad)} image(s) cannot be used: {shown}{more}{where}; fix or remove them, "
                f"or {remedy}")


def _identity_folders(base: Path) -> tuple[list[Path], list[dict]]:
    """Identity folders (sorted, hidden ones skipped as the folder scan does) and stray entries at the root."""
    folders, stray = [], []
    for p in sorted(base.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            folders.append(p)
        else:
            stray.append({"path": str(p), "problem": "ignored", "detail": "file outside identity folders"})
    return folders, stray


def _check_all(paths: list[str], max_image_pixels: int, console: Console | None, progress: bool,
               threads: int | None) -> dict[str, FileCheck]:
    """`check_image` of every path, in a thread pool, with a progress bar on a terminal."""
    threads = threads or min(32, 4 * (os.cpu_count() or 1))  # decoding releases the GIL; I/O latency hides too
    console = console or Console(highlight=False)
    bar = Progress(TextColumn("[bold]pre-flight"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (progress and console.is_terminal))
    results: dict[str, FileCheck] = {}
    # warnings.catch_warnings is not thread-safe: silence PIL (bomb, EXIF, palette warnings) around the pool
    with bar, warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        warnings.simplefilter("ignore")
        task = bar.add_task("pre-flight", total=len(paths))
        for res in pool.map(lambda p: check_image(p, max_image_pixels), paths):
            results[res.path] = res
            bar.advance(task)
    return results


def check_files(paths: list[str], max_image_pixels: int, what: str, console: Console | None = None,
                progress: bool = True) -> PreflightReport:
    """The pre-flight's decode check of exactly the files an evaluation or a gallery enrolment will read:
    every refused file is listed in `report.bad` at once (the callers apply `--bad-images`)."""
    start = time.perf_counter()
    results = _check_all(list(dict.fromkeys(paths)), max_image_pixels, console, progress, None)
    report = PreflightReport(what, max_image_pixels)
    modes: Counter = Counter()
    for res in results.values():
        if res.problem is None:
            modes[res.mode] += 1
        else:
            report.bad.append({"path": res.path, "problem": res.problem, "detail": res.detail})
    report.images = sum(modes.values())
    report.modes = dict(sorted(modes.items()))
    report.bad.sort(key=lambda r: r["path"])
    report.seconds = time.perf_counter() - start
    return report


def scan(root: str | Path, max_image_pixels: int, console: Console | None = None, progress: bool = True,
         threads: int | None = None) -> PreflightReport:
    """Check every entry under root/<identity>/ in a thread pool; return the report (raises only if `root`
    is not a folder)."""
    start = time.perf_counter()
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"data.root: folder not found: {root} (expected {root}/<identity>/<image>.jpg)")
    folders, notes = _identity_folders(base)
    images: dict[str, list[str]] = {}  # identity folder -> image-extension files
    others: list[str] = []  # files without an image extension: ignored by training, checked for a lost image
    for ident in folders:
        images[str(ident)] = []
        for f in sorted(ident.iterdir()):
            if f.is_dir():
                notes.append({"path": str(f), "problem": "ignored", "detail": "nested folder (not read)"})
            elif f.suffix.lower() in IMAGE_EXTENSIONS:
                images[str(ident)].append(str(f))
            else:
                others.append(str(f))
    todo = [p for files in images.values() for p in files] + others
    check_utf8_names(todo, base, "data.root")  # before any report holds a name it could not write
    results = _check_all(todo, max_image_pixels, console, progress, threads)

    report = PreflightReport(str(root), max_image_pixels)
    modes: Counter = Counter()
    for path in others:
        res = results[path]
        if res.problem is None:
            want = _FORMAT_EXT.get(res.format, "." + res.format.lower())
            notes.append({"path": path, "problem": "wrong_extension",
                          "detail": f"{res.format} image with extension {Path(path).suffix or '(none)'}: not read; "
                                    f"rename it to {want} to use it"})
        else:
            notes.append({"path": path, "problem": "ignored", "detail": "not an image extension (not read)"})
    for ident, files in images.items():
        usable = 0
        for path in files:
            res = results[path]
            if res.problem is not None:
                report.bad.append({"path": path, "problem": res.problem, "detail": res.detail})
                continue
            usable += 1
            modes[res.mode] += 1
            ext = Path(path).suffix.lower()
            if res.format not in _EXT_FORMAT.get(ext, (res.format,)):
                notes.append({"path": path, "problem": "wrong_extension",
                              "detail": f"{res.format} content with extension {ext}: used (decoded by content)"})
        if usable == 0:
            notes.append({"path": ident, "problem": "empty_identity",
                          "detail": f"{len(files)} image file(s), none usable" if files else "no image files"})
        elif usable == 1:
            notes.append({"path": ident, "problem": "single_image", "detail": "no genuine pair"})
        report.identities += usable > 0
        report.images += usable
    report.modes = dict(sorted(modes.items()))
    report.bad.sort(key=lambda r: r["path"])
    report.notes = sorted(notes, key=lambda r: (r["problem"], r["path"]))
    report.seconds = time.perf_counter() - start
    return report


def enforce(report: PreflightReport, policy: str, policy_key: str = "data.bad_images",
            saved_to: Path | None = None) -> None:
    """`error`: raise a UserError naming the refused files; `skip`: nothing (the caller drops report.bad_paths)."""
    if report.bad and policy == "error":
        raise UserError(report.error_message(policy_key, saved_to))


class _SubsetLoader:
    """Picklable loader of a filtered FaceSet: new index -> the original loader's index."""

    def __init__(self, loader: Callable, indices: np.ndarray):
        self.loader, self.indices = loader, indices

    def __call__(self, i: int):
        return self.loader(int(self.indices[i]))


def without_files(faceset: FaceSet, drop: set[str], excluded: bool = False) -> FaceSet:
    """`faceset` minus the images whose path is in `drop`; identities left without images disappear and labels
    are renumbered 0..n-1 in the original (sorted) order. The dropped files are recorded as `skipped` (refused
    by the pre-flight: validation counts them as failures to acquire) or, with excluded=True, as `excluded`
    (left out on purpose by data.exclude: not failures)."""
    assert faceset.paths is not None
    kept = np.asarray([i for i, p in enumerate(faceset.paths) if p not in drop], dtype=np.int64)
    old = faceset.labels[kept]
    used = np.unique(old)
    remap = np.full(len(faceset.names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    gone = sorted(drop.intersection(faceset.paths))
    return FaceSet(remap[old], [faceset.names[i] for i in used], [faceset.keys[i] for i in kept],
                   _SubsetLoader(faceset.loader, kept), paths=[faceset.paths[i] for i in kept],
                   skipped=faceset.skipped if excluded else gone, excluded=gone if excluded else faceset.excluded)


def excluded_paths(faceset: FaceSet, data_cfg) -> set[str]:
    """The files of `faceset` that data.exclude names (config/exclusions.py); empty without the key."""
    from facetrain.config.exclusions import read_exclusions

    if not data_cfg.exclude or faceset.paths is None:
        return set()
    return read_exclusions(data_cfg.exclude, data_cfg.root).intersection(faceset.paths)


def note_exclusions(report: PreflightReport, drop: set[str], source: str) -> None:
    """Name the files data.exclude leaves out in the pre-flight report (counted as `excluded`)."""
    report.notes.extend({"path": p, "problem": "excluded", "detail": f"data.exclude: {source}"} for p in sorted(drop))
    report.notes.sort(key=lambda r: (r["problem"], r["path"]))


def _on_main(check: Callable[[Console], PreflightReport], accelerator) -> PreflightReport:
    """`check` on the main process only, its report shared with every rank (its error stops them all)."""
    from facetrain.runtime.distributed import main_process_result  # torch: training only (serve checks galleries)

    return main_process_result(lambda: check(Console(highlight=False, width=None if Console().is_terminal else 120)),
                               accelerator)


def apply_preflight(faceset: FaceSet, data_cfg, out_dir: str | Path, accelerator=None) -> FaceSet:
    """Scan data_cfg.root on the main process, share the result with every rank, write the report into
    `out_dir`, then stop (bad_images=error) or return `faceset` without the refused files (skip)."""
    main = accelerator is None or accelerator.is_main_process
    out = Path(out_dir)

    def check(console: Console) -> PreflightReport:
        report = scan(data_cfg.root, data_cfg.max_image_pixels, console=console)
        note_exclusions(report, excluded_paths(faceset, data_cfg), data_cfg.exclude)
        console.print(report.table())
        report.write(out)
        return report

    result = _on_main(check, accelerator)
    enforce(result, data_cfg.bad_images, saved_to=out / "preflight.txt")
    filtered = without_files(faceset, result.bad_paths) if result.bad else faceset
    if main and result.bad:
        print(f"facetrain: pre-flight skipped {len(filtered.skipped)} image(s) (data.bad_images: skip); "
              f"list in {out / 'preflight.txt'}", flush=True)
    excluded = {n["path"] for n in result.notes if n["problem"] == "excluded"}
    filtered = without_files(filtered, excluded, excluded=True) if excluded else filtered
    if main and excluded:
        print(f"facetrain: left out {len(filtered.excluded)} image(s) named by data.exclude ({data_cfg.exclude}); "
              f"list in {out / 'preflight.txt'}", flush=True)
    return filtered


def preflight_extra_files(paths: list[str], key: str, data_cfg, out_dir: str | Path, stem: str,
                          accelerator=None) -> list[str]:
    """The decode check of files training reads from outside data.root (`key`: the setting that names them,
    e.g. distill.unlabelled), on the main process and shared with every rank; the report goes to
    `out_dir`/<stem>.txt and .json. data.bad_images `error`: stop with one line naming them; `skip`: `paths`
    without the refused files."""
    out = Path(out_dir)

    def check(console: Console) -> PreflightReport:
        report = check_files(paths, data_cfg.max_image_pixels, key, console=console)
        report.write(out, stem)
        return report

    result = _on_main(check, accelerator)
    enforce(result, data_cfg.bad_images, saved_to=out / f"{stem}.txt")
    if not result.bad:
        return paths
    if accelerator is None or accelerator.is_main_process:
        print(f"facetrain: pre-flight skipped {len(result.bad)} image(s) of {key} (data.bad_images: skip); list in "
              f"{out / f'{stem}.txt'}", flush=True)
    bad = result.bad_paths
    return [p for p in paths if p not in bad]


__all__ = ["REFUSED", "NOTED", "FileCheck", "PreflightReport", "check_image", "check_files", "scan", "enforce",
           "without_files", "excluded_paths", "note_exclusions", "apply_preflight", "preflight_extra_files"]
