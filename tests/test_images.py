"""One image loader for every path: a phone JPEG stored sideways (EXIF Orientation=6) is used upright by training
from a folder, training from a Hugging Face imagefolder, validation, eval, verify and identify."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facetrain.config.schema import DataConfig, ModelConfig
from facetrain.data.dataset import FaceDataset
from facetrain.data.faceset import folder_faceset, hf_faceset
from facetrain.data.images import Preprocess, load_image
from facetrain.data.transforms import eval_transform

ORIENTATION = 0x0112


def upright_face() -> Image.Image:
    """An asymmetric 48 x 80 (w x h) picture: a rotation or a mirror of it looks different."""
    yy, xx = np.mgrid[0:80, 0:48]
    rgb = np.stack([xx * 5, yy * 3, (xx + yy) % 64 * 4], axis=-1).clip(0, 255).astype(np.uint8)
    rgb[5:20, 5:15] = (255, 0, 0)  # a mark near the top-left corner
    return Image.fromarray(rgb, "RGB")


@pytest.fixture
def sideways(tmp_path):
    """root/<person>/<image>.jpg, each stored rotated with Orientation=6 (display: turn 90 degrees clockwise)."""
    root = tmp_path / "faces"
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        for k in range(2):
            stored = upright_face().rotate(90, expand=True)  # what the camera wrote
            exif = Image.Exif()
            exif[ORIENTATION] = 6
            stored.save(root / person / f"{k}.jpg", quality=95, exif=exif.tobytes())
    return root


def test_every_path_sees_the_photo_upright(sideways, tmp_path):
    path = sideways / "a" / "0.jpg"
    with Image.open(path) as raw:
        assert raw.size == (80, 48) and raw.getexif()[ORIENTATION] == 6  # stored sideways
    upright = load_image(path)
    assert upright.size == (48, 80)
    # the decoded pixels are the upright picture (JPEG-close), not a turned or mirrored one
    diff = np.abs(np.asarray(upright, dtype=np.int16) - np.asarray(upright_face(), dtype=np.int16)).mean()
    assert diff < 4, diff

    pre = Preprocess(32, [0.5] * 3, [0.5] * 3)
    transform = eval_transform(pre)
    want = transform(upright)
    # training and validation from a folder
    folder = folder_faceset(str(sideways))
    i = folder.paths.index(str(path))
    got_folder = FaceDataset(folder, np.arange(len(folder)), folder.labels, transform)[i][0]
    # training from a Hugging Face imagefolder (datasets applies the orientation itself)
    hf = hf_faceset(DataConfig(source="hf", root=str(sideways)))
    got_hf = [FaceDataset(hf, np.arange(len(hf)), hf.labels, transform)[j][0] for j in range(len(hf))]
    # eval, verify and identify
    from facetrain.evaluation.embedding import ImageFiles

    got_eval = ImageFiles([str(path)], transform)[0][0]
    assert torch.equal(got_folder, want) and torch.equal(got_eval, want)
    assert any(torch.equal(g, want) for g in got_hf)


def test_verify_scores_a_sideways_jpeg_as_its_upright_copy(sideways, tmp_path):
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import create_model
    from facetrain.verify import verify

    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    torch.manual_seed(0)
    write_bundle(bundle, create_model(mcfg), mcfg, Preprocess(32, [0.5] * 3, [0.5] * 3))
    path = sideways / "a" / "0.jpg"
    copy = tmp_path / "upright.png"
    load_image(path).save(copy)  # lossless: the same pixels, no EXIF
    turned = tmp_path / "turned.png"
    load_image(path).rotate(90, expand=True).save(turned)  # what a loader that ignores EXIF would see
    same = verify(str(bundle), str(path), str(copy), threshold=0.5, mixed_precision="no")
    assert same["similarity"] == pytest.approx(1.0, abs=1e-5)
    other = verify(str(bundle), str(turned), str(copy), threshold=0.5, mixed_precision="no")
    assert other["similarity"] < same["similarity"] - 1e-4
