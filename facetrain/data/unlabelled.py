"""Faces without labels for the distillation terms (distill.unlabelled, distill.unlabelled_unsampled): the pool,
its seeded order, and the loader pieces that append distill.unlabelled_images of them to every micro-batch.

The pool holds a folder of face images without identity labels (any nesting, every image file) and, with
distill.unlabelled_unsampled, the training images the P x m sampler never draws (identities with fewer than
train.m images, sampler.py); validation identities never join it. The teacher is these images' label.

They travel with the labelled batch: `UnlabelledBatches` appends this rank's (position, augmentation seed) pairs
to each micro-batch of the P x m sampler, so the same DataLoader workers load and augment them (PIL per image,
or a pack's images on the device with their seeds) and the batch's last distill.unlabelled_images rows are
unlabelled. Their order is a pure function of (train.seed, micro-step): global slot g of the run is pool item
perm_e[g mod N] with e = g // N (every item once per pool epoch, a new permutation each), and rank r takes slots
[r k, (r + 1) k) of each micro-step, so a resumed run continues exactly and 3 processes draw what 1 process
draws with 3 k per step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from facetrain.config.checks import image_files
from facetrain.config.schema import Config
from facetrain.data.images import Preprocess
from facetrain.errors import UserError

POOL_STREAM = 0x756E6C  # third word of the pool's seed: its permutations never repeat the sampler's (seed, epoch)


def scan_unlabelled(folder: str | Path) -> list[str]:
    """Every image file under `folder` (any depth, dot folders and files skipped), sorted: the pool's order."""
    found = list(image_files(folder))
    if not found:  # (checked when the config loaded; the folder may have changed since)
        raise UserError(f"distill.unlabelled: no image files under {folder}")
    return sorted(found)


def unsampled_positions(labels: np.ndarray, sampled_identities: np.ndarray) -> np.ndarray:
    """Positions (into the training images) of the identities the P x m sampler never draws (those not in its
    `identities`: fewer than train.m images, the sampler's own rule), ascending."""
    return np.flatnonzero(~np.isin(np.asarray(labels), sampled_identities))


class PoolOrder:
    """The pool's draw order: slot g -> (pool item, augmentation seed), a pure function of (seed, g)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # the last pool epoch drawn (reused)

    def _permutation(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, POOL_STREAM]))
            self._epoch = (epoch, rng.permutation(self.size), rng.integers(0, 2**31 - 1, size=self.size))
        return self._epoch[1], self._epoch[2]

    def slots(self, start: int, count: int) -> tuple[list[int], list[int]]:
        """(pool items, augmentation seeds) of slots start .. start + count - 1."""
        items, seeds = [], []
        for g in range(start, start + count):
            epoch, k = divmod(g, self.size)
            perm, aug = self._permutation(epoch)
            items.append(int(perm[k]))
            seeds.append(int(aug[k]))
        return items, seeds


class UnlabelledBatches:
    """A batch sampler: the P x m sampler's micro-batches of (position, seed) pairs, each followed by this rank's
    `per_rank` unlabelled ones (positions of the joined dataset: `positions[item]`). The P x m sampler stays the
    trainer's to set (`set_epoch`); this reads its epoch and start when iterated."""

    def __init__(self, sampler, positions: np.ndarray, per_rank: int, world: int, rank: int, seed: int):
        self.sampler, self.positions = sampler, np.asarray(positions, dtype=np.int64)
        self.per_rank, self.world, self.rank = per_rank, world, rank
        self.order = PoolOrder(len(self.positions), seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def extra(self, micro_step: int) -> list[tuple[int, int]]:
        """This rank's unlabelled (position, seed) pairs of the run's micro-step `micro_step`."""
        start = (micro_step * self.world + self.rank) * self.per_rank
        items, seeds = self.order.slots(start, self.per_rank)
        return [(int(self.positions[i]), s) for i, s in zip(items, seeds, strict=True)]

    def __iter__(self):
        first = self.sampler.epoch * self.sampler.steps_per_epoch + self.sampler.start  # the run's micro-step
        for i, batch in enumerate(self.sampler):
            yield batch + self.extra(first + i)


class JoinedDataset:
    """The training dataset (positions 0 .. n-1) followed by the unlabelled folder's images (n ..), both with
    the training transform; items are (image, label, position), a folder image's label -1 (never read)."""

    def __init__(self, train, folder):
        self.train, self.folder = train, folder

    def __len__(self) -> int:
        return len(self.train) + len(self.folder)

    def __getitem__(self, item):
        pos, seed = item if isinstance(item, tuple) else (item, None)
        n = len(self.train)
        if pos < n:
            return self.train[item]
        image, label, _ = self.folder[(pos - n, seed) if seed is not None else pos - n]
        return image, label, pos


def pool_positions(folder_images: int, train_labels: np.ndarray, sampler, unsampled: bool) -> np.ndarray:
    """The pool as positions of the joined dataset: the training images `sampler` (an MPerClassBatchSampler)
    never draws (if asked), then the folder's images (after the len(train_labels) training positions). A
    one-line error when it is empty."""
    m = sampler.m
    parts = [unsampled_positions(train_labels, sampler.identities)] if unsampled else []
    parts.append(len(train_labels) + np.arange(folder_images, dtype=np.int64))
    positions = np.concatenate(parts).astype(np.int64)
    if len(positions) == 0:
        raise UserError(f"distill.unlabelled_unsampled: every training identity has >= train.m={m} images, so the "
                        "sampler uses every image and none is left over; give distill.unlabelled (a folder) or "
                        "set distill.unlabelled_images 0")
    return positions


def unlabelled_input(cfg: Config, train_ds, sampler, train_labels: np.ndarray, pre: Preprocess, world: int,
                     rank: int, check: Callable[[list[str]], list[str]] | None = None):
    """(training dataset, batch sampler, pool size) with distill.unlabelled_images appended to every micro-batch
    (unchanged, pool size 0, when distill.unlabelled_images is 0). The folder's images get the training transform
    of `pre` and data.augment (the PIL path; the config refuses a folder with a pack augmented on the device,
    whose unsampled images are in the pack itself). `check`: the folder's files -> those to use (the trainer's
    pre-flight: a corrupt file stops the run before it starts, or is left out, as data.bad_images says)."""
    from facetrain.data.dataset import FaceDataset  # torch: only when a loader is built
    from facetrain.data.faceset import unlabelled_faceset
    from facetrain.data.transforms import train_transform

    d = cfg.distill
    if not d.unlabelled_images:
        return train_ds, sampler, 0
    paths = scan_unlabelled(d.unlabelled) if d.unlabelled else []
    if paths and check is not None:
        paths = check(paths)
        if not paths:
            raise UserError(f"distill.unlabelled: no usable image under {d.unlabelled} (all refused by the "
                            "pre-flight): fix them or point it at another folder")
    if paths:
        folder = FaceDataset(unlabelled_faceset(paths), np.arange(len(paths)), np.full(len(paths), -1),
                             train_transform(pre, cfg.data.augment), cfg.data.bad_images)
        train_ds = JoinedDataset(train_ds, folder)
    positions = pool_positions(len(paths), train_labels, sampler, d.unlabelled_unsampled)
    return (train_ds, UnlabelledBatches(sampler, positions, d.unlabelled_images, world, rank, cfg.train.seed),
            len(positions))
