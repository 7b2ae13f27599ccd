"""Face data: sources (image folder, Hugging Face datasets, synthetic), the identity split, transforms.

A source becomes a `FaceSet`: one integer label per image, the identity names, and a loader that returns a
PIL image for an index. Train/validation are split by *identity* (seeded), never by image, so validation
measures verification of people the model has never seen. The transforms end in uint8 tensors; `collate`
batches them and `ToModelInput` normalises a whole batch on the device (train, validation, eval, verify).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from facetrain.config.schema import AugmentConfig, DataConfig
from facetrain.data import synthetic
from facetrain.data.images import (  # noqa: F401 (re-exported)
    IMAGE_EXTENSIONS,
    Preprocess,
    decode,
    load_image,
    scan_identity_folder,
    to_rgb,
)
from facetrain.errors import UserError


@dataclass
class FaceSet:
    """Labelled images from any source; `load(i)` returns an RGB PIL image."""

    labels: np.ndarray
    """Identity index per image (int64), 0..len(names)-1."""
    names: list[str]
    """Identity names (folder names, dataset labels, or `synthetic_<k>`)."""
    keys: list[str]
    """Per image: a path or a description, used in messages and bad-file lists."""
    loader: Callable[[int], Image.Image]
    """Returns image i (any mode; `to_rgb` normalises it)."""
    paths: list[str] | None = None
    """Per image file path when the source is a folder (pre-flight checks read these)."""
    skipped: list[str] = field(default_factory=list)
    """Files left out by the pre-flight check (source=folder with bad_images=skip)."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, identities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image indices of the given identities and their labels remapped to 0..len(identities)-1."""
        remap = np.full(len(self.names), -1, dtype=np.int64)
        remap[identities] = np.arange(len(identities))
        idx = np.flatnonzero(remap[self.labels] >= 0)
        return idx, remap[self.labels[idx]]


# ----------------------------------------------------------------------------------------------------------
# Sources


def scan_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """root/<identity>/<image> -> (paths, labels, identity names) (`images.scan_identity_folder`)."""
    return scan_identity_folder(root, "data.root")


def folder_faceset(root: str) -> FaceSet:
    paths, labels, names = scan_folder(root)
    return FaceSet(np.asarray(labels, dtype=np.int64), names, list(paths), _PathLoader(paths), paths=paths)


class _PathLoader:
    """Picklable loader for DataLoader workers."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, i: int) -> Image.Image:
        return decode(self.paths[i])


class _SyntheticLoader:
    def __init__(self, seed: int, per_identity: int):
        self.seed, self.per_identity = seed, per_identity

    def __call__(self, i: int) -> Image.Image:
        return synthetic.render_cached(self.seed, i // self.per_identity, i % self.per_identity)


def synthetic_faceset(identities: int, per_identity: int, seed: int) -> FaceSet:
    labels = np.repeat(np.arange(identities, dtype=np.int64), per_identity)
    keys = [f"synthetic:{i // per_identity}/{i % per_identity}" for i in range(len(labels))]
    return FaceSet(labels, [f"synthetic_{k}" for k in range(identities)], keys,
                   _SyntheticLoader(seed, per_identity))


class _HFLoader:
    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __call__(self, i: int) -> Image.Image:
        return decode(self.ds[int(i)][self.column])  # datasets applied EXIF already: a no-op then


def hf_faceset(cfg: DataConfig) -> FaceSet:
    import datasets  # heavy import, only when used

    try:
        if cfg.hf_name:
            ds = datasets.load_dataset(cfg.hf_name, split=cfg.hf_split)
        else:
            if not Path(cfg.root).is_dir():
                raise UserError(f"data.root: folder not found: {cfg.root}")
            ds = datasets.load_dataset("imagefolder", data_dir=cfg.root, split=cfg.hf_split)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the name and the reason
        what = cfg.hf_name or f"imagefolder {cfg.root}"
        raise UserError(f"data.hf_name: cannot load {what} split {cfg.hf_split!r}: "
                        f"{str(err).splitlines()[0]}") from None
    for key, col in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if col not in ds.column_names:
            raise UserError(f"{key}: column {col!r} not in dataset (columns: {', '.join(ds.column_names)})")
    raw = ds[cfg.label_column]
    feature = ds.features[cfg.label_column]
    if hasattr(feature, "names"):  # ClassLabel: ints with names
        names_all = list(feature.names)
        raw = [names_all[int(v)] for v in raw]
    names = sorted({str(v) for v in raw})
    index = {n: k for k, n in enumerate(names)}
    labels = np.asarray([index[str(v)] for v in raw], dtype=np.int64)
    keys = [f"{cfg.hf_name or cfg.root}[{i}]" for i in range(len(labels))]
    return FaceSet(labels, names, keys, _HFLoader(ds, cfg.image_column))


def build_faceset(cfg: DataConfig) -> FaceSet:
    if cfg.source == "synthetic":
        return synthetic_faceset(cfg.synthetic_identities, cfg.synthetic_images_per_identity, cfg.synthetic_seed)
    if cfg.source == "folder":
        return folder_faceset(cfg.root)
    if cfg.source == "packed":  # a pack file (facetrain/data/pack_format.py): the stored images, memory-mapped
        from facetrain.data.pack_format import packed_faceset

        return packed_faceset(cfg.root, cfg.image_size)
    return hf_faceset(cfg)


def split_identities(faceset: FaceSet, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train identities, validation identities), disjoint, seeded by data.split_seed."""
    n = len(faceset.names)
    n_val = cfg.val_identities if cfg.val_identities > 0 else int(round(n * cfg.val_fraction))
    n_val = max(2, n_val)  # validation needs two identities for impostor pairs
    if n - n_val < 2:
        raise UserError(f"data: only {n} identities; holding out {n_val} for validation leaves {n - n_val} "
                        "for training (need >= 2): add identities or lower data.val_fraction/val_identities")
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ----------------------------------------------------------------------------------------------------------
# Transforms


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


class FaceDataset(torch.utils.data.Dataset):
    """Images `indices` of a FaceSet with labels `labels`, transformed; returns (image, label, position).

    A file that fails to decode during training (changed on disk after the pre-flight) follows
    data.bad_images: `error` stops with the file's name; `skip` substitutes the next image of the same
    identity, so the batch keeps its P x m structure and every rank keeps the same step count.
    """

    def __init__(self, faceset: FaceSet, indices: np.ndarray, labels: np.ndarray, transform: Callable,
                 bad_images: str = "error"):
        self.faceset, self.indices, self.labels = faceset, np.asarray(indices), np.asarray(labels)
        self.transform, self.bad_images = transform, bad_images
        self._by_label: dict[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, pos: int) -> Image.Image:
        return to_rgb(self.faceset.loader(int(self.indices[pos])), keep_gray=True)

    def __getitem__(self, item: int | tuple[int, int]):
        # The sampler sends (position, seed): augmentation randomness then depends on the plan alone, not on
        # which worker or rank loads the image, so resumed and multi-process runs see the same pixels.
        pos, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:
            return self._item(pos)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator is all the transforms draw from;
            # torch.manual_seed would also queue a CUDA seeding on every item (~1 ms against ~0.06 ms)
            return self._item(pos)

    def _item(self, pos: int):
        try:
            img = self._load(pos)
        except Exception as err:
            key = self.faceset.keys[int(self.indices[pos])]
            if self.bad_images == "error":
                raise UserError(f"{key}: cannot decode image ({type(err).__name__}: {err}); remove or fix it, "
                                "or set data.bad_images: skip") from None
            img = self._substitute(pos, key)
        return self.transform(img), int(self.labels[pos]), pos

    def _substitute(self, pos: int, key: str) -> Image.Image:
        if self._by_label is None:
            order = np.argsort(self.labels, kind="stable")
            splits = np.flatnonzero(np.diff(self.labels[order])) + 1
            self._by_label = {int(self.labels[g[0]]): g for g in np.split(order, splits)}
        group = self._by_label[int(self.labels[pos])]
        start = int(np.flatnonzero(group == pos)[0])
        for k in range(1, len(group)):
            alt = int(group[(start + k) % len(group)])
            try:
                img = self._load(alt)
            except Exception:
                continue
            print(f"facetrain: warning: {key}: cannot decode, used another image of the same identity",
                  flush=True)
            return img
        raise UserError(f"{key}: no image of this identity can be decoded; remove the identity folder")


def default_num_workers(num_processes: int) -> int:
    """Workers per rank: this machine's cores split between the ranks *on this machine*, one kept for the rank
    itself, at most 8; 0 when no core is spare. `num_processes` is the total process count; the launcher's
    LOCAL_WORLD_SIZE (ranks on this node) takes precedence, so 2 nodes x 8 GPUs split a node's cores 8 ways."""
    from facetrain.runtime.distributed import launcher_local_world_size

    local = launcher_local_world_size(num_processes)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, local) - 1))
