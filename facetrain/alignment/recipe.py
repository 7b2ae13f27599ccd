"""Face alignment: detect, pick one face, warp its 5 landmarks onto the ArcFace template.

    from facetrain.alignment.recipe import AlignmentRecipe, align_image
    result = align_image(pil_image, AlignmentRecipe(size=112))
    result.crop        # PIL RGB image, size x size, or None (result.status / result.reason say why)

The same function produces the training crops (`python -m facetrain.align`) and the crops `eval`, `verify`,
`identify` and the onnxruntime backend embed when a bundle carries an alignment recipe (bundle metadata key
`"alignment"`, written by training from the `MARKER_FILE` that `facetrain.align` leaves in its output folder).
One recipe, one function, so a photo is cut the same way at training and at inference.

Steps (all in `align_image`):
1. detection on a copy whose longer side is at most `recipe.detect_max_side` px (landmarks are scaled back);
2. faces with confidence < `min_confidence` are ignored; among the rest `FACE_CHOICES[recipe.face_choice]`
   keeps one (largest box, most central box, best by size and centrality together) or skips photos with
   several faces;
3. a similarity transform (rotation + uniform scale + translation, 4 degrees of freedom) fitted by scikit-image
   (`SimilarityTransform.from_estimate`, Umeyama's least squares) maps the 5 landmarks onto the template scaled
   to `size` px; when that transform shrinks by more than 2x the photo is first box-filtered by an integer
   factor (`Image.reduce`), so the bilinear warp does not alias;
4. `skimage.transform.warp` (bilinear, black outside the photo) cuts the size x size crop;
5. the fit's residual (mean distance of the warped landmarks from the template, as a fraction of the
   template's inter-ocular distance) above `max_template_error` flags the crop as `far_from_template`
   (profile views, wrong landmarks): it is still written, and listed by facetrain.align's report.

Template: the five-point template of the ArcFace / InsightFace family for 112 x 112 crops (eye centres, nose tip,
mouth corners in pixels). Another size scales it by size / 112; `margin` m shrinks it about the crop centre by
1 / (1 + m), i.e. a crop showing (1 + m) times as much around the face.

Nothing here imports torch: the detector module is imported when the first photo is detected.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from facetrain.config.names import DETECTOR_NAMES, check_name
from facetrain.errors import UserError

#: Written by facetrain.align into its output folder: the recipe and the run's counts.
MARKER_FILE = "facetrain_align.json"
MARKER_FORMAT = "facetrain-align"

#: Five-point templates, (5, 2) x, y in pixels of a `base` x `base` crop, in detectors.Face point order.
TEMPLATES: dict[str, tuple[int, np.ndarray]] = {
    "arcface_112": (112, np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                   [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)),
}


def template_points(name: str, size: int, margin: float = 0.0) -> np.ndarray:
    """The template `name` scaled to a size x size crop, shrunk about the centre by 1 / (1 + margin)."""
    if name not in TEMPLATES:
        raise UserError(f"template: unknown alignment template {name!r}; choose one of {', '.join(TEMPLATES)}")
    base, pts = TEMPLATES[name]
    centre = base / 2.0
    return ((pts - centre) / (1.0 + margin) + centre) * (size / base)


def eye_centres_distance(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[1] - points[0]))


# ----------------------------------------------------------------------------------------------------------
# Which face to keep when a photo shows several


def _largest(faces: list, width: int, height: int) -> tuple[int, str]:
    order = sorted(range(len(faces)), key=lambda i: faces[i].area, reverse=True)
    first, second = faces[order[0]], faces[order[1]]
    return order[0], f"largest box ({_wh(first)} px; next {_wh(second)} px)"


def _wh(face) -> str:
    return f"{face.box[2] - face.box[0]:.0f}x{face.box[3] - face.box[1]:.0f}"


def _centre_distances(faces: list, width: int, height: int) -> np.ndarray:
    """Distance (px) of each box centre from the image centre."""
    centre = np.array([width / 2.0, height / 2.0])
    return np.array([float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2.0 - centre)) for f in faces])


def _central(faces: list, width: int, height: int) -> tuple[int, str]:
    dist = _centre_distances(faces, width, height)
    order = np.argsort(dist, kind="stable")
    return int(order[0]), f"most central ({dist[order[0]]:.0f} px from the centre; next {dist[order[1]]:.0f} px)"


def _size_and_centre(faces: list, width: int, height: int) -> tuple[int, str]:
    """Size and centrality together: score = side / largest side - distance from the centre / half the image
    diagonal (both 0..1). A subject in the middle beats a bigger face at the edge; a big face off-centre beats a
    small one in the middle (measured in docs/align.md)."""
    side = np.sqrt([f.area for f in faces])
    dist = _centre_distances(faces, width, height)
    score = side / max(float(side.max()), 1e-9) - dist / (0.5 * float(np.hypot(width, height)))
    order = np.argsort(-score, kind="stable")
    first, second = faces[order[0]], faces[order[1]]
    return int(order[0]), (f"size and centrality (score {score[order[0]]:.2f}: {_wh(first)} px, {dist[order[0]]:.0f} "
                           f"px from the centre; next {score[order[1]]:.2f}: {_wh(second)} px)")


def _skip(faces: list, width: int, height: int) -> tuple[None, str]:
    return None, "skipped by policy (face_choice: skip)"


#: face_choice -> f(faces, image width, image height) -> (index kept or None, why), for >= 2 faces
FACE_CHOICES: dict[str, Callable] = {"largest": _largest, "central": _central, "size_centre": _size_and_centre,
                                     "skip": _skip}


# ----------------------------------------------------------------------------------------------------------
# The recipe


@dataclass(frozen=True)
class AlignmentRecipe:
    """Everything that decides the crop of a photo; stored in the bundle (metadata key "alignment")."""

    detector: str = "mtcnn"
    """Key of detectors.DETECTORS (one of config.names.DETECTOR_NAMES)."""
    template: str = "arcface_112"
    """Key of TEMPLATES."""
    size: int = 112
    """Crop side in pixels (the template is scaled by size / 112)."""
    margin: float = 0.0
    """Extra context: the template shrinks by 1 / (1 + margin) about the centre (0 = the ArcFace crop)."""
    face_choice: str = "size_centre"
    """Photos with several faces: largest | central | size_centre | skip (key of FACE_CHOICES). size_centre
    (size and centrality together) since issue 26: on subject-centred crops of annotated group photos it keeps
    the intended face in 122 of 124 cases, largest in 45 (docs/align.md)."""
    min_confidence: float = 0.9
    """Detections below this confidence (0..1) are ignored."""
    min_face_px: int = 20
    """Smallest face side (px, in the detection copy) the detector searches for."""
    detect_max_side: int = 1600
    """Detection runs on a copy whose longer side is at most this many px (bounds the cost of big photos)."""
    max_template_error: float = 0.2
    """Crops whose warped landmarks lie further than this fraction of the inter-ocular distance from the
    template (on average) are flagged far_from_template."""

    def __post_init__(self):
        check_name("alignment.detector", self.detector, DETECTOR_NAMES, "face detector")
        if self.template not in TEMPLATES:
            raise UserError(f"alignment.template: unknown template {self.template!r}; choose one of "
                            f"{', '.join(TEMPLATES)}")
        if self.face_choice not in FACE_CHOICES:
            raise UserError(f"alignment.face_choice: {self.face_choice!r} is not one of {', '.join(FACE_CHOICES)}")
        if not 16 <= int(self.size) <= 1024:
            raise UserError(f"alignment.size: must be 16..1024 px, got {self.size}")
        if not 0.0 <= float(self.margin) <= 2.0:
            raise UserError(f"alignment.margin: must be in [0, 2], got {self.margin}")
        if not 0.0 <= float(self.min_confidence) < 1.0:
            raise UserError(f"alignment.min_confidence: must be in [0, 1), got {self.min_confidence}")
        if int(self.min_face_px) < 12:
            raise UserError(f"alignment.min_face_px: must be >= 12 (the detector's smallest window), got "
                            f"{self.min_face_px}")
        if int(self.detect_max_side) < 64:
            raise UserError(f"alignment.detect_max_side: must be >= 64 px, got {self.detect_max_side}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AlignmentRecipe:
        if isinstance(data, AlignmentRecipe):
            return data
        if not isinstance(data, dict):
            raise UserError(f"alignment recipe: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"alignment recipe: unknown key(s) {', '.join(unknown)} (written by a newer "
                            "facetrain?); known: " + ", ".join(sorted(known)))
        return cls(**data)

    def describe(self) -> str:
        return (f"{self.detector} -> {self.template} at {self.size} px, margin {self.margin:g}, "
                f"face choice {self.face_choice}")


def _marker(root: str | Path) -> dict | None:
    """The MARKER_FILE facetrain.align left in `root`, checked, or None for other folders."""
    marker = Path(root) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{marker}: unreadable alignment marker ({err}); re-run python -m facetrain.align on "
                        "the raw photos, or delete the file if this folder holds other crops") from None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or "recipe" not in data:
        raise UserError(f"{marker}: not a facetrain.align marker (format tag or recipe missing)")
    return data


def recipe_of_folder(root: str | Path) -> dict | None:
    """The recipe dict facetrain.align recorded for `root` (its MARKER_FILE), or None for other folders."""
    data = _marker(root)
    return None if data is None else AlignmentRecipe.from_dict(data["recipe"]).to_dict()


def incomplete_alignment(root: str | Path) -> str | None:
    """A one-line warning when facetrain.align has not finished `root` (its marker says "complete": false: the
    run was stopped or is still going, so photos are missing), else None. Markers written before the key
    existed count as complete; an unreadable one is left to the readers of the recipe, which name it."""
    try:
        data = _marker(root)
    except UserError:
        return None
    if data is None or data.get("complete", True) is not False:
        return None
    source = data.get("input") or "<the raw photos>"
    return (f"warning: {root} is only partly aligned ({Path(root) / MARKER_FILE} says \"complete\": false: "
            f"facetrain.align was stopped or is still running), so some photos are missing; re-run python -m "
            f"facetrain.align --input {source} --output {root} to finish it (finished photos are not redone)")


# ----------------------------------------------------------------------------------------------------------
# Aligning one photo


@dataclass
class AlignResult:
    status: str
    """"ok", "far_from_template" (crop kept, flagged), "no_face", "several_skipped", "too_small"."""
    crop: Image.Image | None = None
    reason: str = ""
    n_faces: int = 0
    """Detections at or above min_confidence."""
    kept: int | None = None
    choice: str = ""
    """Why this face was kept when there were several ("" for one face)."""
    points: np.ndarray | None = None
    """(5, 2) landmarks of the kept face in the photo's pixels."""
    box: np.ndarray | None = None
    score: float | None = None
    template_error: float | None = None
    """Mean distance of the warped landmarks from the template / the template's inter-ocular distance."""
    matrix: np.ndarray | None = field(default=None, repr=False)
    """(3, 3) photo -> crop similarity transform (in the photo's full-resolution pixels)."""

    @property
    def ok(self) -> bool:
        return self.crop is not None

    def face_record(self) -> dict:
        """Which face was used, for answers and reports: {"faces": detections, "box": [x0, y0, x1, y1] in the
        photo's pixels (0.1 px) or None, "choice": why that one ("" for a single face)}."""
        box = None if self.box is None else [round(float(v), 1) for v in self.box]
        return {"faces": int(self.n_faces), "box": box, "choice": self.choice}


def detect_faces(rgb: Image.Image, recipe: AlignmentRecipe) -> list:
    """Confident faces of an RGB image, landmarks in its own pixels (detection on a bounded-size copy)."""
    from facetrain.alignment.detectors import get_detector

    detector = get_detector(recipe.detector, int(recipe.min_face_px))
    w, h = rgb.size
    scale = min(1.0, recipe.detect_max_side / max(w, h))
    small = rgb if scale == 1.0 else rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                Image.Resampling.BILINEAR, reducing_gap=2.0)
    faces = detector.detect(np.asarray(small))
    # PIL's resize maps pixel centres: x_small + 0.5 = (x + 0.5) * small / full
    sx, sy = w / small.size[0], h / small.size[1]
    for f in faces:
        f.box = (f.box + 0.5) * np.array([sx, sy, sx, sy]) - 0.5
        f.points = (f.points + 0.5) * np.array([sx, sy]) - 0.5
    return [f for f in faces if f.score >= recipe.min_confidence]


def similarity_transform(src: np.ndarray, dst: np.ndarray):
    """scikit-image's least-squares similarity transform mapping src (N, 2) onto dst (N, 2)."""
    try:
        from skimage.transform import SimilarityTransform
    except ImportError as err:
        from facetrain.alignment.detectors import no_skimage

        raise no_skimage(err) from None
    tform = SimilarityTransform.from_estimate(np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64))
    if not tform:  # FailedEstimation (degenerate points, e.g. all landmarks in one place)
        return None
    return tform


def warp_to_template(rgb: Image.Image, points: np.ndarray, recipe: AlignmentRecipe):
    """(crop, residual as a fraction of the template's inter-ocular distance, 3x3 matrix) or None when the
    landmarks are degenerate."""
    from skimage.transform import warp

    dst = template_points(recipe.template, int(recipe.size), float(recipe.margin))
    tform = similarity_transform(points, dst)
    if tform is None:
        return None
    residual = float(np.mean(np.linalg.norm(tform(points) - dst, axis=1))) / eye_centres_distance(dst)
    matrix = np.asarray(tform.params, dtype=np.float64)
    # Shrinking by more than 2x: box-filter the photo by an integer factor first (bilinear sampling alone
    # would alias), then fit again on the reduced photo's coordinates.
    factor = int(1.0 / tform.scale) if tform.scale < 0.5 else 1
    src_img, src_pts = rgb, points
    if factor > 1:
        src_img = rgb.reduce(factor)
        # reduced pixel i averages photo pixels i*factor .. i*factor + factor - 1 (pixel centres at integers)
        src_pts = (points - (factor - 1) / 2.0) / factor
        tform = similarity_transform(src_pts, dst)
        if tform is None:
            return None
    size = int(recipe.size)
    out = warp(np.asarray(src_img), tform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0.0,
               preserve_range=True)
    crop = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    return crop, residual, matrix


def align_image(img: Image.Image, recipe: AlignmentRecipe | dict) -> AlignResult:
    """Detect, choose and align one face of `img` (any PIL mode; converted to RGB as images.to_rgb does)."""
    from facetrain.data.images import to_rgb

    recipe = AlignmentRecipe.from_dict(recipe) if isinstance(recipe, dict) else recipe
    rgb = to_rgb(img)
    w, h = rgb.size
    if min(w, h) < recipe.min_face_px:
        return AlignResult("too_small", reason=f"{w}x{h} px is smaller than the smallest face searched for "
                           f"(min_face_px {recipe.min_face_px})")
    faces = detect_faces(rgb, recipe)
    if not faces:
        return AlignResult("no_face", reason=f"no face with confidence >= {recipe.min_confidence:g}")
    kept, choice = 0, ""
    if len(faces) > 1:
        kept, choice = FACE_CHOICES[recipe.face_choice](faces, w, h)
        if kept is None:
            return AlignResult("several_skipped", reason=f"{len(faces)} faces; {choice}", n_faces=len(faces),
                               choice=choice)
    face = faces[kept]
    warped = warp_to_template(rgb, face.points, recipe)
    if warped is None:
        return AlignResult("no_face", reason="degenerate landmarks (no similarity transform fits them)",
                           n_faces=len(faces), points=face.points, box=face.box, score=face.score)
    crop, residual, matrix = warped
    status = "ok" if residual <= recipe.max_template_error else "far_from_template"
    reason = "" if status == "ok" else (f"landmarks {residual:.2f} inter-ocular distances from the template "
                                        f"after warping (> {recipe.max_template_error:g})")
    return AlignResult(status, crop, reason, len(faces), kept, choice, face.points, face.box, face.score, residual,
                       matrix)
