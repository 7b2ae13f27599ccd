"""Which face does each `--face-choice` rule keep, against the face a person meant? (docs/align.md)

    python bench/face_choice.py [--shared ../shared] [--json out.json]

Two sets, both from the shared annotated photos (../shared/data/photos, see its SOURCE.txt):

A. Subject-centred crops, built the way in-the-wild pairs benchmarks build their photos: for every face annotated
   in dlib's group photos (PASCAL VOC, training.xml + testing.xml: a box per face), a square crop centred on that
   face (side = 2.5x or 4x the face, the centre also moved by 10% of the side left or right), resized to
   250 x 250 px. The intended subject is the annotated face the crop was cut around; the other people of the
   group photo are around it, cut by the crop's edges as in those benchmarks.
B. Whole photos of one named person (face_recognition's examples and knn_examples, Tom_Cruise): the intended
   face is the named person's, marked by hand below (`INTENDED`) for every photo where MTCNN finds several.

Only photos where MTCNN (the default recipe: confidence >= 0.9, faces >= 20 px) finds several faces and finds
the intended one count: the rules differ only there. A rule is right when the face it keeps is the intended one
(box centre within half a face width of the intended box's centre).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from facetrain.alignment.recipe import FACE_CHOICES, AlignmentRecipe, detect_faces  # noqa: E402
from facetrain.data.images import load_image  # noqa: E402

RULES = ("largest", "central", "size_centre")
CROP_PX = 250  # side of the benchmark-style crops (what in-the-wild pairs benchmarks distribute)
CONTEXTS = (2.5, 4.0)  # crop side / annotated face side
SHIFTS = (0.0, -0.1, 0.1)  # horizontal move of the crop centre, as a fraction of the crop side
# Set B: photo (relative to photos/) -> the intended face's box centre (x, y) in the photo's pixels, read off the
# photo by eye, for the photos where MTCNN finds several faces. Filled from this script's --list output.
# The other photos with several faces (two_people.jpg, knn test kit_with_rose.jpg and obama_and_biden.jpg) show
# two people with no single subject: not judged.
INTENDED: dict[str, tuple[float, float]] = {
    "face_recognition/obama-1080p.jpg": (996.0, 253.0),  # Obama; the other detection: 57 px at the bottom edge
}


def _boxes(dlib: Path) -> list[tuple[str, np.ndarray]]:
    """(image file, [x0, y0, x1, y1]) per annotated face."""
    out = []
    for xml in ("training.xml", "testing.xml"):
        for image in ET.parse(dlib / xml).getroot().iter("image"):
            for box in image.iter("box"):
                x, y, w, h = (float(box.get(k)) for k in ("left", "top", "width", "height"))
                out.append((image.get("file"), np.array([x, y, x + w, y + h])))
    return out


def _centre(box: np.ndarray) -> np.ndarray:
    return (np.asarray(box[:2]) + np.asarray(box[2:])) / 2.0


def _judge(faces: list, size: tuple[int, int], intended: np.ndarray, face_px: float) -> dict | None:
    """Per rule, whether it keeps the intended face; None when fewer than 2 faces or the intended one is missed."""
    if len(faces) < 2:
        return None
    dist = [float(np.linalg.norm(_centre(f.box) - intended)) for f in faces]
    target = int(np.argmin(dist))
    if dist[target] > 0.5 * face_px:
        return None
    return {rule: FACE_CHOICES[rule](faces, *size)[0] == target for rule in RULES}


def crops_set(dlib: Path, recipe: AlignmentRecipe) -> list[dict]:
    rows = []
    for name, box in _boxes(dlib):
        photo = load_image(dlib / name)
        side = float(max(box[2] - box[0], box[3] - box[1]))
        for context in CONTEXTS:
            for shift in SHIFTS:
                half = context * side / 2.0
                cx, cy = _centre(box) + np.array([shift * 2 * half, 0.0])
                crop = photo.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
                crop = crop.resize((CROP_PX, CROP_PX), Image.Resampling.BILINEAR)
                scale = CROP_PX / (2 * half)
                intended = (_centre(box) - np.array([cx - half, cy - half])) * scale
                faces = detect_faces(crop, recipe)
                verdict = _judge(faces, crop.size, intended, side * scale)
                rows.append({"photo": name, "box": box.tolist(), "context": context, "shift": shift,
                             "faces": len(faces), "verdict": verdict})
    return rows


def photos_set(photos: Path, recipe: AlignmentRecipe, listing: bool) -> list[dict]:
    files = sorted(p for p in (photos / "face_recognition").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files.append(photos / "dlib_faces" / "Tom_Cruise_avp_2014_4.jpg")
    rows = []
    for path in files:
        rel = str(path.relative_to(photos))
        photo = load_image(path)
        faces = detect_faces(photo, recipe)
        if listing and len(faces) > 1:
            print(rel, photo.size, [[round(v) for v in f.box] for f in faces])
        verdict = None
        if rel in INTENDED and len(faces) > 1:
            widths = [f.width for f in faces]
            verdict = _judge(faces, photo.size, np.array(INTENDED[rel]), float(np.median(widths)))
        rows.append({"photo": rel, "faces": len(faces), "verdict": verdict})
    return rows


def summary(rows: list[dict]) -> dict:
    judged = [r["verdict"] for r in rows if r["verdict"] is not None]
    return {"photos": len(rows), "several_faces": sum(r["faces"] > 1 for r in rows), "judged": len(judged),
            **{rule: sum(v[rule] for v in judged) for rule in RULES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    p.add_argument("--json", default="")
    p.add_argument("--list", action="store_true", help="print set B's photos with several faces and their boxes")
    args = p.parse_args()
    photos = Path(args.shared) / "data" / "photos"
    recipe = AlignmentRecipe()
    result = {"crops": summary(a := crops_set(photos / "dlib_faces", recipe)),
              "photos": summary(b := photos_set(photos, recipe, args.list))}
    for key, s in result.items():
        rates = ", ".join(f"{rule} {s[rule]}/{s['judged']}" for rule in RULES)
        print(f"{key}: {s['photos']} photos, {s['several_faces']} with several faces, {s['judged']} judged: {rates}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": result, "crops": a, "photos": b}, indent=1))


if __name__ == "__main__":
    main()
