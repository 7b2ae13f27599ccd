"""Constants shared by several packages, defined once here (torch-free, the lowest layer but errors)."""

from __future__ import annotations

MAX_IMAGE_PIXELS = 89_478_485
"""Images with more pixels are refused as decompression bombs (PIL's own default, Image.MAX_IMAGE_PIXELS):
data.max_image_pixels and every --max-image-pixels default."""

DEFAULT_TARGET_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
"""False-accept rates at which TAR is reported by default: by validation (the `tar@far=...` names that
train.val_metric accepts), by evaluation, its report and its figures."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp",
                                     ".gif")
"""File extensions read as images by every folder scan (training, eval, identify galleries, alignment, packing,
distill.unlabelled)."""
