"""python -m facetrain.align: mirrored tree, report, bad input, resume, recipe marker, missing detector."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SHARED, run_module
from PIL import Image

from facetrain.alignment.recipe import MARKER_FILE, AlignmentRecipe, recipe_of_folder

PHOTOS = SHARED / "data" / "photos"
FACE_REC = PHOTOS / "face_recognition"
DLIB = PHOTOS / "dlib_faces"

pytestmark = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"shared raw photos not found at {PHOTOS}")


def _has_align_extra() -> bool:
    try:
        import facenet_pytorch  # noqa: F401
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


needs_detector = pytest.mark.skipif(not _has_align_extra(), reason='pip install -e ".[align]" not done')


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height gray pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + \
        chunk(b"IEND", b"")


def small(src: Path, longest: int = 360) -> Image.Image:
    img = Image.open(src).convert("RGB")
    img.thumbnail((longest, longest))
    return img


def raw_tree(root: Path) -> Path:
    """<root>/<identity>/<photo>: real photos (one, two and no faces) and every kind of bad input."""
    a, b, c = root / "obama", root / "biden", root / "odd"
    for d in (a, b, c):
        d.mkdir(parents=True)
    small(FACE_REC / "obama-480p.jpg").save(a / "o1.jpg")
    small(FACE_REC / "obama_small.jpg").save(a / "o2.jpg")
    small(FACE_REC / "biden.jpg", 400).save(b / "b1.jpg")
    small(FACE_REC / "two_people.jpg", 500).save(b / "two.jpg")
    small(DLIB / "dogs.jpg").save(c / "dogs.jpg")  # no human face
    small(FACE_REC / "obama-480p.jpg").convert("CMYK").save(c / "cmyk.jpg")
    gray = np.asarray(small(FACE_REC / "obama-240p.jpg").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(c / "deep16.png")  # 16-bit gray
    assert Image.open(c / "deep16.png").mode.startswith("I")
    (c / "notes.jpg").write_text("not an image at all\n")
    (c / "zero.jpg").write_bytes(b"")
    (c / "bomb.png").write_bytes(png_bomb(30_000, 30_000))
    Image.new("RGB", (1, 1), (200, 150, 120)).save(c / "one.png")
    (c / "readme.txt").write_text("a text file\n")
    return root


def _report(out: Path) -> dict:
    return json.loads((out / "align.json").read_text())


def _paths(report: dict, key: str) -> set[str]:
    return {e["path"] for e in report["lists"][key]}


@needs_detector
def test_align_cli_report_bad_input_and_resume(tmp_path):
    raw, out = raw_tree(tmp_path / "raw"), tmp_path / "aligned"
    proc = run_module("facetrain.align", ["--input", raw, "--output", out, "--workers", "2", "--size", "96"])
    assert "Traceback" not in proc.stderr + proc.stdout
    rep = _report(out)
    odd = "odd" + os.sep
    assert _paths(rep, "no_face") == {odd + "dogs.jpg"}
    assert _paths(rep, "empty_file") == {odd + "zero.jpg"}
    assert _paths(rep, "not_an_image") == {odd + "notes.jpg"}
    assert _paths(rep, "too_large") == {odd + "bomb.png"}
    assert _paths(rep, "too_small") == {odd + "one.png"}
    assert _paths(rep, "ignored") == {odd + "readme.txt"}
    assert {"odd/cmyk.jpg", "odd/deep16.png"} <= _paths(rep, "converted")
    several = {e["path"]: e for e in rep["lists"]["several_faces"]}
    assert "biden/two.jpg" in several and "size and centrality" in several["biden/two.jpg"]["kept"]
    # every image file is in exactly one outcome: nothing silently dropped
    assert rep["images"] == 11 and rep["aligned"] == 6
    from facetrain.alignment.folder import OUTCOMES

    assert sum(rep["counts"][k] for k in OUTCOMES) == rep["images"]
    for name in ("dogs.jpg", "zero.jpg", "notes.jpg", "bomb.png", "one.png"):  # listed by name in the table
        assert name in proc.stdout
    crops = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert crops == ["biden/b1.png", "biden/two.png", "obama/o1.png", "obama/o2.png", "odd/cmyk.png",
                     "odd/deep16.png"]
    for p in out.rglob("*.png"):
        with Image.open(p) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
    assert recipe_of_folder(out) == AlignmentRecipe(size=96).to_dict()
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["complete"] and marker["aligned"] == 6

    # re-running skips every finished file: only the two photos changed since are aligned again; the one that
    # now shows no face loses its old crop (training must not see it)
    before = (out / "obama" / "o1.png").read_bytes()
    small(FACE_REC / "obama-720p.jpg", 300).save(raw / "obama" / "o1.jpg")
    small(DLIB / "dogs.jpg", 300).save(raw / "obama" / "o2.jpg")
    for name in ("o1.jpg", "o2.jpg"):
        os.utime(raw / "obama" / name, ns=(1, 1))
    again = run_module("facetrain.align", ["--input", raw, "--output", out, "--workers", "1", "--size", "96"])
    rep = _report(out)
    assert rep["aligned_this_run"] == 2 and rep["aligned"] == 5, again.stdout
    assert (out / "obama" / "o1.png").read_bytes() != before
    assert rep["removed_stale_crops"] == ["obama/o2.png"] and not (out / "obama" / "o2.png").exists()
    assert "obama/o2.jpg" in _paths(rep, "no_face")

    # another recipe into the same folder: one line, no mixing
    proc = run_module("facetrain.align", ["--input", raw, "--output", out, "--size", "112"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "another recipe" in proc.stderr and "size 96 -> 112" in proc.stderr and "--redo" in proc.stderr


def test_align_cli_without_the_detector_says_what_to_install(tmp_path):
    """facenet-pytorch hidden by a package of the same name that fails to import: one line naming the extra."""
    shim = tmp_path / "shim" / "facenet_pytorch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'facenet_pytorch'\")\n")
    raw = tmp_path / "raw" / "a"
    raw.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(raw / "x.png")
    proc = run_module("facetrain.align", ["--input", raw.parent, "--output", tmp_path / "out"], check=False,
                      env={"PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[align]"' in lines[0] and "facenet-pytorch" in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--size", "8"], "--size: must be 16..1024 px, got 8"),
    (["--min-face", "5"], "--min-face: must be >= 12"),
    (["--margin", "3"], "--margin: must be in [0, 2]"),
    (["--workers", "-1"], "--workers: must be >= 0"),
])
def test_align_option_errors_name_the_option(tmp_path, argv, message):
    from facetrain.align import build_parser, run
    from facetrain.errors import UserError

    (tmp_path / "raw" / "a").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "raw" / "a" / "x.png")
    args = build_parser().parse_args(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), *argv])
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(args)
    assert not (tmp_path / "out").exists()  # nothing written before the options are checked
