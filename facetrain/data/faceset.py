"""Face sets: the labelled images of a source (image folder, pack, Hugging Face dataset, synthetic), and the
identity split.

A source becomes a `FaceSet`: one integer label per image, the identity names, and a loader that returns a
PIL image for an index. Train/validation are split by *identity* (seeded), never by image, so validation
measures verification of people the model has never seen. `scan_identity_folder` is the one scan of a
`root/<identity>/<image>` folder: training, eval, identify and serve galleries and the packer number a folder
with it. Nothing here imports torch (serve's gallery scan runs on the onnxruntime path).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from facetrain.config.schema import DataConfig
from facetrain.data import synthetic
from facetrain.data.images import IMAGE_EXTENSIONS, decode
from facetrain.data.pack_format import PackImages, is_pack_file, pack_command, read_header, sized_name
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
    excluded: list[str] = field(default_factory=list)
    """Files left out by `data.exclude` (an audit's likely mislabels and duplicates; source=folder)."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, identities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image indices of the given identities and their labels remapped to 0..len(identities)-1."""
        remap = np.full(len(self.names), -1, dtype=np.int64)
        remap[identities] = np.arange(len(identities))
        idx = np.flatnonzero(remap[self.labels] >= 0)
        return idx, remap[self.labels[idx]]


def scan_identity_folder(root: str | Path, key: str) -> tuple[list[str], np.ndarray, list[str]]:
    """root/<identity>/<image> -> (image paths, identity label per image (int64), identity names), identities and
    files sorted by name, dot folders skipped: the order every command (training, eval, identify, pack, serve)
    numbers a folder in. `key` (a config key or an option) names the input in the one-line errors."""
    base = Path(root)
    if base.is_file() and is_pack_file(base):
        raise UserError(f"{key}: {root} is a pack file (python -m facetrain.pack), not a folder: train on it with "
                        "data.source packed, or give the aligned folder it was packed from")
    if not base.is_dir():
        raise UserError(f"{key}: folder not found: {root} (expected {root}/<identity>/<image>)")
    names, paths, labels = [], [], []
    for ident in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in ident.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            continue
        names.append(ident.name)
        paths.extend(str(f) for f in files)
        labels.extend([len(names) - 1] * len(files))
    if not names:
        raise UserError(f"{key}: no identity folders with images in {root} "
                        f"(expected {root}/<identity>/<image> with one of {', '.join(IMAGE_EXTENSIONS)})")
    check_utf8_names(paths, base, key)
    return paths, np.asarray(labels, dtype=np.int64), names


def check_utf8_names(paths: list[str], root: Path, key: str) -> None:
    """Every identity and file name under `root` is text: names the file system holds as other bytes (a
    Latin-1 `é` on Linux) could not be written into reports, packs or bundles, nor printed. One line names each
    such folder or file (as bytes) and says what to do."""
    bad: dict[bytes, None] = {}  # ordered, without repeats: one entry per bad folder, not per file in it
    for p in paths:
        for part in Path(os.path.relpath(p, root)).parts:
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                bad[os.fsencode(part)] = None
                break
    if bad:
        names = [repr(b)[2:-1] for b in bad]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise UserError(f"{key}: {len(names)} folder or file name(s) under {root} are not valid UTF-8 ({shown}): "
                        "rename them to UTF-8, e.g. with convmv -f latin1 -t utf-8 -r --notest")


def folder_faceset(root: str) -> FaceSet:
    paths, labels, names = scan_identity_folder(root, "data.root")
    return FaceSet(np.asarray(labels, dtype=np.int64), names, list(paths), _PathLoader(paths), paths=paths)


class _PathLoader:
    """Picklable loader for DataLoader workers."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, i: int) -> Image.Image:
        return decode(self.paths[i])


def unlabelled_faceset(paths: list[str]) -> FaceSet:
    """Image files without identities (distill.unlabelled, data/unlabelled.py): every label -1, no names."""
    return FaceSet(np.full(len(paths), -1, dtype=np.int64), [], list(paths), _PathLoader(paths), paths=paths)


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
        value = self.ds[int(i)][self.column]
        if isinstance(value, dict):  # an undecoded datasets.Image: {"bytes", "path"}, decoded here (FORMATS only)
            value = value.get("bytes") or value.get("path")
        return decode(value)


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
    if isinstance(ds.features[cfg.image_column], datasets.Image):  # PIL in datasets would open any format
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
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


def packed_faceset(root: str | Path, image_size: int) -> FaceSet:
    """The FaceSet of pack `root` (its images at `image_size`, else a one-line error naming data.image_size)."""
    header = read_header(root)
    if header.size != image_size:
        other = pack_command(sized_name(root, image_size), header.source or "<aligned folder>", image_size)
        raise UserError(f"data.image_size: {root} holds {header.size} px images but data.image_size is "
                        f"{image_size}: set --data.image_size {header.size}, or pack the source at {image_size} px "
                        f"({other}) and train on that")
    keys = [f"{root}:{name}" for name in header.files]
    return FaceSet(np.asarray(header.labels, dtype=np.int64), list(header.identities), keys,
                   PackImages(root, header))


def _synthetic_source(cfg: DataConfig) -> FaceSet:
    return synthetic_faceset(cfg.synthetic_identities, cfg.synthetic_images_per_identity, cfg.synthetic_seed)


# data.source -> the FaceSet it names (a pack: the stored images, memory-mapped; see pack_format.py)
SOURCES: dict[str, Callable[[DataConfig], FaceSet]] = {
    "synthetic": _synthetic_source,
    "folder": lambda cfg: folder_faceset(cfg.root),
    "packed": lambda cfg: packed_faceset(cfg.root, cfg.image_size),
    "hf": hf_faceset,
}


def build_faceset(cfg: DataConfig) -> FaceSet:
    """The FaceSet of data.source (its name was checked when the config loaded)."""
    return SOURCES[cfg.source](cfg)


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
