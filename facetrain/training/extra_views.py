"""Extra views that only the distillation terms see (distill.mix, distill.unlabelled_images): faces mixed
between identities, and faces without labels. The teacher embeds each of them itself, so none needs a label.

A micro-batch's model input is laid out [labelled P x m | unlabelled | mixed] and goes through the student in ONE
forward pass (BatchNorm sees all of it); the metric loss takes the labelled rows alone, the distillation terms
all of them (training/distill.py, `global_terms`, gathers each part in rank order).

* Unlabelled rows come from the loader (data/unlabelled.py), augmented like the labelled ones.
* Mixed rows are made here from the micro-batch's labelled model input (after augmentation and normalisation):
  distill.mix_images pairs (i, j) of images of DIFFERENT identities, the first uniform over the batch, the second
  uniform over the images of other identities, and a proportion lambda ~ Beta(mix_alpha, mix_alpha) per pair.
  `mixup` blends lambda x_i + (1 - lambda) x_j (the normalisation is affine per channel, so this is the pixel
  blend, normalised); `cutmix` pastes a square of x_j covering 1 - lambda of the image (its side rounded to
  whole pixels) at a uniform position inside x_i. The draws come from a numpy generator seeded by
  (train.seed, step, micro-step, rank) on the host: exact on resume, independent of the global random streams,
  and no device sync. Pairs stay within a rank's slice of the batch, so with several processes the mixes differ
  from one process's (as the pairs within a random batch differ): statistically the same, not bit-equal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from facetrain.config.names import MIX_NAMES, keyed_by
from facetrain.config.schema import DistillConfig

MIX_STREAM = 0x6D6978  # last word of the mixer's seed: its draws never repeat another stream's
Mixer = Callable[[torch.Tensor, torch.Tensor, np.ndarray, np.random.Generator], torch.Tensor]


def mix_rng(seed: int, step: int, micro: int, rank: int) -> np.random.Generator:
    """The generator of one micro-step's mixes on one rank: a pure function of its arguments."""
    return np.random.Generator(np.random.PCG64([seed, step, micro, rank, MIX_STREAM]))


def draw_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` pairs (first, second) of batch positions with labels[first] != labels[second]: first uniform over
    the batch, second uniform over the images of the other identities (a batch holds >= 2 identities)."""
    labels = np.asarray(labels)
    first = rng.integers(0, len(labels), size=count)
    other = labels[None, :] != labels[first][:, None]  # (count, batch)
    # a uniform score per candidate, 0 for the same identity: the argmax is a uniform pick among the others
    second = np.argmax(rng.random((count, len(labels))) * other, axis=1)
    return first, second


def mixup(first: torch.Tensor, second: torch.Tensor, lam: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """lambda x first + (1 - lambda) x second, per image."""
    weight = torch.as_tensor(lam, dtype=first.dtype, device=first.device).view(-1, 1, 1, 1)
    return first * weight + second * (1 - weight)


def cutmix_boxes(lam: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 4) boxes (top, left, box height, box width) in pixels covering a 1 - lambda fraction of the image,
    each side rounded to whole pixels, placed uniformly so that it lies inside the image."""
    side = np.sqrt(1.0 - np.asarray(lam, dtype=np.float64))
    h, w = np.rint(side * height).astype(np.int64), np.rint(side * width).astype(np.int64)
    top = np.floor(rng.random(len(h)) * (height - h + 1)).astype(np.int64)
    left = np.floor(rng.random(len(w)) * (width - w + 1)).astype(np.int64)
    return np.stack([top, left, h, w], axis=1)


def cutmix(first: torch.Tensor, second: torch.Tensor, lam: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """`first` with a box of `second` pasted at the same place (cutmix_boxes), per image."""
    b, _, height, width = first.shape
    boxes = torch.as_tensor(cutmix_boxes(lam, height, width, rng), device=first.device)
    rows = torch.arange(height, device=first.device).view(1, height, 1)
    cols = torch.arange(width, device=first.device).view(1, 1, width)
    top, left, h, w = (boxes[:, k].view(b, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (b, H, W)
    return torch.where(inside.unsqueeze(1), second, first)


MIXERS: dict[str, Mixer | None] = keyed_by(MIX_NAMES, {
    "none": None,
    "mixup": mixup,
    "cutmix": cutmix,
})


class ExtraViews:
    """Appends the mixed images to a micro-batch's model input (whose last `unlabelled` rows are the loader's
    unlabelled images); `inputs` says how many leading rows are labelled."""

    def __init__(self, cfg: DistillConfig, seed: int, rank: int):
        self.mixer, self.mix_name = MIXERS[cfg.mix], cfg.mix
        self.mix_images, self.alpha, self.unlabelled = cfg.mix_images, cfg.mix_alpha, cfg.unlabelled_images
        self.seed, self.rank = seed, rank

    @property
    def count(self) -> int:
        """Extra images per process per micro-step (0: the run trains as without this module)."""
        return self.unlabelled + (self.mix_images if self.mixer is not None else 0)

    def describe(self, pool: int) -> str:
        parts = [f"{self.unlabelled} unlabelled (from a pool of {pool})"] if self.unlabelled else []
        if self.mixer is not None:
            parts.append(f"{self.mix_images} mixed by {self.mix_name} (Beta({self.alpha:g}, {self.alpha:g}))")
        return (f"distillation: + {' + '.join(parts)} images per process per micro-step, seen by the "
                "distillation terms only")

    def inputs(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int) -> tuple[torch.Tensor, int]:
        """(model input with the mixed images appended, number of labelled rows). `labels`: the batch's, on the
        host (the labelled rows' decide the pairs)."""
        labelled = len(images) - self.unlabelled
        if self.mixer is None:
            return images, labelled
        rng = mix_rng(self.seed, step, micro, self.rank)
        first, second = draw_pairs(labels[:labelled].numpy(), self.mix_images, rng)
        lam = rng.beta(self.alpha, self.alpha, size=self.mix_images)
        pick = torch.as_tensor(np.concatenate([first, second]), device=images.device)
        pairs = images.index_select(0, pick)
        mixed = self.mixer(pairs[:self.mix_images], pairs[self.mix_images:], lam, rng)
        return torch.cat([images, mixed.to(memory_format=_memory_format(images))]), labelled


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) and \
        not images.is_contiguous() else torch.contiguous_format
