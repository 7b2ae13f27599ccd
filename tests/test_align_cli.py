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


@pytest.mark.slow
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


def photo_folder(root: Path, copies: int) -> Path:
    """<root>/<identity>/<photo>: `copies` small real one-face photos per identity, two identities."""
    for name, src in (("obama", FACE_REC / "obama-480p.jpg"), ("biden", FACE_REC / "biden.jpg")):
        (root / name).mkdir(parents=True)
        img = small(src, 240)
        for k in range(copies):
            img.save(root / name / f"{k:02d}.jpg")
    return root


def worker_pids(parent: int) -> list[int]:
    """The multiprocessing workers among `parent`'s children, from /proc (Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):  # gone, or still being created
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@needs_detector
@pytest.mark.slow
def test_a_dead_worker_is_one_line_not_a_hang(tmp_path):
    """A detection process killed (as the out-of-memory killer does) while the run goes on: today the parent
    waits forever at 0 % CPU (multiprocessing.Pool never returns the dead worker's photos). Now the run stops
    within a bounded time with one line saying that a re-run resumes."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import subprocess_env

    raw, out = photo_folder(tmp_path / "raw", 16), tmp_path / "aligned"
    journal = out / ".facetrain-align" / "journal.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "facetrain.align", "--input", str(raw), "--output", str(out),
                             "--workers", "2", "--no-progress"], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, victim = time.monotonic() + 120, None
        # once photos come back, each worker holds photos of its own: killing it loses them
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            workers = worker_pids(proc.pid)
            started = journal.is_file() and journal.read_text().count("\n") >= 1
            victim = workers[0] if len(workers) == 2 and started else None
            time.sleep(0.1)
        assert victim is not None, "the align workers never started"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("facetrain.align still waits 120 s after a worker died")
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, stderr[-3000:]
    assert "a detection process died" in lines[0] and "run the same command again to resume" in lines[0]


@needs_detector
@pytest.mark.parametrize("disk", ["read_only", "full"])
def test_align_onto_a_read_only_or_full_disk_is_one_line(tmp_path, disk):
    """Today: a traceback (and on a full disk a .tmp crop left behind). The journal keeps what was done."""
    from disks import read_only, small_disk

    raw, out = photo_folder(tmp_path / "raw", 4), tmp_path / "aligned"
    out.mkdir()
    mount, reason = (read_only(out), "Read-only file system") if disk == "read_only" else \
        (small_disk(out, 48), "No space left on device")  # 8 crops of ~20 KB do not fit in 48 KiB
    with mount:
        proc = run_module("facetrain.align", ["--input", raw, "--output", out, "--workers", "1", "--size", "112",
                                              "--no-progress"], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert reason in lines[0] and "a re-run of the same command resumes" in lines[0], lines[0]
        assert not list(out.rglob("*.tmp"))
