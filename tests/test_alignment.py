"""facetrain.alignment.recipe: the template, the similarity warp, the recipe, face choice; then the detector on real
photos: the dlib annotations (recall, eye-centre error), re-detection on aligned crops, composed photos."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from helpers import FACES, SHARED
from PIL import Image, ImageDraw, ImageFilter

from facetrain.alignment.detectors import Face
from facetrain.alignment.recipe import (
    FACE_CHOICES,
    MARKER_FILE,
    AlignmentRecipe,
    align_image,
    recipe_of_folder,
    template_points,
    warp_to_template,
)
from facetrain.data.images import load_image
from facetrain.errors import UserError

PHOTOS = SHARED / "data" / "photos"
DLIB = PHOTOS / "dlib_faces"
FACE_REC = PHOTOS / "face_recognition"
YALE = FACES / "yalefaces"
NO_PHOTOS = f"shared raw photos not found at {PHOTOS} (only present inside the facetrain workplace)"


def _has_detector() -> bool:
    try:
        import facenet_pytorch  # noqa: F401
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


needs_detector = pytest.mark.skipif(not _has_detector(), reason='the align extra is not installed '
                                    '(pip install -e ".[align]")')
needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason=NO_PHOTOS)


# ----------------------------------------------------------------------------------------------------------
# Geometry, without a detector


def test_template_scales_with_size_and_margin():
    t112 = template_points("arcface_112", 112)
    assert t112[0].tolist() == pytest.approx([38.2946, 51.6963])
    np.testing.assert_allclose(template_points("arcface_112", 224), 2 * t112)
    # margin 0.25: the face is 1/1.25 as large, about the crop centre
    np.testing.assert_allclose(template_points("arcface_112", 112, 0.25) - 56, (t112 - 56) / 1.25)
    with pytest.raises(UserError, match="unknown alignment template"):
        template_points("nope", 112)


def _dots(size: tuple[int, int], points: np.ndarray, radius: float) -> Image.Image:
    """A dark RGB image with a bright Gaussian blob at each point (sub-pixel centres)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), dtype=np.float64)
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * radius ** 2))
    arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([arr] * 3, axis=-1), "RGB")


def _blob_centres(img: Image.Image, near: np.ndarray, window: int = 6) -> np.ndarray:
    arr = np.asarray(img.convert("L"), dtype=np.float64)
    out = []
    for x, y in near:
        x0, y0 = int(round(x)) - window, int(round(y)) - window
        patch = arr[y0:y0 + 2 * window + 1, x0:x0 + 2 * window + 1]
        yy, xx = np.mgrid[0:patch.shape[0], 0:patch.shape[1]]
        out.append([x0 + (patch * xx).sum() / patch.sum(), y0 + (patch * yy).sum() / patch.sum()])
    return np.array(out)


@pytest.mark.parametrize("scale, angle_deg, size", [(2.3, 17.0, 112), (1.0, -8.0, 160), (6.5, 40.0, 112)])
def test_warp_puts_the_landmarks_on_the_template(scale, angle_deg, size):
    """Five dots placed by a known similarity transform of the template land on the template after the warp
    (6.5x: the photo is box-filtered by an integer factor first, which must not move them)."""
    base = template_points("arcface_112", 112)
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    src = (base - 56) @ rot.T * scale + np.array([300.0, 260.0])
    photo = _dots((640, 560), src, radius=1.2 * scale)
    recipe = AlignmentRecipe(size=size)
    crop, residual, matrix = warp_to_template(photo, src, recipe)
    assert crop.size == (size, size) and crop.mode == "RGB"
    assert residual < 1e-6  # an exact similarity: the fit leaves nothing
    dst = template_points("arcface_112", size)
    found = _blob_centres(crop, dst, window=max(4, size // 25))
    assert np.abs(found - dst).max() < 0.35, found - dst
    # the matrix maps the photo's landmarks onto the template
    mapped = (matrix @ np.c_[src, np.ones(5)].T).T[:, :2]
    np.testing.assert_allclose(mapped, dst, atol=1e-6)


def test_recipe_round_trip_and_checks():
    r = AlignmentRecipe(size=128, margin=0.1, face_choice="central")
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d and AlignmentRecipe.from_dict(d) == r
    with pytest.raises(UserError, match="unknown key"):
        AlignmentRecipe.from_dict({**d, "sharpen": True})
    with pytest.raises(UserError, match="face_choice"):
        AlignmentRecipe(face_choice="first")
    with pytest.raises(UserError, match="unknown face detector"):
        AlignmentRecipe(detector="haar")
    with pytest.raises(UserError, match="alignment.size"):
        AlignmentRecipe(size=8)


def test_recipe_of_folder(tmp_path):
    assert recipe_of_folder(tmp_path) is None
    recipe = AlignmentRecipe(size=96).to_dict()
    (tmp_path / MARKER_FILE).write_text(json.dumps({"format": "facetrain-align", "recipe": recipe}))
    assert recipe_of_folder(tmp_path) == recipe
    (tmp_path / MARKER_FILE).write_text("{not json")
    with pytest.raises(UserError, match=MARKER_FILE):
        recipe_of_folder(tmp_path)


def _face(x0, y0, w):
    return Face(np.array([x0, y0, x0 + w, y0 + w], dtype=float), np.zeros((5, 2)), 0.99)


def test_face_choice_policies():
    faces = [_face(10, 10, 80), _face(180, 130, 40), _face(300, 10, 60)]  # image 400 x 300, centre (200, 150)
    assert FACE_CHOICES["largest"](faces, 400, 300)[0] == 0
    kept, why = FACE_CHOICES["central"](faces, 400, 300)
    assert kept == 1 and "central" in why
    assert FACE_CHOICES["skip"](faces, 400, 300)[0] is None


# ----------------------------------------------------------------------------------------------------------
# With the detector on real photos


def _annotated_faces():
    """(image file, left eye centre, right eye centre, box width) per face of the dlib 68-point annotations."""
    for xml in ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"):
        for image in ET.parse(DLIB / xml).getroot().iter("image"):
            for box in image.iter("box"):
                pts = {int(p.get("name")): (float(p.get("x")), float(p.get("y"))) for p in box.iter("part")}
                p = np.array([pts[i] for i in range(68)])
                # iBUG 68: 36-41 the eye on the image's left, 42-47 the other
                yield image.get("file"), p[36:42].mean(axis=0), p[42:48].mean(axis=0), int(box.get("width"))


@needs_detector
@needs_photos
def test_detection_recall_and_eye_error_on_dlib_annotations():
    """Issue 14 acceptance: recall >= 0.9 on annotated faces >= 40 px wide, mean eye-centre error <= 0.1 of the
    inter-ocular distance. A face is found when a detection's two eye points lie, on average, within half the
    inter-ocular distance of the annotation's eye centres."""
    from facetrain.alignment.recipe import detect_faces

    recipe = AlignmentRecipe()
    detections: dict[str, list] = {}
    total = found = 0
    errors = []
    for file, left, right, width in _annotated_faces():
        if width < 40:
            continue
        if file not in detections:
            detections[file] = detect_faces(load_image(DLIB / file), recipe)
        iod = float(np.linalg.norm(right - left))
        errs = [(np.linalg.norm(f.points[0] - left) + np.linalg.norm(f.points[1] - right)) / 2 / iod
                for f in detections[file]]
        total += 1
        if errs and min(errs) < 0.5:
            found += 1
            errors.append(min(errs))
    recall, mean_err = found / total, float(np.mean(errors))
    print(f"dlib_faces: {total} annotated faces >= 40 px, recall {recall:.3f}, mean eye-centre error "
          f"{mean_err:.4f} x inter-ocular distance")
    assert total >= 20
    assert recall >= 0.9
    assert mean_err <= 0.1


def _redetected_eyes(crop: Image.Image, pad: int) -> np.ndarray | None:
    """Eye points the detector finds on an aligned crop (padded with gray so the face does not touch the edge)."""
    from facetrain.alignment.recipe import detect_faces

    size = crop.size[0]
    canvas = Image.new("RGB", (size + 2 * pad, size + 2 * pad), (128, 128, 128))
    canvas.paste(crop, (pad, pad))
    faces = detect_faces(canvas, AlignmentRecipe())
    if not faces:
        return None
    best = max(faces, key=lambda f: f.area)
    return best.points[:2] - pad


@needs_detector
@pytest.mark.skipif(not YALE.is_dir(), reason=NO_PHOTOS)
def test_aligned_yalefaces_eyes_land_on_the_template():
    """320x243 Yale frames (face inside a larger frame): detecting landmarks again on each 112 px crop puts the
    eye centres within 4 px (mean 2 px; the detector's own landmark noise is ~0.07 inter-ocular distances = 2.4 px)
    of the template's."""
    recipe = AlignmentRecipe()
    template = template_points(recipe.template, recipe.size)[:2]
    files = [sorted(p.iterdir())[k % 3] for k, p in enumerate(sorted(YALE.glob("subject*"))[:6])]
    errors = []
    for f in files:
        res = align_image(load_image(f), recipe)
        assert res.ok, f"{f}: {res.status} {res.reason}"
        eyes = _redetected_eyes(res.crop, pad=40)
        assert eyes is not None, f"{f}: no face found again on the aligned crop"
        errors.append(float(np.linalg.norm(eyes - template, axis=1).max()))
    print(f"yalefaces: eye centres on the aligned crops vs the template: mean {np.mean(errors):.2f} px, "
          f"max {np.max(errors):.2f} px (112 px crops, {len(files)} photos)")
    assert max(errors) <= 4.0 and np.mean(errors) <= 2.0


def _compose(face: Image.Image, background: Image.Image, scale: float, angle: float, centre) -> Image.Image:
    """`face` (a whole portrait) scaled, rotated about its centre, pasted with a soft edge at `centre`."""
    w, h = face.size
    f = face.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    mask = Image.new("L", f.size, 0)
    ImageDraw.Draw(mask).ellipse([f.size[0] * 0.08, f.size[1] * 0.05, f.size[0] * 0.92, f.size[1] * 0.95], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(2, f.size[0] // 30)))
    f, mask = f.rotate(angle, Image.Resampling.BICUBIC, expand=True), mask.rotate(angle, expand=True)
    out = background.copy()
    out.paste(f, (int(centre[0] - f.size[0] / 2), int(centre[1] - f.size[1] / 2)), mask)
    return out


@needs_detector
@needs_photos
def test_composed_photos_give_the_source_crop():
    """A portrait pasted at several positions, scales (0.5-1.3) and rotations (-30 to 25 degrees) onto a larger
    background with no face (dlib_faces/dogs.jpg) is cut to the same crop as the portrait itself: after a
    Gaussian blur of 1.5 px (the detector's landmark jitter of ~1 px moves every edge of a sharp crop), the mean
    absolute difference in the central face region is <= 8.5 grey levels of 255 (the source crop shifted by 3 px:
    11.2), and the eyes found again on the two crops are within 3 px of each other (measured 2.3-7.4 levels and
    0.5-2.3 px)."""
    recipe = AlignmentRecipe()
    face = load_image(FACE_REC / "obama-480p.jpg").crop((250, 0, 610, 400))  # the portrait, 360 x 400
    background = load_image(DLIB / "dogs.jpg").resize((800, 600))
    ref = align_image(face, recipe)
    assert ref.ok

    def region(crop: Image.Image) -> np.ndarray:
        return np.asarray(crop.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)[20:100, 20:92]

    ref_px, ref_eyes = region(ref.crop), _redetected_eyes(ref.crop, pad=40)
    shifted = float(np.abs(region(ref.crop.transform(ref.crop.size, Image.Transform.AFFINE, (1, 0, 3, 0, 1, 0)))
                           - ref_px).mean())
    for scale, angle, centre in [(1.0, 0.0, (400, 300)), (0.6, 25.0, (560, 400)), (1.3, -15.0, (360, 300)),
                                 (0.8, 8.0, (620, 200)), (0.5, -30.0, (200, 200))]:
        res = align_image(_compose(face, background, scale, angle, centre), recipe)
        assert res.ok, f"scale {scale}, angle {angle}: {res.status} {res.reason}"
        diff = float(np.abs(region(res.crop) - ref_px).mean())
        moved = float(np.linalg.norm(_redetected_eyes(res.crop, pad=40) - ref_eyes, axis=1).max())
        print(f"composed scale {scale} angle {angle}: mean |diff| {diff:.1f} grey levels (3 px shift: "
              f"{shifted:.1f}), eyes moved {moved:.2f} px")
        assert diff <= 8.5 and moved <= 3.0


@needs_detector
@needs_photos
def test_two_faces_one_kept_by_policy_and_no_face():
    face = load_image(FACE_REC / "obama-480p.jpg").crop((250, 0, 610, 400))
    background = load_image(DLIB / "dogs.jpg").resize((800, 600))
    two = _compose(face, background, 0.9, 0.0, (200, 300))
    two = _compose(face, two, 0.4, 0.0, (450, 300))  # a smaller face, nearer the centre (400, 300)
    largest = align_image(two, AlignmentRecipe(face_choice="largest"))
    assert largest.n_faces == 2 and "largest" in largest.choice and largest.ok
    assert largest.box[0] < 300  # the big face is on the left
    from facetrain.alignment.recipe import detect_faces

    faces = detect_faces(two, AlignmentRecipe())  # the policies on the same detections (one detection, not two)
    central, why = FACE_CHOICES["central"](faces, *two.size)
    assert faces[central].box[0] > 300 and "central" in why
    skipped = align_image(two, AlignmentRecipe(face_choice="skip"))
    assert skipped.status == "several_skipped" and skipped.crop is None and skipped.n_faces == 2
    none = align_image(background, AlignmentRecipe())
    assert none.status == "no_face" and none.crop is None
    tiny = align_image(Image.new("RGB", (1, 1)), AlignmentRecipe())
    assert tiny.status == "too_small"
