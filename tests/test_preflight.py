"""Data pre-flight: a face folder with every bad case mixed in is refused exactly (error) or trained without
the bad files with exact counts (skip); the scan is usable by the evaluator; all ranks agree.

Real faces (../shared/data/faces/att_faces: 40 people x 10 gray PNGs) are copied into tmp_path when present,
otherwise synthetic people are written as PNG files; the bad cases are then mixed into that copy.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FACES, run_module, run_train, tiny_train_config
from PIL import Image

from facetrain.config.schema import DataConfig
from facetrain.data import synthetic
from facetrain.data.dataset import FaceDataset
from facetrain.data.faceset import folder_faceset
from facetrain.data.images import Preprocess
from facetrain.data.preflight import REFUSED, apply_preflight, check_image, scan
from facetrain.data.transforms import eval_transform
from facetrain.errors import UserError

MAX_PIXELS = 50_000  # data.max_image_pixels in these tests: faces are ~10k pixels, huge.png is 90k


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG that declares width x height gray pixels (a decompression bomb: only the first row is there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
            + chunk(b"IEND", b""))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_bad_folder(root: Path) -> dict:
    """Good identities plus every bad case; returns what an exact pre-flight must report."""
    src = FACES / "att_faces"
    if src.is_dir():
        for ident in sorted(p for p in src.iterdir() if p.is_dir()):
            shutil.copytree(ident, root / ident.name)
    else:
        for k in range(12):
            (root / f"p{k:02d}").mkdir(parents=True)
            for j in range(6):
                synthetic.render(0, k, j, size=64).save(root / f"p{k:02d}" / f"{j}.png")
    ids = sorted(p for p in root.iterdir() if p.is_dir())
    good = sorted(p for p in root.rglob("*") if p.is_file())
    with Image.open(good[0]) as im:
        base_mode, face = im.mode, im.convert("L")
    modes = Counter({base_mode: len(good)})

    refused: dict[str, str] = {}

    def bad(path: Path, data: bytes, problem: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        refused[str(path)] = problem

    jpg, png = _encoded(face, "JPEG"), _encoded(face, "PNG")
    bad(ids[0] / "zero.jpg", b"", "empty_file")
    bad(ids[1] / "truncated.jpg", jpg[: len(jpg) * 6 // 10], "corrupt")
    bad(ids[2] / "truncated.png", png[: len(png) * 6 // 10], "corrupt")
    bad(ids[3] / "notes.jpg", b"not a picture\n", "not_an_image")
    bad(ids[3] / "._1.png", b"\x00\x05\x16\x07" + bytes(200), "not_an_image")  # macOS resource-fork file
    bad(ids[4] / "bomb.png", _png_bomb(30_000, 30_000), "too_large")  # 900 Mpx: PIL refuses it too
    bad(ids[5] / "huge.png", _encoded(face.resize((300, 300)), "PNG"), "too_large")  # over MAX_PIXELS only
    bad(root / "broken_person" / "a.png", png[:100], "corrupt")  # every image bad: the identity disappears
    bad(root / "broken_person" / "b.jpg", b"<html>404</html>", "not_an_image")

    # usable, counted: unusual modes (converted to RGB on load) and a PNG named .jpg (decoded by content)
    face.convert("RGBA").save(ids[6] / "rgba.png")
    face.convert("CMYK").save(ids[7] / "cmyk.jpg")
    Image.fromarray(np.asarray(face, dtype=np.uint16) * 257).save(ids[8] / "gray16.png")
    face.convert("P").save(ids[9] / "palette.png")
    (ids[10] / "png_named.jpg").write_bytes(png)
    (root / "solo").mkdir()
    shutil.copy(good[0], root / "solo" / "only.png")
    modes.update(["RGBA", "CMYK", "I;16", "P", "L", base_mode])  # png_named.jpg is gray, solo a copy
    # not read by training, reported
    (ids[10] / "lost.dat").write_bytes(jpg)  # an image with a non-image extension
    (ids[11] / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(64))
    (ids[11] / "extra").mkdir()
    shutil.copy(good[0], ids[11] / "extra" / "nested.png")
    (root / "README.txt").write_text("faces\n")
    (root / "empty_person").mkdir()
    (root / "notes_only").mkdir()
    (root / "notes_only" / "info.txt").write_text("no images here\n")

    return {
        "refused": refused,
        "identities": len(ids) + 1,  # + solo; broken_person, empty_person and notes_only hold no usable image
        "images": len(good) + 6,  # + 4 unusual modes, png_named.jpg, solo/only.png
        "modes": dict(modes),
        "notes": {
            "wrong_extension": {str(ids[10] / "png_named.jpg"), str(ids[10] / "lost.dat")},
            "ignored": {str(ids[11] / "Thumbs.db"), str(ids[11] / "extra"), str(root / "README.txt"),
                        str(root / "notes_only" / "info.txt")},
            "empty_identity": {str(root / "broken_person"), str(root / "empty_person"), str(root / "notes_only")},
            "single_image": {str(root / "solo")},
        },
    }


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    return root, make_bad_folder(root)


def test_scan_finds_exactly_every_bad_case(bad_folder):
    root, expected = bad_folder
    report = scan(root, MAX_PIXELS, progress=False)
    assert {b["path"]: b["problem"] for b in report.bad} == expected["refused"]
    counts = report.counts()
    assert counts["identities"] == expected["identities"] and counts["images"] == expected["images"]
    assert report.modes == expected["modes"]
    assert counts["converted"] == sum(n for m, n in expected["modes"].items() if m != "RGB")
    for key, paths in expected["notes"].items():
        assert {n["path"] for n in report.notes if n["problem"] == key} == paths, key
    assert sum(counts[k] for k in REFUSED) == len(expected["refused"])
    lost = next(n for n in report.notes if n["path"].endswith("lost.dat"))
    assert "rename it to .jpg" in lost["detail"]


def test_truncated_jpeg_is_found_by_decoding_not_by_the_header(tmp_path):
    face = synthetic.render(0, 1, 1, size=250)
    data = _encoded(face, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 9 // 10])
    with Image.open(path) as im:  # the header alone looks fine
        assert im.size == (250, 250)
    assert check_image(str(path), MAX_PIXELS * 10).problem == "corrupt"
    path.write_bytes(data)
    assert check_image(str(path), MAX_PIXELS * 10).problem is None


def test_error_mode_exits_nonzero_listing_exactly_the_bad_files(bad_folder, tmp_path):
    root, expected = bad_folder
    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(root), "val_identities": 4,
                                                "max_image_pixels": MAX_PIXELS, "bad_images": "error"}})
    out = tmp_path / "run"
    proc = run_train(["--config", cfg, "--train.output_dir", out], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("facetrain: error: ") and "data.bad_images: skip" in line
    listed = dict(re.findall(r"(\S+) \((" + "|".join(REFUSED) + r")\)", line))
    assert listed == expected["refused"]
    saved = json.loads((out / "preflight.json").read_text())
    assert {b["path"] for b in saved["bad"]} == set(expected["refused"])
    assert "truncated / corrupt" in (out / "preflight.txt").read_text()
    assert not (out / "checkpoints").exists()


def test_skip_mode_trains_without_them_and_reports_exact_counts(bad_folder, tmp_path):
    root, expected = bad_folder
    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(root), "val_identities": 4,
                                                "max_image_pixels": MAX_PIXELS, "bad_images": "skip"},
                                       "train": {"max_steps": 2, "val_every": 2, "ckpt_every": 2}})
    out = tmp_path / "run"
    proc = run_train(["--config", cfg, "--train.output_dir", out], timeout=600)
    n_bad = len(expected["refused"])
    assert f"pre-flight skipped {n_bad} image(s)" in proc.stdout
    counts = json.loads((out / "preflight.json").read_text())["counts"]
    assert counts["identities"] == expected["identities"] and counts["images"] == expected["images"]
    assert counts["empty_file"] == 1 and counts["corrupt"] == 3 and counts["not_an_image"] == 3
    assert counts["too_large"] == 2 and counts["empty_identity"] == 3 and counts["single_image"] == 1
    # the trainer used exactly the usable images and identities
    m = re.search(r"(\d+) train / (\d+) val identities, (\d+) / (\d+) images", proc.stdout)
    assert m, proc.stdout[-2000:]
    ids_train, ids_val, img_train, img_val = map(int, m.groups())
    assert ids_train + ids_val == expected["identities"] and img_train + img_val == expected["images"]
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == 2
    # skipped files of validation identities are validation's failures to acquire: k of img_val + k images
    rate = done["final"]["fta_rate"]
    assert any(rate == pytest.approx(k / (img_val + k)) for k in range(n_bad + 1)), rate
    listing = (out / "preflight.txt").read_text()
    assert all(path in listing for path in expected["refused"])


def test_skip_filters_the_faceset_and_converts_every_mode(bad_folder, tmp_path):
    root, expected = bad_folder
    cfg = DataConfig(source="folder", root=str(root), max_image_pixels=MAX_PIXELS, bad_images="skip")
    faceset = apply_preflight(folder_faceset(str(root)), cfg, tmp_path / "run")
    assert len(faceset) == expected["images"] and len(faceset.names) == expected["identities"]
    assert sorted(faceset.skipped) == sorted(expected["refused"])
    assert not set(faceset.paths) & set(expected["refused"])
    assert sorted(set(faceset.labels.tolist())) == list(range(len(faceset.names)))
    transform = eval_transform(Preprocess(32, [0.5] * 3, [0.5] * 3))
    ds = FaceDataset(faceset, np.arange(len(faceset)), faceset.labels, transform)
    for i, path in enumerate(faceset.paths):  # every kept image loads: unusual modes become RGB, 16-bit gray 8-bit
        name = Path(path).name
        if name in ("rgba.png", "cmyk.jpg", "gray16.png", "palette.png", "png_named.jpg"):
            image, label, _ = ds[i]
            assert image.shape[1:] == (32, 32) and label == faceset.labels[i]
            assert image.shape[0] in ((3,) if name in ("rgba.png", "cmyk.jpg") else (1, 3))  # gray stays 1-channel
            assert image.dtype == torch.uint8 and float((image / 255.0).std()) > 0.025  # scaled, not clipped
    with pytest.raises(UserError, match="data.bad_images: skip"):
        apply_preflight(folder_faceset(str(root)), DataConfig(source="folder", root=str(root),
                                                               max_image_pixels=MAX_PIXELS), tmp_path / "run2")


def test_eval_and_identify_name_every_bad_file_or_skip_them(bad_folder, tmp_path):
    """One run names every unusable file (not only the first) under --fta error (and the former --bad-images
    error); by default they are failures to acquire, and --bad-images skip (= --fta exclude) leaves them out."""
    from facetrain.config.schema import ModelConfig
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import create_model

    root, expected = bad_folder
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    torch.manual_seed(0)
    write_bundle(bundle, create_model(ModelConfig(backbone="test_efficientnet", embedding_dim=16,
                                                  channels_last=False)),
                 ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False),
                 Preprocess(32, [0.5] * 3, [0.5] * 3))
    common = ["--model", bundle, "--data", root, "--no-plots", "--num-workers", 0, "--no-calibrate",
              "--max-image-pixels", MAX_PIXELS]
    failed = run_module("facetrain.eval", common + ["--output", tmp_path / "e1", "--bad-images", "error"], check=False)
    assert failed.returncode == 2, failed.stderr[-2000:]
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("facetrain: error:") and "--fta exclude" in line
    assert f"{len(expected['refused'])} image(s) cannot be used" in line
    for path, problem in expected["refused"].items():
        if problem != "too_large" or path.endswith("huge.png"):  # the bomb exceeds PIL's own limit too
            assert f"{path} ({problem})" in line, path
    run_module("facetrain.eval", common + ["--output", tmp_path / "e2", "--bad-images", "skip"])
    report = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    fta = report["failures_to_acquire"]
    assert {b["path"] for b in fta["files"]} == set(expected["refused"]) and fta["policy"] == "exclude"
    assert fta["by_problem"]["undecodable"] == len(expected["refused"])
    assert report["n_images"] == expected["images"]

    gallery = ["--model", bundle, "--gallery", root, "--evaluate", "--no-cache", "--num-workers", 0, "--json",
               "--max-image-pixels", MAX_PIXELS]
    failed = run_module("facetrain.identify", gallery, check=False)
    assert failed.returncode == 2 and f"{len(expected['refused'])} image(s) cannot be used" in failed.stderr
    done = run_module("facetrain.identify", gallery + ["--bad-images", "skip"])
    assert json.loads(done.stdout)["evaluation"]["n_probes"] > 0
    assert all(path in done.stderr for path in expected["refused"])


def test_scan_is_parallel_and_fast(tmp_path):
    """A thousand small faces check in well under the time of one training epoch."""
    root = tmp_path / "many"
    face = _encoded(synthetic.render(0, 0, 0, size=112), "JPEG")
    for k in range(50):
        (root / f"id{k}").mkdir(parents=True)
        for j in range(20):
            (root / f"id{k}" / f"{j}.jpg").write_bytes(face)
    start = time.perf_counter()
    report = scan(root, MAX_PIXELS, progress=False)
    assert report.images == 1000 and report.identities == 50 and not report.bad
    assert time.perf_counter() - start < 10  # ~0.1 ms of decoding per file; generous for a busy 2-core CPU


@pytest.mark.slow
def test_two_ranks_stop_together_on_bad_files(bad_folder, tmp_path):
    """Only rank 0 scans; both ranks get the verdict and exit with the message, nobody waits on a peer."""
    root, expected = bad_folder
    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(root), "val_identities": 4,
                                                "max_image_pixels": MAX_PIXELS}})
    start = time.monotonic()
    proc = run_train(["--config", cfg, "--train.output_dir", tmp_path / "run"], procs=2, check=False, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    errors = [line for line in proc.stderr.splitlines() if line.startswith("facetrain: error: ")]
    # Both ranks raise the same verdict; whichever exits first makes the launcher stop the other, which may go
    # before it prints. What the user relies on: the file list is shown and nobody hangs or blames a peer.
    assert errors, proc.stderr[-3000:]
    assert all("image(s) cannot be used" in line for line in errors), errors
    assert "lost contact" not in proc.stderr
