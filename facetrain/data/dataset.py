"""Torch datasets over face sets: `FaceDataset` (images of a FaceSet, transformed one by one; the PIL path)
and `PackedBatches` (whole batches gathered from a pack, for augmentation on the device); the DataLoader
worker count.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from facetrain.data.faceset import FaceSet
from facetrain.data.images import to_rgb
from facetrain.data.pack_format import PackImages
from facetrain.errors import UserError


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


class PackedBatches(torch.utils.data.Dataset):
    """Training batches straight from a pack, for augmentation on the device: the DataLoader's batch sampler
    hands `__getitems__` a whole batch of (position, augmentation seed) pairs and gets back one tuple
    (uint8 images (B, C, S, S), labels (B,), positions (B,), seeds (B,)); `collate_batch` passes it through.
    No PIL, no per-image Python beyond the index list: one gather from the memory map per batch."""

    def __init__(self, images: PackImages, indices: np.ndarray, labels: np.ndarray):
        self.images, self.indices, self.labels = images, np.asarray(indices, dtype=np.int64), np.asarray(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = [item if isinstance(item, tuple) else (item, 0) for item in items]
        pos = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
        seeds = np.fromiter((s for _, s in pairs), dtype=np.int64, count=len(pairs))
        images = torch.from_numpy(self.images.batch(self.indices[pos]))
        return images, torch.from_numpy(self.labels[pos].astype(np.int64)), torch.from_numpy(pos), \
            torch.from_numpy(seeds)

    def __getitem__(self, item):
        images, labels, pos, seeds = self.__getitems__([item])
        return images[0], int(labels[0]), int(pos[0]), int(seeds[0])


def collate_batch(batch):
    """collate_fn for `PackedBatches`: its `__getitems__` already returns the batch."""
    return batch


def default_num_workers(num_processes: int) -> int:
    """Workers per rank: this machine's cores split between the ranks *on this machine*, one kept for the rank
    itself, at most 8; 0 when no core is spare. `num_processes` is the total process count; the launcher's
    LOCAL_WORLD_SIZE (ranks on this node) takes precedence, so 2 nodes x 8 GPUs split a node's cores 8 ways."""
    from facetrain.runtime.distributed import launcher_local_world_size  # here: it imports accelerate (~1 s)

    local = launcher_local_world_size(num_processes)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, local) - 1))
