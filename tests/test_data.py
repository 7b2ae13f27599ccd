"""Data sources, identity split, image modes and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facetrain.config.schema import AugmentConfig, DataConfig
from facetrain.data.dataset import FaceDataset
from facetrain.data.faceset import build_faceset, folder_faceset, split_identities, synthetic_faceset
from facetrain.data.images import Preprocess, to_rgb
from facetrain.data.synthetic import render
from facetrain.data.transforms import ToModelInput, collate, eval_transform, train_transform
from facetrain.errors import UserError


def test_split_is_by_identity_seeded_and_disjoint():
    faces = synthetic_faceset(50, 4, seed=0)
    cfg = DataConfig(val_fraction=0.2, split_seed=3)
    train, val = split_identities(faces, cfg)
    assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
    again = split_identities(faces, cfg)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again, strict=True))
    other = split_identities(faces, DataConfig(val_fraction=0.2, split_seed=4))
    assert not np.array_equal(other[1], val)
    # no image of a validation identity is ever in the training subset
    train_idx, train_labels = faces.subset(train)
    val_idx, _ = faces.subset(val)
    assert not set(faces.labels[train_idx]) & set(faces.labels[val_idx])
    assert sorted(set(train_labels)) == list(range(40))  # remapped 0..P-1 (ArcFace needs contiguous classes)
    assert split_identities(faces, DataConfig(val_identities=7))[1].size == 7


def test_too_few_identities_to_split():
    with pytest.raises(UserError, match="only 3 identities"):
        split_identities(synthetic_faceset(3, 4, 0), DataConfig(val_fraction=0.5))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_mode_becomes_8bit_rgb(mode):
    base = render(0, 1, 2, 40)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)  # uint16 -> mode I;16
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (40, 40)
    if mode == "I;16":  # 16-bit is scaled down, not clipped to white
        assert abs(np.asarray(out).mean() - np.asarray(base.convert("L")).mean()) < 2


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_gray_images_stay_gray_until_the_device_and_match_the_rgb_path(mode):
    """The gray fast path (augment one channel, repeat it on the device) gives the model what converting to
    RGB first gives: the same evaluation input, and the same training augmentation for the same seed."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (112, 92), dtype=np.uint8)
    img = Image.fromarray(pixels) if mode == "L" else Image.fromarray(pixels.astype(np.uint16) * 257)  # I;16
    gray, rgb = to_rgb(img, keep_gray=True), to_rgb(img)
    assert gray.mode == "L" and rgb.mode == "RGB"
    assert to_rgb(Image.new("RGB", (4, 4)), keep_gray=True).mode == "RGB"  # colour stays colour
    pre = Preprocess(64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # per-channel statistics differ
    to_input = ToModelInput(pre, "cpu")
    fast, slow = eval_transform(pre)(gray), eval_transform(pre)(rgb)
    assert fast.shape == (1, 64, 64) and slow.shape == (3, 64, 64) and fast.dtype == torch.uint8
    assert torch.equal(to_input(fast[None]), to_input(slow[None]))
    aug = AugmentConfig(hflip=0.5, rotation=15, brightness=0.3, contrast=0.3, saturation=0.2, hue=0.1,
                        crop_scale_min=0.8, grayscale=0.5)
    for seed in range(5):
        torch.manual_seed(seed)
        fast = to_input(train_transform(pre, aug)(gray)[None])
        torch.manual_seed(seed)
        slow = to_input(train_transform(pre, aug)(rgb)[None])
        # hue shifts of a gray RGB image round-trip through HSV: at most 1/255 off, divided by std
        assert fast.shape == slow.shape == (1, 3, 64, 64)
        assert (fast - slow).abs().max() <= 1 / 255 / 0.224 + 1e-6


def test_model_input_is_torchvisions_normalisation_of_the_uint8_batch():
    """uint8 batches normalised on the device equal torchvision's ToTensor + Normalize per image (to float
    rounding), in the asked memory layout; a batch mixing gray and colour images is collated as 3 channels."""
    from torchvision import transforms as T

    pre = Preprocess(16, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))]
    batch = collate([(eval_transform(pre)(im), k, k) for k, im in enumerate(images)])
    assert batch[0].shape == (2, 3, 16, 16) and batch[0].dtype == torch.uint8 and batch[1].tolist() == [0, 1]
    reference = torch.stack([T.Compose([T.ToTensor(), T.Normalize(pre.mean, pre.std)])(im.convert("RGB"))
                             for im in images])
    for channels_last in (False, True):
        got = ToModelInput(pre, "cpu", channels_last)(batch[0])
        assert got.dtype == torch.float32 and got.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.allclose(got, reference, atol=1e-5, rtol=0)
    gray_only = collate([eval_transform(pre)(images[1])] * 2)  # bare tensors, as embedding batches are
    assert gray_only.shape == (2, 1, 16, 16)
    assert torch.allclose(ToModelInput(pre, "cpu")(gray_only)[1], reference[1], atol=1e-5, rtol=0)


def test_folder_source_layout_and_gray_images(tmp_path):
    for k in range(3):
        (tmp_path / f"id{k}").mkdir()
        for i in range(2):
            render(0, k, i, 24).convert("L").save(tmp_path / f"id{k}" / f"{i}.png")
    (tmp_path / "id2" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    faces = folder_faceset(str(tmp_path))
    assert faces.names == ["id0", "id1", "id2"] and len(faces) == 6
    ds = FaceDataset(faces, np.arange(6), faces.labels, eval_transform(Preprocess(32, [0.5] * 3, [0.5] * 3)))
    image, label, pos = ds[5]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8 and label == 2 and pos == 5  # kept gray


def test_synthetic_is_deterministic_and_identities_differ():
    a = np.asarray(render(5, 3, 7), dtype=np.float32)
    assert np.array_equal(a, np.asarray(render(5, 3, 7), dtype=np.float32))
    assert not np.array_equal(a, np.asarray(render(6, 3, 7), dtype=np.float32))
    faces = build_faceset(DataConfig(synthetic_identities=5, synthetic_images_per_identity=3))
    assert len(faces) == 15 and faces.loader(4).size == (96, 96)


def test_bad_image_during_training_follows_policy(tmp_path):
    for k in range(2):
        (tmp_path / f"id{k}").mkdir()
        for i in range(3):
            render(0, k, i, 24).save(tmp_path / f"id{k}" / f"{i}.png")
    faces = folder_faceset(str(tmp_path))
    (tmp_path / "id0" / "1.png").write_bytes(b"\x89PNG broken")  # changed on disk after the scan
    pre = eval_transform(Preprocess(16, [0.5] * 3, [0.5] * 3))
    strict = FaceDataset(faces, np.arange(6), faces.labels, pre, "error")
    with pytest.raises(UserError, match=r"id0/1.png: cannot decode image"):
        strict[1]
    lenient = FaceDataset(faces, np.arange(6), faces.labels, pre, "skip")
    image, label, _ = lenient[1]  # another image of the same identity stands in
    assert label == 0 and image.shape == (3, 16, 16)
