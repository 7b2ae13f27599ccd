"""`distill.targets: cached`: the teacher embeds each training image's fixed, un-augmented view once; every step
the student's augmented view is pulled towards that fixed target (the "cached-target" baseline of issue 25).

The targets live on disk in `distill.cache_dir` (empty: the user's cache folder, `default_cache_dir`), one
safetensors file per (teacher, input spec, data.image_size): `teacher-targets-<key[:16]>.safetensors`, the key
the sha256 of the teacher file's sha256 (`teacher_sha256`), its input spec text and the image size. The file
holds two tensors, `keys` (N, 20) uint8 and `targets` (N, D) float32, and its metadata repeats what it was made
for (checked on reading, so a foreign file or a name collision is never taken for a hit).

Each image is keyed by its CONTENT: the sha1 of the decoded uint8 pixels of its un-augmented view at
data.image_size (the evaluation resize, the very pixels the teacher embeds) and their shape, not by its path or
file bytes: a renamed or moved file hits, an edited one misses, a re-saved file whose pixels did not change
still hits, and it works the same for every data source (folders, Hugging Face datasets and packs have no
common file to hash). The price is decoding every training image once per run, which the teacher pass needs
anyway on a miss. The file accumulates every image it has seen (several splits or data sets can share it);
a rerun embeds only the images it lacks and rewrites it atomically (`write_atomic`). A file that cannot be read
or does not match is a one-line warning, and is rebuilt.

Under DDP rank 0 decodes, fills and writes the cache while the others wait, then broadcasts the (N, D) targets
in dataset-position order: another rank would otherwise have to decode and hash every image again just to know
which row is its own. Every rank then looks its batch's targets up by the positions the loader yields (indices
into the training subset, `data.dataset.FaceDataset`) and gathers them as the online targets are gathered.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from facetrain.config.schema import DistillConfig
from facetrain.data.dataset import FaceDataset
from facetrain.data.images import Preprocess
from facetrain.data.transforms import collate, eval_transform
from facetrain.deploy.gallery_cache import default_cache_dir
from facetrain.deploy.teacher import Teacher, teacher_sha256
from facetrain.runtime.atomic_dir import write_atomic
from facetrain.runtime.distributed import main_process_result
from facetrain.runtime.user_dirs import cache_environment
from facetrain.training.distill import pixels_view

CACHE_FORMAT = "facetrain-teacher-targets"
CACHE_VERSION = "1"
KEYS, TARGETS = "keys", "targets"  # the file's two tensors
DIGEST_BYTES = 20  # sha1 of an image's pixels
KEY_CHARS = 16  # hex characters of the (teacher, spec, size) key in the file name
EMBED_BATCH = 64  # images decoded, hashed and (when missing) embedded at a time


def image_key(pixels: torch.Tensor) -> bytes:
    """The content key of one un-augmented view: sha1 of its shape and its uint8 pixels (C, H, W)."""
    h = hashlib.sha1(str(tuple(pixels.shape)).encode())
    h.update(np.ascontiguousarray(pixels.numpy()).tobytes())
    return h.digest()


def spec_text(teacher: Teacher, given: str) -> str:
    """The teacher's input spec as the cache key spells it: the parsed spec's canonical text for a third-party
    ONNX file (two spellings of one spec share a cache), else what distill.teacher_input gave (empty for a file
    that states its own input, which its sha256 covers)."""
    spec = getattr(teacher, "spec", None)
    return spec.describe() if spec is not None else given


@dataclass(frozen=True)
class CacheId:
    """What one cache file is for; written into its metadata and checked on reading."""

    teacher_sha256: str
    spec: str
    image_size: int

    def metadata(self) -> dict[str, str]:
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher_sha256": self.teacher_sha256,
                "spec": self.spec, "image_size": str(self.image_size)}

    def file(self, cache_dir: str | Path) -> Path:
        key = hashlib.sha256(f"{self.teacher_sha256}|{self.spec}|{self.image_size}".encode()).hexdigest()
        return Path(cache_dir) / f"teacher-targets-{key[:KEY_CHARS]}.safetensors"


def read_cache(path: Path, cache_id: CacheId, dim: int) -> tuple[dict[bytes, np.ndarray], str | None]:
    """({content key: target (D,) float32}, None) from the cache file, ({}, None) when there is none, or
    ({}, why it cannot be used) for a file that is unreadable or made for something else."""
    from safetensors import safe_open

    if not path.exists():
        return {}, None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta, keys, targets = f.metadata() or {}, f.get_tensor(KEYS), f.get_tensor(TARGETS)
    except Exception as err:  # truncated, foreign or not safetensors at all: rebuilt, never a crash
        return {}, f"unreadable ({type(err).__name__})"
    if meta != cache_id.metadata():
        return {}, "made for another teacher, input spec or image size"
    if keys.ndim != 2 or keys.shape[1] != DIGEST_BYTES or targets.shape != (len(keys), dim):
        return {}, f"tensors of unexpected shapes {list(keys.shape)}, {list(targets.shape)}"
    return {bytes(k): t for k, t in zip(keys, targets.astype(np.float32), strict=True)}, None


def write_cache(path: Path, cache_id: CacheId, known: dict[bytes, np.ndarray]) -> None:
    """Every known target into `path`, atomically (a reader sees the old file or the new one)."""
    from safetensors.numpy import save_file

    keys = np.frombuffer(b"".join(known), dtype=np.uint8).reshape(len(known), DIGEST_BYTES)
    targets = np.stack(list(known.values())).astype(np.float32)
    def write(tmp: Path) -> None:
        try:  # inside write_atomic: a folder the disk refuses is one line too
            tmp.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where the folder should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(tmp.parent)) from None
        save_file({KEYS: keys, TARGETS: targets}, str(tmp), metadata=cache_id.metadata())

    write_atomic(path, write, todo="free disk space or set distill.cache_dir to a writable folder")


@dataclass
class FillReport:
    """What a fill did: targets found in the file, targets the teacher computed, the file, and why an existing
    file was not usable (None when it was, or when there was none)."""

    cached: int
    computed: int
    path: Path
    stale: str | None = None

    def line(self) -> str:
        return f"teacher targets: {self.cached} cached, {self.computed} computed (cache file {self.path})"


@torch.no_grad()
def fill(teacher: Teacher, dataset: FaceDataset, path: Path, cache_id: CacheId,
         workers: int = 0) -> tuple[np.ndarray, FillReport]:
    """(targets (N, D) float32 in dataset-position order, report): every image of `dataset` (un-augmented uint8
    views) is decoded and keyed; the images the file lacks are embedded by the teacher, batch by batch, and the
    file is rewritten when anything was added or it was not usable."""
    known, stale = read_cache(path, cache_id, teacher.dim)
    loader = torch.utils.data.DataLoader(dataset, batch_size=EMBED_BATCH, shuffle=False, collate_fn=collate,
                                         num_workers=workers)
    rows, cached, computed = [], 0, 0
    for images, _, _ in loader:
        keys = [image_key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in known]
        if missing:
            embedded = np.asarray(teacher.embed(pixels_view(images[missing])), dtype=np.float32)
            for i, target in zip(missing, embedded, strict=True):
                known[keys[i]] = target
        cached, computed = cached + len(keys) - len(missing), computed + len(missing)
        rows.extend(known[k] for k in keys)
    if computed or stale:
        write_cache(path, cache_id, known)
    targets = np.stack(rows) if rows else np.zeros((0, teacher.dim), np.float32)
    return targets, FillReport(cached, computed, path, stale)


class CachedTargets:
    """The fixed targets of the training images, by dataset position, on the training device."""

    def __init__(self, targets: np.ndarray, device: torch.device):
        self.targets = torch.from_numpy(np.ascontiguousarray(targets)).to(device)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 targets of the batch's dataset positions (B,)."""
        return self.targets[positions.to(self.targets.device, torch.long)]


def cache_dir_of(cfg: DistillConfig) -> Path:
    """distill.cache_dir, or the user's cache folder (shared with the gallery caches) when it is empty."""
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cache_environment())


def cached_targets(cfg: DistillConfig, teacher: Teacher, faceset, indices: np.ndarray, labels: np.ndarray,
                   pre: Preprocess, bad_images: str, accelerator, workers: int,
                   say: Callable[[str], None]) -> CachedTargets:
    """The training images' cached targets on every rank: rank 0 fills the cache (`fill`) and says what it did
    in one line (`say`; a stale file also in a warning), the others wait for its targets."""
    def fill_on_main() -> np.ndarray:
        cache_id = CacheId(teacher_sha256(cfg.teacher), spec_text(teacher, cfg.teacher_input), pre.image_size)
        dataset = FaceDataset(faceset, indices, labels, eval_transform(pre), bad_images)
        path = cache_id.file(cache_dir_of(cfg))
        targets, report = fill(teacher, dataset, path, cache_id, workers)
        if report.stale:
            say(f"[yellow]warning:[/] teacher-target cache {escape(str(path))}: {report.stale}; rebuilt")
        say(escape(report.line()))
        return targets

    # a fill error on rank 0 stops every rank with its line instead of leaving them waiting for the targets
    return CachedTargets(main_process_result(fill_on_main, accelerator), accelerator.device)
