"""Face detectors with 5-point landmarks, behind one small interface and a registry.

A detector turns an 8-bit RGB image (H, W, 3 numpy array) into a list of `Face`s: a box, a confidence and five
landmarks in the order of the ArcFace template (`alignment.TEMPLATES`): the eye on the image's left, the eye on
the image's right, the nose tip, the mouth corner on the image's left, the mouth corner on the image's right,
all in pixels of the image given. Adding a detector = one class with `detect`, one `DETECTORS` entry and its
name in `config.names.DETECTOR_NAMES`; nothing else in facetrain changes (`alignment.align_image` looks it up by
the recipe's `detector` name).

Construction is lazy and cached per process (`get_detector`): the first photo of a process pays for loading the
weights (~1-2 s for MTCNN on a CPU), every later one reuses them. Nothing here imports torch at import time.

Detectors:
* `mtcnn`: MTCNN (Zhang et al. 2016) as packaged by facenet-pytorch 2.5.x (MIT licence; the P/R/O-net weights
  ship inside the wheel, nothing is downloaded). Its five points are the eye centres, the nose tip and the mouth
  corners: exactly the points of the ArcFace template.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from facetrain.config.names import DETECTOR_NAMES, keyed_by
from facetrain.errors import INSTALL, UserError


class DetectorUnavailable(UserError):
    """The detector's package (or scikit-image for the warp) is not installed."""


@dataclass
class Face:
    box: np.ndarray  # (4,) float: x0, y0, x1, y1 in image pixels
    points: np.ndarray  # (5, 2) float: x, y in image pixels, in template order (see the module docstring)
    score: float  # detector confidence, 0..1

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


class MTCNNDetector:
    """facenet-pytorch's MTCNN on the CPU. `min_face_px`: the smallest face side searched for (the image pyramid
    starts at 12 / min_face_px); smaller values find smaller faces at a higher cost per image."""

    name = "mtcnn"
    package = "facenet-pytorch"

    @staticmethod
    def require() -> None:
        """Raise DetectorUnavailable (one line: what to install) when the package is missing."""
        try:
            import facenet_pytorch.models.mtcnn  # noqa: F401
        except ImportError as err:
            raise DetectorUnavailable(f"face detector 'mtcnn' needs the package facenet-pytorch ({err}): "
                                      f"{INSTALL['align']}") from None

    def __init__(self, min_face_px: int = 20):
        self.require()
        from facenet_pytorch.models.mtcnn import MTCNN

        # select_largest=False: keep the detector's own order; alignment.FACE_CHOICES decides among faces.
        self.model = MTCNN(min_face_size=min_face_px, select_largest=False, device="cpu").eval()
        self.min_face_px = min_face_px

    def detect(self, rgb: np.ndarray) -> list[Face]:
        import torch

        # fp32 always: the caller may embed under bf16 autocast (eval at >= 160 px on a CPU), and MTCNN's
        # numpy NMS cannot take bf16 boxes; fp32 also keeps the landmarks the same in training and inference
        with torch.autocast("cpu", enabled=False):
            boxes, probs, points = self.model.detect(np.ascontiguousarray(rgb), landmarks=True)
        if boxes is None:
            return []
        return [Face(np.asarray(b, dtype=np.float64), np.asarray(p, dtype=np.float64).reshape(5, 2), float(s))
                for b, s, p in zip(boxes, probs, points, strict=True)]


#: name (DETECTOR_NAMES, checked when a recipe is made) -> detector class: `require()` (raises
#: DetectorUnavailable), `__init__(min_face_px=...)`, `detect(rgb) -> list[Face]`
DETECTORS: dict[str, Callable[..., object]] = keyed_by(DETECTOR_NAMES, {
    "mtcnn": MTCNNDetector,
})


def require_detector(name: str) -> None:
    """The package of the detector `name` (a recipe's) and of the warp are installed (cheap: nothing is built)."""
    DETECTORS[name].require()
    try:
        import skimage.transform  # noqa: F401  (the warp: same extra)
    except ImportError as err:
        raise no_skimage(err) from None


def no_skimage(err: ImportError) -> DetectorUnavailable:
    """The one-line error for a missing scikit-image (the warp onto the template needs it)."""
    return DetectorUnavailable(f"alignment needs scikit-image ({err}): {INSTALL['align']}")


@functools.lru_cache(maxsize=4)
def get_detector(name: str, min_face_px: int):
    """The process's detector for (name, min_face_px), built on first use."""
    return DETECTORS[name](min_face_px=min_face_px)
