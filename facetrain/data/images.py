"""The one image loader: every path that turns a file into pixels goes through `load_image`.

Training from a folder, from a Hugging Face dataset, validation, `facetrain.eval`, `verify`, `identify`, the
pre-flight check, alignment and export all see the same pixels for the same file:

* EXIF orientation is applied (`ImageOps.exif_transpose`): a phone JPEG stored sideways with Orientation=6 is
  used upright everywhere. Hugging Face `datasets` already does this when it decodes an image; applying it
  again is a no-op (the tag is removed from the transposed image), so both sources agree.
* Gray, palette, RGBA, CMYK, 16-bit and 32-bit (integer or float) images become 8-bit RGB (`to_rgb`), or 8-bit
  gray with `keep_gray=True` (the transforms then work on one channel; `transforms.ToModelInput` repeats it on
  the device).
* Only the formats of `FORMATS` are decoded (`open_image`, the one call of `Image.open`): PIL knows ~40 formats,
  and EPS runs Ghostscript on the file's PostScript; a file in another format (HEIC, AVIF, PDF, EPS, SVG, ...)
  is refused with `UnsupportedImage`, whose one line names the format when its signature is known.

Nothing here imports torch, so the onnxruntime deployment path can use it too. The folder scan
(`root/<identity>/<image>`) is `faceset.scan_identity_folder`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# the extensions every folder scan reads (defined in config/: distill.unlabelled is checked when the config loads)
from facetrain.config.constants import IMAGE_EXTENSIONS

# The PIL plugins allowed to decode a file: the formats of IMAGE_EXTENSIONS. PIL's "JPEG" also opens the
# multi-picture JPEGs of phones (as format "MPO", which is no plugin of its own) and "PPM" opens PGM too.
FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")
FORMATS_READ = "JPEG, PNG, BMP, TIFF, WebP, GIF, PPM/PGM"  # for messages
# Single-channel modes: `to_rgb(keep_gray=True)` returns them as 8-bit gray
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16- and 32-bit gray: scaled to 8 bits by `to_rgb`
SINGLE_CHANNEL_MODES = frozenset(("L", "1", *_WIDE_MODES))
SNIFF_BYTES = 64  # bytes read to name a refused format; every signature below lies within them
# ISO base media files (`ftyp` box) by their brands: phone photos (HEIC/HEIF, AVIF), else videos
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
# Signatures of the formats read: a file with one that PIL cannot open is damaged, not of another format
_READ_SIGNATURES = (
    (lambda h: h.startswith(b"\xff\xd8\xff"), "JPEG"),
    (lambda h: h.startswith(b"\x89PNG\r\n\x1a\n"), "PNG"),
    (lambda h: h.startswith((b"GIF87a", b"GIF89a")), "GIF"),
    (lambda h: h.startswith(b"BM") and h[6:10] == bytes(4), "BMP"),  # bytes 6-9 are reserved zeros
    (lambda h: h.startswith((b"II*\x00", b"MM\x00*")), "TIFF"),
    (lambda h: h.startswith(b"RIFF") and h[8:12] == b"WEBP", "WebP"),
    (lambda h: len(h) > 2 and h[:1] == b"P" and h[1:2] in b"123456" and h[2:3].isspace(), "PPM/PGM"),
)
# Refused formats a user may send instead of a photo -> their name, by signature (checked in order)
_SIGNATURES = (
    (lambda h: h.startswith(b"%PDF-"), "PDF"),
    (lambda h: h.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")), "EPS/PostScript"),
    (lambda h: b"<svg" in h.lower() or h.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<?xml"), "SVG/XML"),
    (lambda h: h.startswith((b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ")), "JPEG 2000"),
    (lambda h: h.startswith((b"\x00\x00\x00\x0cJXL ", b"\xff\x0a")), "JPEG XL"),
    (lambda h: h.startswith(b"8BPS"), "Photoshop PSD"),
)


class UnsupportedImage(Image.UnidentifiedImageError):
    """A file that is no image of `FORMATS`. The message is one line without the file's name or path (the
    caller names it) and, when the signature is known, names the format and says to convert it."""


class DamagedImage(OSError):
    """A file with the signature of a format of `FORMATS` whose header PIL cannot read (truncated, damaged): a
    corrupt file, as one whose pixels do not decode. One line, without the file's name or path."""


@dataclass
class Preprocess:
    """Everything needed to turn an image into a model input (side in pixels, per-channel mean and std of
    pixels scaled to [0, 1]); stored in bundles and exported models so eval, verify and the onnxruntime path
    match training. Here, not in transforms.py, because the onnxruntime path must not import torch."""

    image_size: int
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _full_scale(mode: str, arr: np.ndarray) -> float:
    """The value that stands for white in a 16/32-bit single-channel image: 65535 for 16-bit; 255 or 65535 for
    32-bit integers, whichever holds the brightest pixel; 1, 255 or 65535 for floats (a float TIFF scaled to
    0..1 read as 8-bit keeps only 0 and 1: nearly black), or the brightest pixel beyond those."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(arr.max()) if arr.size else 0.0
    if mode == "I":
        return 255.0 if top <= 255 else 65535.0
    return next((s for s in (1.0, 255.0, 65535.0) if top <= s), top)


def to_rgb(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Gray, palette, RGBA, CMYK, 16-bit and 32-bit images -> 8-bit RGB (scaled by `_full_scale`, not clipped).

    keep_gray=True returns single-channel images (SINGLE_CHANNEL_MODES) as 8-bit gray ("L") instead: the
    transforms then work on one channel and `ToModelInput` repeats it on the device, which gives the same
    input as converting to RGB first (each RGB channel of a gray image is that image) at a third of the
    augmentation cost; many face sets (IR cameras, scans, the shared test sets) are gray."""
    if img.mode in _WIDE_MODES:
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        img = Image.fromarray((arr * (255.0 / _full_scale(img.mode, arr))).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    if keep_gray and img.mode in ("L", "1"):
        return img.convert("L") if img.mode != "L" else img
    return img.convert("RGB") if img.mode != "RGB" else img


def format_of(head: bytes) -> str | None:
    """The name of a refused format from the first SNIFF_BYTES of a file, or None when unknown."""
    if head[4:8] == b"ftyp":  # box size, "ftyp", major brand, version, compatible brands
        brands = {head[k:k + 4] for k in range(8, min(len(head), int.from_bytes(head[:4], "big")), 4)}
        return "AVIF" if brands & _AVIF_BRANDS else "HEIC/HEIF" if brands & _HEIF_BRANDS else "MP4/QuickTime video"
    return next((name for test, name in _SIGNATURES if test(head)), None)


def _refusal(head: bytes) -> UnsupportedImage | DamagedImage:
    damaged = next((name for test, name in _READ_SIGNATURES if test(head)), None)
    if damaged is not None:
        return DamagedImage(f"truncated or damaged {damaged} file (its header does not decode)")
    name = format_of(head)
    if name is None:
        return UnsupportedImage(f"not an image file in a format facetrain reads ({FORMATS_READ})")
    return UnsupportedImage(f"{name} file, a format facetrain does not read ({FORMATS_READ}): convert it to "
                            "JPEG or PNG")


def open_image(source: str | Path | bytes | BinaryIO) -> Image.Image:
    """Open (lazily: header only, as `Image.open`) a file path, the bytes of an image file or a binary file
    object, with only the plugins of FORMATS. Raises UnsupportedImage for anything else, DamagedImage for a file
    of those formats whose header does not decode, DecompressionBombError as PIL does, OSError for unreadable
    files."""
    fp = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        return Image.open(fp, formats=FORMATS)
    except Image.UnidentifiedImageError:
        pass  # raised below, outside this handler: the one line needs no chained PIL message
    if isinstance(fp, str | Path):
        with open(fp, "rb") as f:
            head = f.read(SNIFF_BYTES)
    else:
        fp.seek(0)
        head = fp.read(SNIFF_BYTES)
    raise _refusal(head)


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF Orientation tag says (the identity for images without one)."""
    return ImageOps.exif_transpose(img)


def decode(source: str | Path | bytes | Image.Image) -> Image.Image:
    """A file path, the bytes of an image file, or a PIL image -> a fully loaded, upright PIL image (any mode).
    Raises `open_image`'s errors, or what PIL raises for corrupt pixel data (the callers name the file)."""
    if isinstance(source, Image.Image):
        return upright(source)
    with open_image(source) as im:
        im.load()
        return upright(im)


def load_image(source: str | Path | bytes | Image.Image, keep_gray: bool = False) -> Image.Image:
    """`decode` then `to_rgb`: what every facetrain path feeds its transforms."""
    return to_rgb(decode(source), keep_gray=keep_gray)
