"""Built-in synthetic identities: the default dataset, generated on the fly, no download.

Each identity is a random cartoon face (face shape, skin and hair tone, eye spacing and size, brows, nose,
mouth, a personal pattern of marks). Each image of it varies pose (rotation, shift, scale), expression,
lighting (direction and strength of a gradient), exposure and sensor noise. Identities are learnable but not
trivial: an untrained network separates them clearly worse than a trained one, and neighbouring identities
differ only by small continuous changes. Everything is a pure function of (seed, identity, image index).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 96  # native render size, pixels; the data pipeline resizes to data.image_size


def _identity_params(seed: int, identity: int) -> dict:
    rng = np.random.default_rng([seed, identity, 0xFACE])
    skin = rng.uniform(0.35, 0.9)
    tint = rng.uniform(-0.08, 0.08, 3)
    return {
        "face_w": rng.uniform(0.26, 0.36), "face_h": rng.uniform(0.34, 0.44),
        "skin": np.clip(np.array([skin + 0.08, skin, skin - 0.06]) + tint, 0, 1),
        "hair": np.clip(rng.uniform(0.0, 0.6) + rng.uniform(-0.1, 0.1, 3), 0, 1),
        "hair_h": rng.uniform(0.05, 0.2), "hair_side": rng.uniform(0.0, 0.12),
        "eye_dx": rng.uniform(0.09, 0.15), "eye_y": rng.uniform(-0.1, 0.0), "eye_r": rng.uniform(0.025, 0.05),
        "iris": rng.uniform(0.0, 0.5, 3), "brow_tilt": rng.uniform(-0.04, 0.04),
        "brow_w": rng.uniform(0.006, 0.02), "nose_len": rng.uniform(0.06, 0.14), "nose_w": rng.uniform(0.02, 0.05),
        "mouth_w": rng.uniform(0.08, 0.16), "mouth_y": rng.uniform(0.15, 0.24),
        "marks": rng.uniform(-1, 1, (3, 2)) * 0.22, "mark_r": rng.uniform(0.008, 0.022, 3),
        "mark_on": rng.random(3) < 0.6,
    }


def render(seed: int, identity: int, index: int, size: int = CANVAS) -> Image.Image:
    """Image `index` of synthetic person `identity` (RGB, size x size)."""
    p = _identity_params(seed, identity)
    rng = np.random.default_rng([seed, identity, index, 0xBEEF])
    s = CANVAS
    img = Image.new("RGB", (s, s), tuple(int(v) for v in rng.uniform(40, 200, 3)))
    draw = ImageDraw.Draw(img)

    def col(rgb: np.ndarray) -> tuple[int, int, int]:
        return tuple(int(255 * float(np.clip(v, 0, 1))) for v in rgb)

    def box(cx: float, cy: float, rx: float, ry: float) -> list[float]:
        return [(0.5 + cx - rx) * s, (0.5 + cy - ry) * s, (0.5 + cx + rx) * s, (0.5 + cy + ry) * s]

    # hair behind the face, then the face
    draw.ellipse(box(0, -p["hair_h"] / 2, p["face_w"] + p["hair_side"], p["face_h"] + p["hair_h"] / 2),
                 fill=col(p["hair"]))
    draw.ellipse(box(0, 0.02, p["face_w"], p["face_h"]), fill=col(p["skin"]))
    # expression: eye openness and smile vary per image
    open_ = rng.uniform(0.5, 1.0)
    for side in (-1, 1):
        ex, ey, r = side * p["eye_dx"], p["eye_y"], p["eye_r"]
        draw.ellipse(box(ex, ey, r * 1.5, r * open_), fill=(235, 235, 235))
        draw.ellipse(box(ex, ey, r * 0.7, r * 0.7 * open_), fill=col(p["iris"]))
        by = ey - r * 1.8 + side * p["brow_tilt"]
        draw.line([((0.5 + ex - r * 1.6) * s, (0.5 + by) * s), ((0.5 + ex + r * 1.6) * s, (0.5 + ey - r * 1.8) * s)],
                  fill=col(p["hair"] * 0.6), width=max(1, int(p["brow_w"] * s)))
    darker = col(p["skin"] * 0.7)
    draw.polygon([(0.5 * s, (0.5 + p["eye_y"] + 0.03) * s),
                  ((0.5 - p["nose_w"]) * s, (0.5 + p["eye_y"] + 0.03 + p["nose_len"]) * s),
                  ((0.5 + p["nose_w"]) * s, (0.5 + p["eye_y"] + 0.03 + p["nose_len"]) * s)], fill=darker)
    smile = rng.uniform(-0.03, 0.05)
    mw, my = p["mouth_w"], p["mouth_y"]
    draw.arc(box(0, my - smile, mw, abs(smile) + 0.01), 0 if smile >= 0 else 180, 180 if smile >= 0 else 360,
             fill=(120, 30, 40), width=max(1, s // 40))
    for (mx, my_), r, on in zip(p["marks"], p["mark_r"], p["mark_on"], strict=True):
        if on:
            draw.ellipse(box(mx, my_, r, r), fill=col(p["skin"] * 0.45))

    # pose: rotation, scale, shift
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(1.0, 1.2)  # zoom in only: the crop box must stay inside the canvas
    shift = rng.uniform(-0.06, 0.06, 2) * s
    img = img.rotate(angle, resample=Image.BILINEAR, translate=tuple(shift), fillcolor=img.getpixel((0, 0)))
    crop = s / scale
    c0 = (s - crop) / 2
    img = img.resize((size, size), Image.BILINEAR, box=(c0, c0, c0 + crop, c0 + crop))

    # lighting gradient, exposure, noise (float32 in [0, 1])
    arr = np.asarray(img, dtype=np.float32) / 255.0
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    light = 1.0 + rng.uniform(0.0, 0.7) * (xx * math.cos(theta) + yy * math.sin(theta))
    arr = arr * light[..., None] * rng.uniform(0.75, 1.25)
    arr = arr + rng.normal(0, rng.uniform(0.0, 0.06), arr.shape).astype(np.float32)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "RGB")


# Rendered images kept for reuse: validation re-reads the same images at every check and each epoch the same
# training images (96 x 96 RGB: 27 KB each, so 2048 of them ~ 57 MB per process); rendering one costs ~3-6 ms
# on a CPU core.
RENDER_CACHE_IMAGES = 2048


@functools.lru_cache(maxsize=RENDER_CACHE_IMAGES)
def _render_native(seed: int, identity: int, index: int) -> Image.Image:
    return render(seed, identity, index)


def render_cached(seed: int, identity: int, index: int) -> Image.Image:
    """`render(seed, identity, index)` at the native size, from the cache when it was rendered before (a copy:
    the caller may change it)."""
    return _render_native(seed, identity, index).copy()
