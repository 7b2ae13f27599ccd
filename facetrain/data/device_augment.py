"""Batched augmentation on the training device: a whole uint8 batch in, the normalised model input out.

`data.source: packed` with `data.augment.on_device: true` (the default for packs) trains on batches that the
DataLoader gathers from the pack's memory map (`packed.PackedBatches`) and this module augments as tensor
operations where the model runs, instead of image by image with PIL in DataLoader workers. The article's
augmentations, with the `data.augment` settings the PIL path uses:

* flip, rotation and random resized crop are ONE affine warp per image, all images in one `grid_sample`
  call (bilinear, zeros outside the image as torchvision's rotation fills): output pixel -> crop -> rotation
  -> flip -> source pixel. The crop draws scale and aspect ratio (0.75-1.33) as torchvision's
  RandomResizedCrop does: 10 tries, the first that fits, else the whole image.
* colour jitter (brightness, contrast, saturation, hue) and random grayscale are one 3 x 3 colour matrix plus
  an offset per image, applied in one batched matrix product (gray packs: one multiply-add), then one clamp
  to [0, 255] and the normalisation to the model's mean/std. Hue is a rotation of the chroma plane in YIQ
  space (as NVIDIA DALI's hue operator; torchvision shifts HSV hue), and saturation blends towards the same
  luma (0.299, 0.587, 0.114) that contrast and grayscale use. Without the clamps that PIL applies after each
  step these four operations commute, so the random order torchvision draws per image has nothing left to
  change. Contrast blends with the mean luma of the source image (torchvision: of the rotated image).

Every random number comes from the image's augmentation seed, which the sampler draws per slot of the epoch's
plan (`sampler.MPerClassBatchSampler.plan`), through a counter-based hash (SplitMix64) on the host: a
sample's augmentation depends on its seed alone, not on the batch it shares, the rank or worker that loads
it, or how many steps ran before, so seeded runs repeat, resumed runs continue exactly, and 2 processes see
what 1 process sees. Only the parameters (17 floats per image) go to the device; nothing comes back (no host
sync). On a CPU the batch is processed in chunks of about CPU_CHUNK_PIXELS output pixels, so that each
chunk's intermediates stay in cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from facetrain.config.schema import AugmentConfig, DataConfig
from facetrain.data.dataset import FaceDataset, PackedBatches, collate_batch
from facetrain.data.images import Preprocess
from facetrain.data.pack_format import PackImages
from facetrain.data.transforms import ToModelInput, collate, train_transform

CROP_RATIO = (0.75, 1.33)  # width / height range of the random resized crop (as transforms.train_transform)
CROP_TRIES = 10  # torchvision's RandomResizedCrop: attempts before it falls back to the whole image
CPU_CHUNK_PIXELS = 200_000  # on a CPU, images per chunk = this / image pixels: intermediates stay in cache
LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ (NTSC). Its first row is LUMA; the I and Q rows sum to 0, so gray stays gray.
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_INV = np.linalg.inv(YIQ)

# Hash streams: one independent uniform number per (seed, stream)
_FLIP, _ANGLE, _CROP_X, _CROP_Y, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY = range(9)
_CROP_SCALE, _CROP_RATIO = 16, 16 + CROP_TRIES


def uniform(seeds: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) float64 per seed for hash stream `stream`: SplitMix64's finaliser on (seed, stream),
    53 bits. A pure function of its inputs (no generator state), vectorised over the batch."""
    z = np.asarray(seeds, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = z + np.uint64((stream + 1) * 0xD1B54A32D192ED03 % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _factor(seeds: np.ndarray, stream: int, strength: float) -> np.ndarray:
    """ColorJitter's factor: uniform in [max(0, 1 - strength), 1 + strength]; 1 when strength is 0."""
    if strength <= 0:
        return np.ones(len(seeds))
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * uniform(seeds, stream)


@dataclass
class AugmentParams:
    """Per-image augmentation parameters of a batch (numpy, one row per seed)."""

    flip: np.ndarray
    """bool: mirrored left-right."""
    angle: np.ndarray
    """Rotation, degrees, counter-clockwise (as torchvision's rotate)."""
    scale: np.ndarray
    """Crop area / image area."""
    ratio: np.ndarray
    """Crop width / crop height."""
    center: np.ndarray
    """(B, 2) crop centre (x, y) in normalised coordinates, [-1, 1] across the image."""
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    """Hue shift, fraction of the colour circle ([-aug.hue, aug.hue])."""
    gray: np.ndarray
    """bool: converted to gray after the jitter."""

    def theta(self) -> np.ndarray:
        """(B, 2, 3) affine maps from output to source normalised coordinates (grid_sample's convention):
        output -> crop window -> rotation -> flip."""
        n = len(self.flip)
        half_w, half_h = np.sqrt(self.scale * self.ratio), np.sqrt(self.scale / self.ratio)
        crop = np.zeros((n, 3, 3))
        crop[:, 0, 0], crop[:, 1, 1], crop[:, 2, 2] = half_w, half_h, 1.0
        crop[:, :2, 2] = self.center
        a = np.deg2rad(self.angle)
        # a counter-clockwise turn in y-down image coordinates maps a source point s to [[c, s], [-s, c]] s;
        # the warp needs the inverse (where each output pixel comes from)
        rot = np.zeros((n, 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
        rot[:, 2, 2] = 1.0
        flip = np.tile(np.eye(3), (n, 1, 1))
        flip[:, 0, 0] = np.where(self.flip, -1.0, 1.0)
        return (flip @ rot @ crop)[:, :2, :]

    def colour(self) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, 3) RGB colour matrices and (B,) offset weights w: pixel' = M pixel + w * mean_luma(source)
        (the same offset in every channel), before the clamp to [0, 255]."""
        n = len(self.flip)
        bc = self.brightness * self.contrast
        chroma = np.where(self.gray, 0.0, bc * self.saturation)
        phi = 2 * np.pi * self.hue
        yiq = np.zeros((n, 3, 3))
        yiq[:, 0, 0] = bc
        yiq[:, 1, 1], yiq[:, 1, 2] = chroma * np.cos(phi), -chroma * np.sin(phi)
        yiq[:, 2, 1], yiq[:, 2, 2] = chroma * np.sin(phi), chroma * np.cos(phi)
        # brightness b and contrast c in either order: Y' = b c Y + (1 - c) b mean(Y)
        return YIQ_INV @ yiq @ YIQ, (1.0 - self.contrast) * self.brightness


def draw_params(seeds, aug: AugmentConfig) -> AugmentParams:
    """The augmentation of each seed under `aug` (identity everywhere when aug.enabled is false)."""
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    n = len(seeds)
    on = aug.enabled
    flip = (uniform(seeds, _FLIP) < aug.hflip) if on and aug.hflip > 0 else np.zeros(n, dtype=bool)
    angle = (2 * uniform(seeds, _ANGLE) - 1) * aug.rotation if on and aug.rotation > 0 else np.zeros(n)
    scale, ratio = np.ones(n), np.ones(n)
    if on and aug.crop_scale_min < 1.0:
        tries_s = np.stack([uniform(seeds, _CROP_SCALE + k) for k in range(CROP_TRIES)], axis=1)
        tries_r = np.stack([uniform(seeds, _CROP_RATIO + k) for k in range(CROP_TRIES)], axis=1)
        s = aug.crop_scale_min + (aug.crop_scale_max - aug.crop_scale_min) * tries_s
        r = np.exp(np.log(CROP_RATIO[0]) + (np.log(CROP_RATIO[1]) - np.log(CROP_RATIO[0])) * tries_r)
        fits = (s * r <= 1.0) & (s / r <= 1.0)  # crop width and height within the image (square images)
        first = np.argmax(fits, axis=1)
        any_fit = fits.any(axis=1)
        rows = np.arange(n)
        scale = np.where(any_fit, s[rows, first], 1.0)
        ratio = np.where(any_fit, r[rows, first], 1.0)
    half_w, half_h = np.sqrt(scale * ratio), np.sqrt(scale / ratio)
    center = np.stack([(2 * uniform(seeds, _CROP_X) - 1) * (1 - half_w),
                       (2 * uniform(seeds, _CROP_Y) - 1) * (1 - half_h)], axis=1)
    hue = (2 * uniform(seeds, _HUE) - 1) * aug.hue if on and aug.hue > 0 else np.zeros(n)
    gray = (uniform(seeds, _GRAY) < aug.grayscale) if on and aug.grayscale > 0 else np.zeros(n, dtype=bool)
    jitter = {name: _factor(seeds, stream, getattr(aug, name) if on else 0.0)
              for name, stream in (("brightness", _BRIGHT), ("contrast", _CONTRAST), ("saturation", _SAT))}
    return AugmentParams(flip, angle, scale, ratio, center, hue=hue, gray=gray, **jitter)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, C, size, size), align_corners=False) as one broadcast multiply-add with a
    contiguous inner dimension (torch's version is a batched matmul with inner size 3: 20-40x slower on this
    CPU, 160-760 us per image at 112-224 px)."""
    b = theta.shape[0]
    c = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    along_x = theta[:, :, 2].view(b, 1, 2) + theta[:, :, 0].view(b, 1, 2) * c.view(1, size, 1)  # (B, x, 2)
    per_y = theta[:, :, 1].view(b, 1, 2).expand(b, size, 2)
    return torch.addcmul(along_x.reshape(b, 1, 2 * size), c.view(1, size, 1),
                         per_y.reshape(b, 1, 2 * size)).view(b, size, size, 2)


class DeviceAugment:
    """uint8 batches (B, C, S, S) and their augmentation seeds -> augmented, normalised float32 model input
    (B, 3, size, size) on `device` (channels_last if asked). `params(seeds)` gives what was drawn."""

    def __init__(self, aug: AugmentConfig, pre: Preprocess, device: torch.device | str, channels_last: bool = False,
                 cpu_chunk: int | None = None):
        self.aug, self.size = aug, pre.image_size
        self.device = torch.device(device)
        std, mean = torch.tensor(pre.std, dtype=torch.float32), torch.tensor(pre.mean, dtype=torch.float32)
        # (x / 255 - mean) / std = x * norm_scale + norm_shift, per channel
        self.norm_scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.norm_shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        self.luma = torch.tensor(LUMA, dtype=torch.float32, device=self.device).view(1, 3)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # CPU: ~200,000 output pixels per chunk (15 images at 112 px, 3 at 224), which measured fastest here
        # (2-core VM: 3-channel 224 px batches of 32, 550 us per image in chunks of 2-4, 990 in chunks of 16)
        self.chunk = (cpu_chunk or max(1, CPU_CHUNK_PIXELS // self.size**2)) if self.device.type == "cpu" else None
        self.geometric = aug.enabled and (aug.hflip > 0 or aug.rotation > 0 or aug.crop_scale_min < 1.0)

    def params(self, seeds) -> AugmentParams:
        return draw_params(seeds.numpy() if isinstance(seeds, torch.Tensor) else seeds, self.aug)

    def _packed_params(self, p: AugmentParams) -> torch.Tensor:
        """(B, 17) float32 on the device, one host-to-device copy per batch: theta (6), colour matrix (9),
        gain of a gray image (b c, 1), weight of the mean luma in the offset (1); pixel units."""
        matrix, weight = p.colour()
        rows = np.concatenate([p.theta().reshape(-1, 6), matrix.reshape(-1, 9),
                               (p.brightness * p.contrast)[:, None], weight[:, None]], axis=1)
        return torch.from_numpy(rows.astype(np.float32)).to(self.device, non_blocking=True)

    def __call__(self, images: torch.Tensor, seeds) -> torch.Tensor:
        return self.apply(images, self.params(seeds))

    def apply(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """The batch augmented with the given parameters (the warp runs when data.augment has a geometric
        augmentation or the images are not at data.image_size)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceAugment expects uint8 image batches, got {images.dtype}")
        params = self._packed_params(p)
        images = images.to(self.device, non_blocking=True)
        b = images.shape[0]
        out = torch.empty((b, 3, self.size, self.size), dtype=torch.float32, device=self.device,
                          memory_format=self.memory_format)
        step = self.chunk or b
        for lo in range(0, b, step):
            self._apply(images[lo:lo + step], params[lo:lo + step], out[lo:lo + step])
        return out

    def _apply(self, images: torch.Tensor, params: torch.Tensor, out: torch.Tensor) -> None:
        # Every elementwise step below has at most one broadcast operand: torch's CPU kernels vectorise that
        # case only (addcmul with two per-sample tensors ran ~10x slower per element here).
        b, c, s = images.shape[0], images.shape[1], self.size
        x = images.float()
        means = x.mean(dim=(2, 3))  # (B, C)
        mean_luma = means[:, 0] if c == 1 else (means * self.luma).sum(1)  # contrast's blend target
        if self.geometric or images.shape[-1] != s:
            x = F.grid_sample(x, affine_grid(params[:, :6].view(b, 2, 3), s), mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        offset = (params[:, 16] * mean_luma).view(b, 1, 1, 1)  # the same in every channel, pixel units
        if c == 1:  # gray stays gray: every channel is (b c) x + offset
            x = x.mul_(params[:, 15].view(b, 1, 1, 1)).add_(offset)
        else:
            x = torch.baddbmm(offset.view(b, 1, 1), params[:, 6:15].view(b, 3, 3), x.reshape(b, 3, s * s))
            x = x.view(b, 3, s, s)
        x.clamp_(0.0, 255.0)
        if out.is_contiguous():
            torch.mul(x, self.norm_scale, out=out).add_(self.norm_shift)
        else:  # channels_last: normalise contiguously, then one layout copy (strided writes are slower)
            out.copy_(torch.mul(x, self.norm_scale).add_(self.norm_shift))


def training_input(faceset, indices: np.ndarray, labels: np.ndarray, pre: Preprocess, data_cfg: DataConfig,
                   device: torch.device, channels_last: bool) -> tuple[torch.utils.data.Dataset, Callable, Callable]:
    """(dataset, collate_fn, to_input) of the training loader. A pack with data.augment.on_device: batches
    from the memory map, augmented on `device` (`to_input(images, seeds)`); otherwise PIL transforms per image
    in the workers (`transforms.train_transform`) and `to_input(images)` normalising on the device."""
    if data_cfg.source == "packed" and data_cfg.augment.on_device and isinstance(faceset.loader, PackImages):
        return (PackedBatches(faceset.loader, indices, labels), collate_batch,
                DeviceAugment(data_cfg.augment, pre, device, channels_last))
    dataset = FaceDataset(faceset, indices, labels, train_transform(pre, data_cfg.augment), data_cfg.bad_images)
    return dataset, collate, ToModelInput(pre, device, channels_last)


__all__ = ["AugmentParams", "DeviceAugment", "draw_params", "uniform", "affine_grid", "training_input",
           "CROP_RATIO", "CROP_TRIES"]
