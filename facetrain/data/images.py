"""The one image loader: every path that turns a file into pixels goes through `load_image`.

Training from a folder, from a Hugging Face dataset, validation, `facetrain.eval`, `verify`, `identify`, the
pre-flight check, alignment and export all see the same pixels for the same file:

* EXIF orientation is applied (`ImageOps.exif_transpose`): a phone JPEG stored sideways with Orientation=6 is
  used upright everywhere. Hugging Face `datasets` already does this when it decodes an image; applying it
  again is a no-op (the tag is removed from the transposed image), so both sources agree.
* Gray, palette, RGBA, CMYK and 16-bit images become 8-bit RGB (`to_rgb`), or 8-bit gray with
  `keep_gray=True` (the transforms then work on one channel; `transforms.ToModelInput` repeats it on the
  device).

Nothing here imports torch, so the onnxruntime deployment path can use it too. The folder scan
(`root/<identity>/<image>`) is `faceset.scan_identity_folder`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# File extensions read as images by every folder scan (training, eval, identify galleries, alignment, packing).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


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


def to_rgb(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Gray, palette, RGBA, CMYK and 16-bit images -> 8-bit RGB (16-bit is scaled, not clipped).

    keep_gray=True returns single-channel images (gray, 1-bit, 16-bit) as 8-bit gray ("L") instead: the
    transforms then work on one channel and `ToModelInput` repeats it on the device, which gives the same
    input as converting to RGB first (each RGB channel of a gray image is that image) at a third of the
    augmentation cost; many face sets (IR cameras, scans, the shared test sets) are gray."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    if keep_gray and img.mode in ("L", "1"):
        return img.convert("L") if img.mode != "L" else img
    return img.convert("RGB") if img.mode != "RGB" else img


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF Orientation tag says (the identity for images without one)."""
    return ImageOps.exif_transpose(img)


def decode(source: str | Path | bytes | Image.Image) -> Image.Image:
    """A file path, the bytes of an image file, or a PIL image -> a fully loaded, upright PIL image (any mode).
    Raises what PIL raises for data that is not an image (the callers name the file)."""
    if isinstance(source, Image.Image):
        return upright(source)
    if isinstance(source, bytes | bytearray | memoryview):
        with Image.open(io.BytesIO(bytes(source))) as im:
            im.load()
            return upright(im)
    with Image.open(source) as im:
        im.load()
        return upright(im)


def load_image(source: str | Path | bytes | Image.Image, keep_gray: bool = False) -> Image.Image:
    """`decode` then `to_rgb`: what every facetrain path feeds its transforms."""
    return to_rgb(decode(source), keep_gray=keep_gray)
