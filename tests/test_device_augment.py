"""Batched augmentation on the device (facetrain/data/device_augment.py): parameter distributions, the geometry and
colour operations against torchvision's definitions, and reproducibility from the per-slot seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from facetrain.config.schema import AugmentConfig
from facetrain.data.device_augment import CROP_RATIO, DeviceAugment, affine_grid, draw_params, uniform
from facetrain.data.images import Preprocess

N = 20_000
SEEDS = np.random.default_rng(0).integers(0, 2**31 - 1, size=N)  # like the sampler's per-slot seeds
IDENTITY = Preprocess(16, [0.0] * 3, [1.0] * 3)  # model input = pixel / 255: easy to compare


def within(rate: float, p: float, n: int = N) -> bool:
    return abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_hash_uniforms_are_uniform_and_independent():
    u, v = uniform(SEEDS, 0), uniform(SEEDS, 1)
    assert 0 <= u.min() and u.max() < 1
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 0.9 * N / 10
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.03
    assert abs(np.corrcoef(u, uniform(SEEDS + 1, 0))[0, 1]) < 0.03  # neighbouring seeds: unrelated numbers
    np.testing.assert_array_equal(u, uniform(SEEDS, 0))  # a pure function of (seed, stream)


def test_parameters_follow_the_configured_distributions():
    aug = AugmentConfig(hflip=0.3, rotation=15.0, crop_scale_min=0.6, crop_scale_max=0.95, brightness=0.2,
                        contrast=0.4, saturation=0.1, hue=0.1, grayscale=0.25)
    p = draw_params(SEEDS, aug)
    assert within(p.flip.mean(), 0.3) and within(p.gray.mean(), 0.25)
    # rotation uniform in [-15, 15]
    assert -15 <= p.angle.min() < -14.9 and 14.9 < p.angle.max() <= 15
    counts = np.histogram(p.angle, bins=10, range=(-15, 15))[0]
    assert counts.min() > 0.9 * N / 10 and counts.max() < 1.1 * N / 10
    # random resized crop: scale and ratio within their ranges, the window inside the image
    fitted = p.scale < 1.0
    assert fitted.mean() > 0.99  # 10 tries: almost every sample finds a window that fits
    assert 0.6 <= p.scale[fitted].min() and p.scale.max() <= 0.95 + 1e-12
    assert CROP_RATIO[0] <= p.ratio[fitted].min() and p.ratio[fitted].max() <= CROP_RATIO[1]
    half_w, half_h = np.sqrt(p.scale * p.ratio), np.sqrt(p.scale / p.ratio)
    assert (np.abs(p.center[:, 0]) + half_w <= 1 + 1e-9).all() and (np.abs(p.center[:, 1]) + half_h <= 1 + 1e-9).all()
    # the same accepted-scale / log-ratio distribution as torchvision's RandomResizedCrop on a large square image
    torch.manual_seed(0)
    size = 1000
    ref = np.array([RandomResizedCrop.get_params(torch.empty(1, size, size), [0.6, 0.95], list(CROP_RATIO))[2:]
                    for _ in range(4000)], dtype=float)
    ref_scale, ref_ratio = ref[:, 0] * ref[:, 1] / size**2, ref[:, 1] / ref[:, 0]
    assert abs(p.scale.mean() - ref_scale.mean()) < 0.01
    assert abs(np.log(p.ratio).mean() - np.log(ref_ratio).mean()) < 0.02
    assert abs(np.log(p.ratio).std() - np.log(ref_ratio).std()) < 0.02
    # colour jitter factors uniform in [1 - s, 1 + s], hue in [-h, h]
    for values, lo, hi in ((p.brightness, 0.8, 1.2), (p.contrast, 0.6, 1.4), (p.saturation, 0.9, 1.1),
                           (p.hue, -0.1, 0.1)):
        assert lo <= values.min() < lo + 0.01 and hi - 0.01 < values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) < 0.01 * (hi - lo)
    # independent parameters
    assert abs(np.corrcoef(p.angle, p.flip)[0, 1]) < 0.03 and abs(np.corrcoef(p.angle, p.scale)[0, 1]) < 0.03


def test_disabled_and_zero_strengths_are_identities():
    off = draw_params(SEEDS[:100], AugmentConfig(enabled=False))
    zero = draw_params(SEEDS[:100], AugmentConfig(hflip=0, rotation=0, crop_scale_min=1.0, brightness=0,
                                                  contrast=0, saturation=0, hue=0, grayscale=0))
    for p in (off, zero):
        assert not p.flip.any() and not p.gray.any() and (p.angle == 0).all() and (p.scale == 1).all()
        np.testing.assert_allclose(p.theta(), np.tile(np.eye(3)[:2], (100, 1, 1)), atol=1e-12)
        matrix, weight = p.colour()
        np.testing.assert_allclose(matrix, np.tile(np.eye(3), (100, 1, 1)), atol=1e-12)
        np.testing.assert_allclose(weight, 0, atol=1e-12)


def test_affine_grid_equals_torch():
    theta = torch.randn(6, 2, 3)
    torch.testing.assert_close(affine_grid(theta, 20), F.affine_grid(theta, (6, 1, 20, 20), align_corners=False),
                               atol=1e-5, rtol=0)


def _params(n: int, **fields):
    p = draw_params(np.arange(n), AugmentConfig(enabled=False))
    return dataclasses.replace(p, **{k: np.broadcast_to(np.asarray(v, dtype=getattr(p, k).dtype),
                                                        getattr(p, k).shape).copy() for k, v in fields.items()})


def _images(c: int = 3, n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(c))


GEOMETRIC = AugmentConfig()  # flip/rotation/crop on: the warp runs


def test_warp_matches_torchvision_geometry():
    aug = DeviceAugment(GEOMETRIC, IDENTITY, "cpu")
    x = _images()
    out = aug.apply(x, _params(4, flip=True)) * 255
    torch.testing.assert_close(out, torch.flip(x, dims=[3]).float(), atol=1e-3, rtol=0)
    out = aug.apply(x, _params(4, angle=90.0)) * 255  # counter-clockwise, as torchvision's rotate
    torch.testing.assert_close(out, TF.rotate(x, 90).float(), atol=1e-3, rtol=0)
    # any angle: the same source pixels as torchvision's (nearest) rotation, zeros outside
    theta = torch.tensor(_params(4, angle=30.0).theta(), dtype=torch.float32)
    nearest = F.grid_sample(x.float(), affine_grid(theta, 16), mode="nearest", align_corners=False)
    torch.testing.assert_close(nearest, TF.rotate(x, 30).float(), atol=0, rtol=0)
    # a crop window of 8 x 8 pixels (area 1/4, ratio 1) at columns 0-7, rows 6-13, enlarged 2x (bilinear)
    out = aug.apply(x, _params(4, scale=0.25, center=[[-0.5, 0.25]])) * 255
    ref = F.interpolate(x[:, :, 6:14, 0:8].float(), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3, rtol=0)
    # order: crop -> rotation -> flip from the output's side, i.e. flip, rotate, then crop the image
    p = _params(4, flip=True, angle=90.0, scale=0.25, center=[[-0.5, 0.25]])
    step = TF.rotate(torch.flip(x, dims=[3]), 90)[:, :, 6:14, 0:8].float()
    ref = F.interpolate(step, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close((aug.apply(x, p) * 255)[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3, rtol=0)


def test_colour_matches_torchvision_definitions():
    aug = DeviceAugment(AugmentConfig(enabled=False), IDENTITY, "cpu")
    x = _images()
    xf = x.float() / 255
    cases = [(dict(brightness=1.3), TF.adjust_brightness(xf, 1.3)),
             (dict(contrast=0.6), TF.adjust_contrast(xf, 0.6)),
             (dict(saturation=0.5), TF.adjust_saturation(xf, 0.5)),
             (dict(gray=True), TF.rgb_to_grayscale(xf, num_output_channels=3))]
    for fields, ref in cases:
        torch.testing.assert_close(aug.apply(x, _params(4, **fields)), ref, atol=2e-3, rtol=0, msg=str(fields))
    # brightness and contrast in either order, on an image that no step clamps (values 96..160)
    mid = (96 + x.to(torch.int16) // 4).to(torch.uint8)
    midf = mid.float() / 255
    both = aug.apply(mid, _params(4, brightness=0.7, contrast=1.2))
    torch.testing.assert_close(both, TF.adjust_contrast(TF.adjust_brightness(midf, 0.7), 1.2), atol=2e-3, rtol=0)
    torch.testing.assert_close(both, TF.adjust_brightness(TF.adjust_contrast(midf, 1.2), 0.7), atol=2e-3, rtol=0)
    # hue: a rotation of the chroma plane (YIQ) that keeps luma and chroma magnitude
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    before = torch.einsum("kc,bchw->bkhw", yiq, mid.float())
    after = torch.einsum("kc,bchw->bkhw", yiq, aug.apply(mid, _params(4, hue=0.125)) * 255)
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=1e-2, rtol=0)
    angle = torch.atan2(after[:, 2], after[:, 1]) - torch.atan2(before[:, 2], before[:, 1])
    strong = before[:, 1:].norm(dim=1) > 5
    assert torch.allclose(torch.remainder(angle[strong], 2 * np.pi), torch.tensor(np.pi / 4), atol=1e-2)


def test_same_seed_same_output_whatever_the_batch():
    aug_cfg = AugmentConfig(hue=0.1, grayscale=0.2)
    x, seeds = _images(n=12), SEEDS[:12]
    one = DeviceAugment(aug_cfg, IDENTITY, "cpu", cpu_chunk=16)(x, seeds)
    torch.testing.assert_close(DeviceAugment(aug_cfg, IDENTITY, "cpu", cpu_chunk=16)(x, seeds), one, atol=0, rtol=0)
    # a sample's output depends on its image and seed only: other batch order, other chunking, two "ranks"
    order = np.random.default_rng(1).permutation(12)
    again = DeviceAugment(aug_cfg, IDENTITY, "cpu", cpu_chunk=5)(x[order], seeds[order])
    torch.testing.assert_close(again, one[order], atol=1e-6, rtol=0)
    halves = torch.cat([DeviceAugment(aug_cfg, IDENTITY, "cpu")(x[:6], seeds[:6]),
                        DeviceAugment(aug_cfg, IDENTITY, "cpu")(x[6:], seeds[6:])])
    torch.testing.assert_close(halves, one, atol=1e-6, rtol=0)
    other = DeviceAugment(aug_cfg, IDENTITY, "cpu")(x, seeds + 1)
    assert (other - one).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every image changes with its seed


@pytest.mark.parametrize("channels_last", [False, True])
def test_gray_batches_equal_their_rgb_copies(channels_last):
    # a gray pack stays one channel until the normalisation: same input as the image repeated to RGB
    pre = Preprocess(16, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    aug = DeviceAugment(AugmentConfig(hue=0.1, grayscale=0.3), pre, "cpu", channels_last=channels_last)
    gray = _images(c=1, n=8)
    a, b = aug(gray, SEEDS[:8]), aug(gray.expand(-1, 3, -1, -1).contiguous(), SEEDS[:8])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert a.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert a.min() < pre.mean[0] and np.isfinite(a.numpy()).all()
