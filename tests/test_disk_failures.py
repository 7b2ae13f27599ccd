"""Full and read-only disks, folders where files belong, names that are not UTF-8: every command says so in
one line, leaves no `.tmp`, and loses no result it already had (issue 26, items 8 and 10).

Real full and read-only disks where the test may mount (`disks.small_disk`, `disks.read_only`: a tmpfs, a
read-only bind mount; skipped with the reason otherwise: chmod stops no root). The monkeypatched variants
(a write that raises ENOSPC / EROFS) run everywhere.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from disks import read_only, small_disk
from helpers import run_module, run_train, tiny_train_config
from PIL import Image
from test_evaluate import make_bundle, write_faces

from facetrain.model.files import read_bundle_meta


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process command creates its own Accelerator, as a fresh process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def one_line_error(proc, *fragments: str) -> str:
    """The command failed with exit 2 and one `facetrain: error:` line holding every fragment; no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err + proc.stdout and err.startswith("facetrain: error: "), err[-3000:]
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def no_tmp(*folders: Path) -> None:
    left = [p for f in folders for p in Path(f).rglob("*.tmp")]
    assert not left, left


# ------------------------------------------------------------------------------------------------------ pack


def faces_folder(root: Path, identities: int = 4, per_identity: int = 12) -> Path:
    for k in range(identities):
        (root / f"id_{k}").mkdir(parents=True)
        for i in range(per_identity):
            Image.new("RGB", (24, 24), (20 * k, 5 * i, 90)).save(root / f"id_{k}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_pack_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """48 images of 3 x 112 x 112 = 1.7 MiB onto a 1 MiB disk: today the memory map dies with SIGBUS (no
    message, the reserved .tmp left); the space is reserved up front now. A real process: a SIGBUS would take
    pytest with it."""
    src = faces_folder(tmp_path / "src")
    with small_disk(tmp_path / "disk", 1024) as disk:
        proc = run_module("facetrain.pack", ["--input", src, "--output", disk / "faces.ftpack", "--size", "112",
                                             "--no-progress"], check=False, subprocess_only=True)
        one_line_error(proc, "faces.ftpack.tmp", "No space left on device", "MiB needed", "free disk space")
        assert not (disk / "faces.ftpack").exists()
        no_tmp(disk)


def test_pack_reserves_its_space_before_writing(tmp_path, monkeypatch):
    """The same refusal where no disk can be mounted: the reservation (posix_fallocate) says ENOSPC."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    src, out = faces_folder(tmp_path / "src"), tmp_path / "out" / "faces.ftpack"
    proc = run_module("facetrain.pack", ["--input", src, "--output", out, "--size", "32", "--no-progress"],
                      check=False)
    one_line_error(proc, "No space left on device")
    assert not out.exists()
    no_tmp(out.parent)


def undecodable_folder(root: Path) -> Path:
    """Identities whose folder names are Latin-1 bytes (not UTF-8), as a Windows share mounted on Linux has."""
    faces_folder(root, identities=8, per_identity=4)
    os.rename(root / "id_1", os.path.join(os.fsencode(root), b"caf\xe9"))
    os.rename(root / "id_2", os.path.join(os.fsencode(root), b"na\xefve"))
    return root


def test_pack_and_train_on_names_that_are_not_utf8(tmp_path):
    src = undecodable_folder(tmp_path / "src")
    proc = run_module("facetrain.pack", ["--input", src, "--output", tmp_path / "f.ftpack", "--size", "32",
                                         "--no-progress"], check=False)
    one_line_error(proc, "2 folder or file name(s)", "not valid UTF-8 (caf\\xe9, na\\xefve)", "rename them")
    no_tmp(tmp_path)
    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(src), "val_identities": 2},
                                       "train": {"output_dir": str(tmp_path / "run")}})
    proc = run_train(["--config", cfg], check=False)
    one_line_error(proc, "data.root", "not valid UTF-8", r"caf\xe9")
    # align refuses them before aligning anything: training would refuse its crops
    proc = run_module("facetrain.align", ["--input", src, "--output", tmp_path / "aligned"], check=False)
    one_line_error(proc, "--input", "not valid UTF-8", r"caf\xe9, na\xefve")
    assert not (tmp_path / "aligned").exists()


# ------------------------------------------------------------------------------------------------------ eval


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    # 5 people x 5 images: 200 impostor pairs, FAR 1e-2 resolvable
    return write_faces(tmp_path_factory.mktemp("faces") / "heldout", [5] * 5)


def eval_args(bundle: Path, data: Path, *extra) -> list:
    return ["--model", bundle, "--data", data, "--num-workers", "0", "--no-plots", "--target-far", "0.1", *extra]


def assert_results_kept(out: Path, bundle: Path, before: bytes) -> None:
    """metrics.json holds the evaluation and says the threshold was not written; the bundle is unchanged."""
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["auc"] is not None and report["calibration"]["threshold"] is not None
    assert report["calibration"]["written_to_bundle"] is False and "NOT written" in report["calibration"]["note"]
    assert (bundle / "facetrain.json").read_bytes() == before
    assert json.loads((out / "args.json").read_text())["target_far"] == 0.1


def test_eval_with_a_read_only_model_keeps_its_results(tmp_path, heldout):
    """Today: the whole evaluation, then a traceback at the threshold write, and no metrics.json."""
    bundle = make_bundle(tmp_path / "models" / "bundle")
    before = (bundle / "facetrain.json").read_bytes()
    out = tmp_path / "eval"
    with read_only(tmp_path / "models"):
        proc = run_module("facetrain.eval", eval_args(bundle, heldout, "--output", out), check=False)
        one_line_error(proc, str(bundle / "facetrain.json"), "Read-only file system",
                       f"figures were written to {out / 'metrics.json'}", "--no-calibrate")
        assert_results_kept(out, bundle, before)
        # without --output the report would go next to the model: refused before anything is embedded
        proc = run_module("facetrain.eval", eval_args(bundle, heldout), check=False)
        one_line_error(proc, "--output: cannot create", "Read-only file system", "--output DIR")
        assert "ROC AUC" not in proc.stdout


def test_eval_threshold_write_refused_keeps_the_results(tmp_path, heldout, monkeypatch):
    """The same where nothing can be mounted: the write of facetrain.json raises EROFS."""
    bundle = make_bundle(tmp_path / "bundle")
    before = (bundle / "facetrain.json").read_bytes()
    write_text = Path.write_text

    def refused(self, *args, **kw):
        if self.name.startswith("facetrain.json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return write_text(self, *args, **kw)

    monkeypatch.setattr(Path, "write_text", refused)
    out = tmp_path / "eval"
    proc = run_module("facetrain.eval", eval_args(bundle, heldout, "--output", out), check=False)
    one_line_error(proc, "Read-only file system", "figures were written to")
    assert_results_kept(out, bundle, before)
    no_tmp(bundle, out)
    monkeypatch.undo()
    assert read_bundle_meta(bundle)["threshold"] is None


def test_eval_onto_a_full_disk_is_one_line(tmp_path, heldout):
    bundle = make_bundle(tmp_path / "bundle")
    with small_disk(tmp_path / "disk", 8) as disk:  # the plots do not fit in 8 KiB
        proc = run_module("facetrain.eval", ["--model", bundle, "--data", heldout, "--num-workers", "0",
                                             "--output", disk / "eval", "--target-far", "0.1"], check=False)
        one_line_error(proc, "No space left on device")
        no_tmp(disk)
    assert read_bundle_meta(bundle)["threshold"] is None  # nothing half-done: the results come first


# ---------------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("export") / "bundle")


def test_export_onto_a_folder_is_one_line(bundle, tmp_path):
    pytest.importorskip("onnx")
    folder = tmp_path / "verifier.onnx"
    folder.mkdir()
    proc = run_module("facetrain.export", ["--model", bundle, "--output", folder], check=False)
    one_line_error(proc, f"--output: {folder} is a folder", str(folder / "model.onnx"))
    no_tmp(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["read_only", "full"])
def test_export_onto_a_read_only_or_full_disk_is_one_line(bundle, tmp_path, disk):
    pytest.importorskip("onnx")
    where = tmp_path / "disk"
    if disk == "read_only":
        where.mkdir()
        mount, reason = read_only(where), "Read-only file system"
    else:
        mount, reason = small_disk(where, 16), "No space left on device"  # the model is ~100 KiB
    with mount:
        proc = run_module("facetrain.export", ["--model", bundle, "--output", where / "v.onnx"], check=False)
        one_line_error(proc, str(where / "v.onnx"), reason, "--output")
        no_tmp(where)
        assert not (where / "v.onnx").exists()


# ----------------------------------------------------------------------------------------------------- links


def test_align_follows_linked_identity_folders_once(tmp_path):
    """Training's folder scan follows an identity folder that is a symbolic link; align skipped it silently,
    so its photos were never aligned. A link back to an ancestor is no loop."""
    from facetrain.alignment.folder import scan_input

    raw, elsewhere = tmp_path / "raw", tmp_path / "elsewhere" / "b"
    (raw / "a").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(raw / "a" / "1.jpg")
    Image.new("RGB", (8, 8)).save(elsewhere / "2.jpg")
    (raw / "b").symlink_to(elsewhere, target_is_directory=True)
    (raw / "a" / "up").symlink_to(raw, target_is_directory=True)
    images, others = scan_input(raw, tmp_path / "aligned")
    assert images == [os.path.join("a", "1.jpg"), os.path.join("b", "2.jpg")] and others == []


def test_a_threshold_written_through_a_link_reaches_the_real_file(tmp_path):
    """A bundle whose facetrain.json is a link (models kept in one store, linked into runs): the calibrated
    threshold goes into the file the link names; replacing the link by a file left the store unchanged."""
    from facetrain.model.files import update_bundle_meta

    bundle = make_bundle(tmp_path / "bundle")
    real = tmp_path / "store" / "facetrain.json"
    real.parent.mkdir()
    (bundle / "facetrain.json").rename(real)
    (bundle / "facetrain.json").symlink_to(real)
    update_bundle_meta(bundle, threshold=0.5, threshold_far=0.01)
    assert (bundle / "facetrain.json").is_symlink() and json.loads(real.read_text())["threshold"] == 0.5
    no_tmp(bundle, real.parent)


def test_align_crop_names_never_collide():
    """a.jpg and a.png share a stem, so their crops are a.jpg.png and a.png.png; a photo called a.jpg.png
    then wanted the first one's name, and one crop silently overwrote the other."""
    from facetrain.alignment.folder import output_names

    names = output_names(["x/a.jpg", "x/a.png", "x/a.jpg.png", "y/a.jpg"])
    assert len(set(names.values())) == 4, names
    assert names["x/a.jpg.png"] == "x/a.jpg.png" and names["x/a.png"] == "x/a.png.png" and names["y/a.jpg"] == "y/a.png"


# ----------------------------------------------------------------------------------------------- any command


def test_a_refused_write_no_command_expected_is_one_line(tmp_path):
    """train into an existing folder on a read-only disk: its first write (config.yaml) was a traceback;
    `cli.run_cli` turns any write the disk refuses into one line naming the file."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = tiny_train_config(tmp_path, {"train": {"output_dir": str(out), "max_steps": 2}})
    with read_only(out):
        proc = run_train(["--config", cfg], check=False)
        one_line_error(proc, str(out / "config.yaml"), "Read-only file system", "--debug")
