"""Packed face sets (facetrain/pack.py, data/packer.py, data/pack_format.py): exact pixels, the folder's identities,
bad packs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_module, run_train, tiny_train_config
from PIL import Image

from facetrain.config.schema import DataConfig
from facetrain.data.dataset import FaceDataset, PackedBatches
from facetrain.data.device_augment import DeviceAugment, training_input
from facetrain.data.faceset import build_faceset, folder_faceset, packed_faceset
from facetrain.data.images import Preprocess
from facetrain.data.pack_format import MAGIC, _layout, read_header
from facetrain.data.packer import pack_folder
from facetrain.data.transforms import ToModelInput, eval_transform
from facetrain.errors import UserError
from facetrain.pack import main as pack_main


def write_folder(root: Path, identities: int = 5, per_identity: int = 4, size: int = 20, gray: bool = False) -> None:
    """Random-noise PNGs (lossless: any resampling or colour change would show), `size` px square."""
    rng = np.random.default_rng(0)
    for k in range(identities):
        folder = root / f"id_{k:02d}"
        folder.mkdir(parents=True)
        for i in range(per_identity):
            shape = (size, size) if gray else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "id_00" / "notes.txt").write_text("not an image")  # ignored, as by the folder source


def pixels(path: Path, gray: bool) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    return arr[None] if gray else arr.transpose(2, 0, 1)


@pytest.mark.parametrize("gray", [False, True])
def test_pack_round_trips_pixels_exactly(tmp_path, gray):
    src = tmp_path / "faces"
    write_folder(src, gray=gray)
    out = tmp_path / "faces.ftpack"
    proc = run_module("facetrain.pack", ["--input", src, "--output", out, "--size", "20"])  # the real CLI
    assert "packed 20 images of 5 identities" in proc.stdout and "data pre-flight" in proc.stdout
    assert (tmp_path / "faces.ftpack.preflight.txt").is_file()
    header = read_header(out)
    assert header.channels == (1 if gray else 3) and header.size == 20 and header.count == 20
    assert header.alignment is None  # not a facetrain.align folder
    pack = packed_faceset(out, 20)
    folder = folder_faceset(str(src))
    assert pack.names == folder.names and (pack.labels == folder.labels).all()  # the same identity split
    images = pack.loader.batch(np.arange(20))
    for i, path in enumerate(folder.paths):
        np.testing.assert_array_equal(images[i], pixels(Path(path), gray), err_msg=path)
        assert pack.keys[i].endswith(Path(path).relative_to(src).as_posix())
    # at another size: exactly the pixels validation makes from the file (data.eval_transform)
    pack_folder(src, tmp_path / "small.ftpack", 12, progress=False)
    small = packed_faceset(tmp_path / "small.ftpack", 12)
    transform = eval_transform(Preprocess(12, [0.5] * 3, [0.5] * 3))
    via_folder = FaceDataset(folder, np.arange(20), folder.labels, transform)
    via_pack = FaceDataset(small, np.arange(20), small.labels, transform)
    for i in range(20):
        torch.testing.assert_close(via_pack[i][0], via_folder[i][0], atol=0, rtol=0)
    # the training batches: one gather, with positions, labels and seeds
    batch = PackedBatches(small.loader, np.arange(20), small.labels).__getitems__([(3, 11), (17, 5)])
    torch.testing.assert_close(batch[0], torch.stack([via_pack[3][0], via_pack[17][0]]))
    assert batch[1].tolist() == [int(small.labels[3]), int(small.labels[17])]
    assert batch[2].tolist() == [3, 17] and batch[3].tolist() == [11, 5]


def test_pack_decodes_in_bounded_windows_and_refuses_a_file_that_changed(tmp_path, monkeypatch):
    """More images than one window of pending decodes (64 per thread): every slot is filled, in order. A file
    that decodes to another shape than the pre-flight found (replaced while packing) is a one-line error and
    leaves no pack behind."""
    import facetrain.data.packer

    src = tmp_path / "faces"
    write_folder(src, identities=5, per_identity=14, gray=True)  # 70 images: two windows with 1 thread
    out = pack_folder(src, tmp_path / "w.ftpack", 20, threads=1, progress=False)
    images, folder = packed_faceset(out, 20).loader.batch(np.arange(70)), folder_faceset(str(src))
    for i, path in enumerate(folder.paths):
        np.testing.assert_array_equal(images[i], pixels(Path(path), True), err_msg=path)
    real = facetrain.data.packer.load_image

    def replaced(path, keep_gray=False, **kw):  # id_03/5.png became a colour image after the pre-flight
        image = real(path, keep_gray=keep_gray, **kw)
        return image.convert("RGB") if str(path).endswith("id_03/5.png") else image

    monkeypatch.setattr(facetrain.data.packer, "load_image", replaced)
    with pytest.raises(UserError, match=r"id_03/5.png: decodes to 3 x 20 x 20, not 1 x 20 x 20 like the "
                                        r"pre-flight found; it changed while packing: pack again"):
        pack_folder(src, tmp_path / "x.ftpack", 20, threads=2, progress=False)
    assert not (tmp_path / "x.ftpack").exists() and not (tmp_path / "x.ftpack.tmp").exists()


def test_pack_preflight_refuses_or_skips_bad_files(tmp_path):
    src = tmp_path / "faces"
    write_folder(src)
    whole = (src / "id_01" / "0.png").read_bytes()
    (src / "id_01" / "9.png").write_bytes(whole[: len(whole) // 2])  # a truncated download
    refused = run_module("facetrain.pack", ["--input", src, "--output", tmp_path / "a.ftpack"], check=False)
    assert refused.returncode == 2 and not (tmp_path / "a.ftpack").exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "9.png" in lines[0] and "--bad-images: skip" in lines[0], refused.stderr
    pack_folder(src, tmp_path / "b.ftpack", 20, bad_images="skip", progress=False)
    header = read_header(tmp_path / "b.ftpack")
    assert header.count == 20 and "id_01/9.png" not in header.files and header.preflight["corrupt"] == 1
    with pytest.raises(UserError, match="--output: .*b.ftpack exists; add --force"):
        pack_main(["--input", str(src), "--output", str(tmp_path / "b.ftpack")])
    with pytest.raises(UserError, match="--input: folder not found"):
        pack_main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "c.ftpack")])
    with pytest.raises(UserError, match="--size: must be > 0"):
        pack_main(["--input", str(src), "--output", str(tmp_path / "c.ftpack"), "--size", "0"])


def _rewrite(path: Path, out: Path, **changes) -> Path:
    """A copy of pack `path` with header fields changed (the pixels as they were)."""
    header = read_header(path)
    data = path.read_bytes()[header.data_offset:]
    for key, value in changes.items():
        setattr(header, key, value)
    out.write_bytes(_layout(header).ljust(header.data_offset, b"\x00") + data)
    return out


def test_bad_packs_are_one_line_errors(tmp_path):
    src = tmp_path / "faces"
    write_folder(src)
    good = pack_folder(src, tmp_path / "good.ftpack", 20, progress=False)
    raw = good.read_bytes()

    (tmp_path / "cut.ftpack").write_bytes(raw[: len(raw) - 1000])
    # the repack command rewrites the damaged pack in place (--force: it exists), from the absolute source
    with pytest.raises(UserError, match=r"cut.ftpack is truncated: .* its header promises .*repack it \(python -m "
                                        rf"facetrain.pack --input {src.resolve()} --output .*cut.ftpack --size 20 "
                                        r"--force\)$"):
        read_header(tmp_path / "cut.ftpack")
    (tmp_path / "head.ftpack").write_bytes(raw[:100])
    with pytest.raises(UserError, match="is truncated: 100 bytes, shorter than its own header"):
        read_header(tmp_path / "head.ftpack")
    with pytest.raises(UserError, match=r"is not a facetrain pack \(it starts with b'\\x89PNG"):
        read_header(src / "id_00" / "0.png")
    (tmp_path / "zeros.npy").write_bytes(b"\x93NUMPY" + b"\x00" * 200)
    with pytest.raises(UserError, match="is not a facetrain pack"):
        read_header(tmp_path / "zeros.npy")
    (tmp_path / "broken.ftpack").write_bytes(MAGIC + (20).to_bytes(8, "little") + b"{not json" + b" " * 11)
    with pytest.raises(UserError, match="has a damaged header"):
        read_header(tmp_path / "broken.ftpack")
    with pytest.raises(UserError, match="is a folder, not a pack file: train on it with data.source folder"):
        read_header(src)
    with pytest.raises(UserError, match="pack file not found"):
        read_header(tmp_path / "missing.ftpack")
    with pytest.raises(UserError, match=r"data.image_size: .* holds 20 px images but data.image_size is 32: set "
                                        r"--data.image_size 20, or pack the source at 32 px \(python -m "
                                        r"facetrain.pack --input .*faces --output .*good_32.ftpack --size 32\)"):
        packed_faceset(good, 32)  # a new pack beside the good one, not over it
    # a header that is valid JSON but not an object, or whose images would start inside it
    for name, body in (("list", b"[]"), ("null", b"null")):
        (tmp_path / f"{name}.ftpack").write_bytes(MAGIC + len(body).to_bytes(8, "little") + body)
        with pytest.raises(UserError, match=r"has a damaged header \(ValueError: the header is a JSON"):
            read_header(tmp_path / f"{name}.ftpack")
    length = int.from_bytes(raw[8:16], "little")
    meta = json.loads(raw[16:16 + length])
    body = json.dumps({**meta, "data_offset": 16}).encode()
    (tmp_path / "inside.ftpack").write_bytes(MAGIC + len(body).to_bytes(8, "little") + body + raw[16 + length:])
    with pytest.raises(UserError, match=r"has an impossible header .* at byte 16\); repack it .* --force\)$"):
        read_header(tmp_path / "inside.ftpack")

    header = read_header(good)
    with pytest.raises(UserError, match="holds 20 images but 19 labels"):
        read_header(_rewrite(good, tmp_path / "l1.ftpack", labels=header.labels[:-1]))
    with pytest.raises(UserError, match=r"has label 7, but the pack names 5 identities"):
        read_header(_rewrite(good, tmp_path / "l2.ftpack", labels=[7] + header.labels[1:]))
    swapped = header.labels[:]
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    with pytest.raises(UserError, match=r"image 0 \(id_00/0.png\) is labelled 'id_04', not the identity of its "
                                        r"folder 'id_00'; the pack is inconsistent"):
        read_header(_rewrite(good, tmp_path / "l3.ftpack", labels=swapped))
    with pytest.raises(UserError, match=r"identity 'id_99' has no image; the pack is inconsistent"):
        read_header(_rewrite(good, tmp_path / "l4.ftpack", identities=header.identities + ["id_99"]))
    with pytest.raises(UserError, match="is pack format version 9; this facetrain reads version 1"):
        read_header(_rewrite(good, tmp_path / "v9.ftpack", version=9))
    # what a training run prints: one line, exit code 2, before any model is built
    cfg = tiny_train_config(tmp_path, {"data": {"source": "packed", "root": str(tmp_path / "cut.ftpack"),
                                                "image_size": 20}})
    proc = run_train(["--config", cfg, "--train.output_dir", tmp_path / "run"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cut.ftpack is truncated" in lines[0], proc.stderr
    # a pack given to the folder source (the source flag forgotten): named as a pack, not "folder not found"
    proc = run_train(["--config", tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(good)}},
                                                    name="folder.yaml"),
                      "--train.output_dir", tmp_path / "run2"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "good.ftpack is a pack file (python -m facetrain.pack), not a folder: train on it with data.source " \
           "packed" in lines[0], lines[0]


def test_build_faceset_reads_packs(tmp_path):
    from facetrain.alignment.recipe import MARKER_FILE, MARKER_FORMAT, recipe_of_folder

    src = tmp_path / "faces"
    write_folder(src, gray=True)
    (src / MARKER_FILE).write_text(json.dumps({"format": MARKER_FORMAT, "recipe": {}}))  # made by facetrain.align
    pack = pack_folder(src, tmp_path / "g.ftpack", 16, progress=False, alignment=recipe_of_folder(src))
    assert read_header(pack).alignment == recipe_of_folder(src) is not None  # the bundle can record it
    assert packed_faceset(pack, 16).loader.alignment == recipe_of_folder(src)
    faces = build_faceset(DataConfig(source="packed", root=str(pack), image_size=16))
    assert len(faces) == 20 and faces.paths is None  # no pre-flight at training time: the pack had one
    image = faces.loader(5)
    assert image.mode == "L" and image.size == (16, 16)
    assert json.loads(Path(str(pack) + ".preflight.json").read_text())["counts"]["images"] == 20
    # the trainer's choice of data path: a pack with data.augment.on_device gets batches + device augmentation
    pre = Preprocess(16, [0.5] * 3, [0.5] * 3)
    cfg = DataConfig(source="packed", root=str(pack), image_size=16)
    dataset, collate_fn, to_input = training_input(faces, np.arange(20), faces.labels, pre, cfg, "cpu", False)
    assert isinstance(dataset, PackedBatches) and isinstance(to_input, DeviceAugment)
    images, labels, positions, seeds = collate_fn(dataset.__getitems__([(0, 1), (4, 2), (8, 3), (12, 4)]))
    assert to_input(images, seeds).shape == (4, 3, 16, 16)
    cfg.augment.on_device = False  # PIL augmentation on the pack's images, in the workers
    dataset, collate_fn, to_input = training_input(faces, np.arange(20), faces.labels, pre, cfg, "cpu", False)
    assert isinstance(dataset, FaceDataset) and isinstance(to_input, ToModelInput)
    assert to_input(collate_fn([dataset[(0, 1)], dataset[(4, 2)]])[0]).shape == (2, 3, 16, 16)
