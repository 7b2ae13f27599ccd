"""Pack an aligned face folder into one memory-mapped uint8 file for training (`data.source: packed`).

    python -m facetrain.pack --input /data/aligned --output /data/aligned_112.ftpack --size 112
    python -m facetrain.pack --input /data/aligned --output faces.ftpack --size 112 --bad-images skip

Reads root/<identity>/<image> like `data.source: folder`: the pre-flight check (facetrain/data/preflight.py) runs
first and prints its report (`<output>.preflight.txt` / `.json` keep it), refused files stop the packing or,
with --bad-images skip, are left out. Then every usable image is decoded once, in a thread pool (PIL releases
the GIL while decoding and resizing), and resized to --size exactly as validation resizes it
(`data.eval_transform`). Identities and labels are those the folder source would use, so a pack trains on
the same identity split as its folder, and the folder's alignment recipe (facetrain.align) travels in the
pack. The format is described in facetrain/data/pack_format.py.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from facetrain.runtime import threads

os.environ.update(threads.wait_policy())  # before torch loads: facetrain/runtime/threads.py
from facetrain.cli import run_cli  # noqa: E402
from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.errors import UserError

# PIL modes that `images.to_rgb(keep_gray=True)` returns as one gray channel
SINGLE_CHANNEL_MODES = {"L", "1", "I;16", "I;16B", "I;16L", "I"}


def build_parser():
    from facetrain.cli import ArgumentParser

    p = ArgumentParser(prog="facetrain.pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="aligned face folder: <input>/<identity>/<image>")
    p.add_argument("--output", required=True, help="pack file to write, one file (conventionally *.ftpack); "
                   "its <output>.preflight.txt/.json are written beside it")
    p.add_argument("--size", type=int, default=112, help="image side in pixels; train with data.image_size equal "
                   "to it (default 112)")
    p.add_argument("--bad-images", choices=("error", "skip"), default="error",
                   help="refused files (pre-flight): stop (default) or pack without them")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="larger images are refused as decompression bombs (as data.max_image_pixels)")
    p.add_argument("--threads", type=int, default=0, help="decoding threads (default: 2 per core, at most 32)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.size <= 0:
        raise UserError(f"--size: must be > 0, got {args.size}")
    if not Path(args.input).is_dir():
        raise UserError(f"--input: folder not found: {args.input} (expected {args.input}/<identity>/<image>)")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; give a file name, e.g. {output / 'faces.ftpack'}")
    if output.exists() and not args.force:
        raise UserError(f"--output: {output} exists; add --force to replace it or choose another --output")
    pack_folder(args.input, output, args.size, bad_images=args.bad_images, max_image_pixels=args.max_image_pixels,
                threads=args.threads or None, progress=not args.no_progress)
    return 0


def pack_folder(root: str | Path, output: str | Path, size: int, bad_images: str = "error",
                max_image_pixels: int = MAX_IMAGE_PIXELS, threads: int | None = None, progress: bool = True,
                console=None) -> Path:
    """Pre-flight `root`, then decode every usable image once into pack `output`; returns its path."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from facetrain.alignment.recipe import recipe_of_folder
    from facetrain.data.dataset import Preprocess, eval_transform
    from facetrain.data.images import load_image
    from facetrain.data.pack_format import PackHeader, PackWriter
    from facetrain.data.preflight import enforce, scan

    start = time.perf_counter()
    root, output = Path(root), Path(output)
    console = console or Console(highlight=False)
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

    # usable images per identity folder, in the folder source's order (identities sorted by name, files sorted)
    from facetrain.data.dataset import scan_folder

    refused = report.bad_paths
    paths, labels_all, names_all = scan_folder(str(root))
    kept = [(p, lab) for p, lab in zip(paths, labels_all, strict=True) if p not in refused]
    if not kept:
        raise UserError(f"--input: {root}: no usable image to pack")
    used = sorted({lab for _, lab in kept})
    renumber = {old: new for new, old in enumerate(used)}
    identities = [names_all[i] for i in used]
    labels = [renumber[lab] for _, lab in kept]
    files = [Path(p).relative_to(root).as_posix() for p, _ in kept]
    channels = 1 if report.modes and set(report.modes) <= SINGLE_CHANNEL_MODES else 3
    header = PackHeader(count=len(kept), channels=channels, size=size, identities=identities, labels=labels,
                        files=files, source=str(root.resolve()), preflight=report.counts(),
                        alignment=recipe_of_folder(root))  # absolute: the repack hints name it from anywhere
    writer = PackWriter(output, header)
    transform = eval_transform(Preprocess(size, [0.0] * 3, [1.0] * 3))  # validation's resize: same pixels

    shape = (channels, size, size)

    def decode(i: int) -> int:
        path = kept[i][0]
        try:
            image = transform(load_image(path, keep_gray=channels == 1)).numpy()
        except Exception as err:  # the file changed since the pre-flight
            raise UserError(f"{path}: cannot decode image ({type(err).__name__}: {err}); fix or remove it and "
                            "pack again") from None
        if image.shape != shape:  # e.g. a gray file replaced by a colour one after the pre-flight
            got, want = (" x ".join(map(str, dims)) for dims in (image.shape, shape))
            raise UserError(f"{path}: decodes to {got}, not {want} like the pre-flight found; it changed while "
                            "packing: pack again")
        writer.images[i] = image
        return i

    threads = threads or min(32, 2 * (os.cpu_count() or 1))
    bar = Progress(TextColumn("[bold]packing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (progress and console.is_terminal))
    try:
        with bar, ThreadPoolExecutor(threads) as pool:
            task = bar.add_task("packing", total=len(kept))
            # a bounded window of pending decodes: submitting all at once holds ~2 KB per image before the
            # first one is decoded (2 GB for a million images)
            window = 64 * threads
            for lo in range(0, len(kept), window):
                for _ in pool.map(decode, range(lo, min(lo + window, len(kept)))):
                    bar.advance(task)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    skipped = f", {len(refused)} refused file(s) left out (list: {saved})" if refused else ""
    console.print(f"packed {len(kept):,} images of {len(identities):,} identities ({channels} x {size} x {size} "
                  f"uint8, {path.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s: {path}"
                  f"{skipped}\ntrain on it with: --data.source packed --data.root {path} --data.image_size {size}")
    return path


if __name__ == "__main__":
    run_cli(main)
