"""Packing an aligned face folder into one pack file (the library behind `python -m facetrain.pack`).

`pack_folder` reads root/<identity>/<image> like `data.source: folder`: the pre-flight check (preflight.py)
runs first and its report is saved beside the output (`<output>.preflight.txt` / `.json`); refused files stop
the packing or, with bad_images="skip", are left out. Then every usable image is decoded once, in a thread pool
(PIL releases the GIL while decoding and resizing), and resized exactly as validation resizes it
(`transforms.eval_transform`). Identities and labels are those the folder source numbers them with
(`faceset.scan_identity_folder`), so a pack trains on the same identity split as its folder. The format is
pack_format.py's.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.data.faceset import scan_identity_folder
from facetrain.data.images import SINGLE_CHANNEL_MODES, Preprocess, load_image
from facetrain.data.pack_format import PackHeader, PackWriter
from facetrain.data.preflight import PreflightReport, enforce, scan
from facetrain.data.transforms import eval_transform
from facetrain.errors import UserError

PENDING_PER_THREAD = 64  # decodes submitted ahead per thread: bounds the pending work (~2 KB per image)


def pack_folder(root: str | Path, output: str | Path, size: int, bad_images: str = "error",
                max_image_pixels: int = MAX_IMAGE_PIXELS, threads: int | None = None, progress: bool = True,
                console=None, alignment: dict | None = None) -> Path:
    """Pre-flight `root`, then decode every usable image once into pack `output` (`size` x `size` px); returns
    its path. `alignment`: the folder's facetrain.align recipe (`alignment.recipe.recipe_of_folder`), recorded
    in the header so that a bundle trained on the pack records it too; None for other folders."""
    start = time.perf_counter()
    root, output = Path(root), Path(output)
    console = console or Console(highlight=False)
    report, saved = _preflight(root, output, max_image_pixels, bad_images, console, progress)
    kept, header = _plan(root, report, size, alignment)
    writer = PackWriter(output, header)
    try:
        _fill(writer, kept, threads or min(32, 2 * (os.cpu_count() or 1)), console, progress)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    refused = report.bad_paths
    skipped = f", {len(refused)} refused file(s) left out (list: {saved})" if refused else ""
    console.print(f"packed {header.count:,} images of {len(header.identities):,} identities ({header.channels} x "
                  f"{size} x {size} uint8, {path.stat().st_size / 2**20:,.1f} MiB) in "
                  f"{time.perf_counter() - start:.1f} s: {path}{skipped}\n"
                  f"train on it with: --data.source packed --data.root {path} --data.image_size {size}")
    return path


def _preflight(root: Path, output: Path, max_image_pixels: int, bad_images: str, console,
               progress: bool) -> tuple[PreflightReport, Path]:
    """The pre-flight report of `root`, printed and saved beside `output`; refused files follow `bad_images`."""
    report = scan(root, max_image_pixels, console=console, progress=progress)
    console.print(report.table())
    saved = output.with_name(output.name + ".preflight.txt")
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(report.text())
        output.with_name(output.name + ".preflight.json").write_text(json.dumps(report.to_dict(), indent=2))
    except OSError as err:
        raise UserError(f"--output: cannot write {saved} ({err.strerror or err}); choose another --output") from None
    enforce(report, bad_images, policy_key="--bad-images", saved_to=saved)
    return report, saved


def _plan(root: Path, report: PreflightReport, size: int, alignment: dict | None) -> tuple[list[str], PackHeader]:
    """(usable image paths in the folder source's order, the pack's header): identities that lost every image
    to the pre-flight are dropped and the labels renumbered."""
    refused = report.bad_paths
    paths, labels_all, names_all = scan_identity_folder(root, "data.root")
    kept = [(p, lab) for p, lab in zip(paths, labels_all, strict=True) if p not in refused]
    if not kept:
        raise UserError(f"--input: {root}: no usable image to pack")
    used = sorted({lab for _, lab in kept})
    renumber = {old: new for new, old in enumerate(used)}
    channels = 1 if report.modes and set(report.modes) <= SINGLE_CHANNEL_MODES else 3
    header = PackHeader(count=len(kept), channels=channels, size=size, identities=[names_all[i] for i in used],
                        labels=[renumber[lab] for _, lab in kept],
                        files=[Path(p).relative_to(root).as_posix() for p, _ in kept],
                        source=str(root.resolve()),  # absolute: the repack hints name it from anywhere
                        preflight=report.counts(), alignment=alignment)
    return [p for p, _ in kept], header


def _fill(writer: PackWriter, paths: list[str], threads: int, console, progress: bool) -> None:
    """Decode `paths` into the writer's image slots, in a pool of `threads`."""
    header = writer.header
    shape = (header.channels, header.size, header.size)
    transform = eval_transform(Preprocess(header.size, [0.0] * 3, [1.0] * 3))  # validation's resize: same pixels

    def decode(i: int) -> int:
        path = paths[i]
        try:
            image = transform(load_image(path, keep_gray=header.channels == 1)).numpy()
        except Exception as err:  # the file changed since the pre-flight
            raise UserError(f"{path}: cannot decode image ({type(err).__name__}: {err}); fix or remove it and "
                            "pack again") from None
        if image.shape != shape:  # e.g. a gray file replaced by a colour one after the pre-flight
            got, want = (" x ".join(map(str, dims)) for dims in (image.shape, shape))
            raise UserError(f"{path}: decodes to {got}, not {want} like the pre-flight found; it changed while "
                            "packing: pack again")
        writer.images[i] = image
        return i

    bar = Progress(TextColumn("[bold]packing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (progress and console.is_terminal))
    with bar, ThreadPoolExecutor(threads) as pool:
        task = bar.add_task("packing", total=len(paths))
        # a bounded window of pending decodes: submitting all at once holds ~2 KB per image before the first
        # one is decoded (2 GB for a million images)
        window = PENDING_PER_THREAD * threads
        for lo in range(0, len(paths), window):
            for _ in pool.map(decode, range(lo, min(lo + window, len(paths)))):
                bar.advance(task)
