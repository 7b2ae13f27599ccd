"""Pack an aligned face folder into one memory-mapped uint8 file for training (`data.source: packed`).

    python -m facetrain.pack --input /data/aligned --output /data/aligned_112.ftpack --size 112
    python -m facetrain.pack --input /data/aligned --output faces.ftpack --size 112 --bad-images skip

Reads root/<identity>/<image> like `data.source: folder`: the pre-flight check (facetrain/data/preflight.py) runs
first and prints its report (`<output>.preflight.txt` / `.json` keep it), refused files stop the packing or,
with --bad-images skip, are left out. Then every usable image is decoded once, in a thread pool (PIL releases
the GIL while decoding and resizing), and resized to --size exactly as validation resizes it
(`data.transforms.eval_transform`). Identities and labels are those the folder source would use, so a pack
trains on the same identity split as its folder, and the folder's alignment recipe (facetrain.align) travels
in the pack. The packing is facetrain/data/packer.py; the format is described in facetrain/data/pack_format.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facetrain.runtime import threads

os.environ.update(threads.wait_policy())  # before torch loads: facetrain/runtime/threads.py
from facetrain.cli import run_cli  # noqa: E402
from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.errors import UserError


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
    from facetrain.alignment.recipe import incomplete_alignment, recipe_of_folder  # heavy: after the parse
    from facetrain.data.packer import pack_folder

    half_aligned = incomplete_alignment(args.input)
    if half_aligned:
        print(f"facetrain.pack: {half_aligned}", file=sys.stderr, flush=True)

    pack_folder(args.input, output, args.size, bad_images=args.bad_images, max_image_pixels=args.max_image_pixels,
                threads=args.threads or None, progress=not args.no_progress, alignment=recipe_of_folder(args.input))
    return 0


if __name__ == "__main__":
    run_cli(main)
