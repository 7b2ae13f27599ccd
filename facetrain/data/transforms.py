"""Image transforms: PIL image -> uint8 tensor (evaluation resize, training augmentation), the batch collate,
and `ToModelInput`, which normalises a whole uint8 batch on the device (train, validation, eval, verify).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from facetrain.config.schema import AugmentConfig
from facetrain.data.images import Preprocess


def eval_transform(pre: Preprocess) -> Callable:
    """PIL image -> uint8 tensor (C, H, W), C = 1 for gray images, 3 otherwise; `ToModelInput` normalises."""
    return T.Compose([
        T.Resize((pre.image_size, pre.image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.PILToTensor(),
    ])


class _SquareAtMost:
    """Resize to a square of side min(size, longer side): large images shrink as with Resize((size, size)),
    small ones are not enlarged, so the augmentation after it works on the image's own pixels."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        side = min(self.size, max(img.size))
        return T.functional.resize(img, [side, side], antialias=True)


def train_transform(pre: Preprocess, aug: AugmentConfig) -> Callable:
    if not aug.enabled:
        return eval_transform(pre)
    size = pre.image_size
    # native_resolution: rotation and colour steps run before the enlargement, which the final crop does (4-5x
    # fewer pixels per step for 92x112 faces at 224 px); colour changes commute with resizing up to rounding.
    early = aug.native_resolution
    steps: list = [_SquareAtMost(size) if early else T.Resize((size, size), antialias=True)]
    if aug.hflip > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.rotation > 0:
        steps.append(T.RandomRotation(aug.rotation))
    colour: list = []
    if max(aug.brightness, aug.contrast, aug.saturation, aug.hue) > 0:
        colour.append(T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    if aug.grayscale > 0:
        colour.append(T.RandomGrayscale(aug.grayscale))
    if early:
        steps += colour
    if aug.crop_scale_min < 1.0:
        steps.append(T.RandomResizedCrop(size, scale=(aug.crop_scale_min, aug.crop_scale_max),
                                         ratio=(0.75, 1.33), antialias=True))
    elif early:
        steps.append(T.Resize((size, size), antialias=True))
    if not early:
        steps += colour
    steps.append(T.PILToTensor())
    return T.Compose(steps)


def collate(batch: list):
    """DataLoader collate for items whose first element is a uint8 image tensor (or bare image tensors):
    torch's default collate, after repeating single-channel images to 3 channels when a batch mixes gray and
    colour images (a batch of gray images stays 1-channel: `ToModelInput` repeats it on the device)."""
    bare = isinstance(batch[0], torch.Tensor)
    images = [item if bare else item[0] for item in batch]
    if len({im.shape[0] for im in images}) > 1:
        images = [im.expand(3, -1, -1) for im in images]
        batch = images if bare else [(im, *item[1:]) for im, item in zip(images, batch, strict=True)]
    return torch.utils.data.default_collate(batch)


class ToModelInput:
    """uint8 image batches (B, 1 or 3, H, W) from the transforms -> normalised float32 (B, 3, H, W) on the
    device, channels_last if asked: x * (1 / (255 std)) - mean / std, i.e. (x / 255 - mean) / std.

    Why after the DataLoader and not in its workers: a uint8 batch is 4x smaller than a float one (12x for
    gray images, kept 1-channel until here) to collate, pass between processes and copy to a GPU, and one
    vectorised op per batch is cheaper than ToTensor + Normalize per image. 2-core CPU, 32 gray 224 px images:
    worker CPU 42 -> 24 ms per batch, this step 3 ms (docs/performance.md)."""

    def __init__(self, pre: Preprocess, device: torch.device | str, channels_last: bool = False):
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.device = torch.device(device)
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.shift = (-mean / std).to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"ToModelInput expects uint8 image batches from data transforms, got {images.dtype}")
        images = images.to(self.device, non_blocking=True)
        b, _, h, w = images.shape
        out = torch.empty((b, 3, h, w), dtype=torch.float32, device=self.device, memory_format=self.memory_format)
        # one fused pass that broadcasts a gray batch's one channel to three (2-core CPU, 32 x 224 px gray:
        # 3 ms, vs 7 ms for a uint8 multiply then an add)
        return torch.addcmul(self.shift, images.float(), self.scale, out=out)
