"""Packed face sets: every aligned crop decoded once into one memory-mapped uint8 file (`data.source: packed`).

    python -m facetrain.pack --input /data/aligned --output /data/aligned_112.ftpack --size 112
    accelerate launch -m facetrain.train --data.source packed --data.root /data/aligned_112.ftpack \\
        --data.image_size 112

Why: a DataLoader worker spends ~0.7 ms of CPU per training image decoding a file and augmenting it with PIL
(docs/performance.md), which a GPU node's cores cannot sustain for several GPUs. A 112 px crop is 37.6 KB, so
100,000 of them are 3.7 GB: they fit in the page cache, and a batch is one gather from a memory map. With
`data.augment.on_device` (facetrain/data/device_augment.py) the augmentation runs on the training device too.

File layout (one file, so it copies to node-local disk in one step):

    bytes 0-7      MAGIC
    bytes 8-15     header length in bytes (little-endian uint64)
    header         UTF-8 JSON: format version, count, channels, size, data offset, identity names, one label
                   and one relative file name per image, the source folder, the pre-flight counts, the
                   source's alignment recipe (facetrain.align) if it has one
    padding        zeros up to `data_offset` (a multiple of 4096: a page-aligned memory map)
    data           count x channels x size x size uint8, image-major (NCHW), C order

Images are stored as `transforms.eval_transform` makes them from the file (EXIF applied, bilinear resize to size x
size, one channel when every image of the set is gray), so validation on a pack sees exactly the pixels it sees
on the folder. Opening a pack checks everything that can be checked without reading the pixels (magic,
version, header, file length against the header, labels against images and file names); each problem is a
one-line error naming the file and what to do. This module is the format alone: packer.py writes packs from
a folder, `faceset.packed_faceset` and `dataset.PackedBatches` read them for training.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from facetrain.errors import UserError

MAGIC = b"FTPACK\x00\n"
VERSION = 1
ALIGN = 4096  # data offset alignment, bytes (page size): the memory map starts on a page
SUFFIX = ".ftpack"
_PREFIX = struct.Struct("<8sQ")  # magic, header length


def pack_command(path: str | Path = "<pack>", source: str = "<aligned folder>", size: int | str = "<size>",
                 replace: bool = False) -> str:
    """The command that (re)makes pack `path`; `replace` adds --force (the pack exists and is to be rewritten)."""
    return f"python -m facetrain.pack --input {source} --output {path} --size {size}" + (" --force" if replace else "")


def repack_command(path: str | Path, header: PackHeader) -> str:
    """The command that rewrites damaged pack `path` in place from the source its header names."""
    return pack_command(path, header.source or "<aligned folder>", header.size, replace=True)


def sized_name(path: str | Path, size: int) -> Path:
    """A name for a pack of `path`'s images at another size, beside it: faces_112.ftpack -> faces_224.ftpack."""
    path = Path(path)
    stem = re.sub(r"[_-]\d+$", "", path.stem)  # drop the old size suffix, if the name has one
    sized = path.with_name(f"{stem}_{size}{path.suffix or SUFFIX}")
    return sized if sized != path else path.with_name(f"{stem}_{size}px{path.suffix or SUFFIX}")


def is_pack_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with a pack's MAGIC (a folder scan names it in its error)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass
class PackHeader:
    """What a pack's JSON header records (`read_header` checks it against the file)."""

    count: int
    channels: int
    """1 when every image of the source is single-channel (gray), else 3 (RGB)."""
    size: int
    """Side of the square images, pixels."""
    identities: list[str]
    labels: list[int]
    """Identity index per image, 0..len(identities)-1."""
    files: list[str]
    """Per image, its path relative to the source folder: `<identity>/<file>`."""
    source: str = ""
    preflight: dict = field(default_factory=dict)
    """The pre-flight counts of the source folder (facetrain/data/preflight.py)."""
    alignment: dict | None = None
    """The facetrain.align recipe of the source folder (its marker file), None for other folders: a bundle
    trained on the pack records it, as one trained on the folder does."""
    data_offset: int = 0
    version: int = VERSION

    @property
    def image_bytes(self) -> int:
        return self.channels * self.size * self.size

    @property
    def data_bytes(self) -> int:
        return self.count * self.image_bytes

    def to_json(self) -> bytes:
        return json.dumps({"format": "facetrain-pack", "version": self.version, "count": self.count,
                           "channels": self.channels, "size": self.size, "layout": "NCHW", "dtype": "uint8",
                           "data_offset": self.data_offset, "source": self.source, "preflight": self.preflight,
                           "alignment": self.alignment,
                           "identities": self.identities, "labels": self.labels, "files": self.files},
                          separators=(",", ":")).encode()


def _layout(header: PackHeader) -> bytes:
    """Prefix + header with `data_offset` set: the data starts at the next multiple of ALIGN."""
    header.data_offset = 0
    for _ in range(3):  # the offset's own digits can move the end of the header across a page boundary
        body = header.to_json()
        offset = -(-(_PREFIX.size + len(body)) // ALIGN) * ALIGN
        if offset == header.data_offset:
            break
        header.data_offset = offset
    body = header.to_json()
    return _PREFIX.pack(MAGIC, len(body)) + body


class PackWriter:
    """Writes a pack to `<path>.tmp` and renames it into place on `commit()` (a crash leaves no half pack).

    `images` is a writable memory map (count, channels, size, size) uint8; slots may be filled from threads.
    The file's whole size is reserved on disk first (`reserve`): a memory map over blocks the disk cannot
    give kills the process with SIGBUS when a page is written, with no message and the `.tmp` left behind."""

    def __init__(self, path: str | Path, header: PackHeader):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.header = header
        prefix = _layout(header)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.tmp, "wb") as fh:
                fh.write(prefix)
                reserve(fh.fileno(), header.data_offset + header.data_bytes)
        except OSError as err:
            self.abort()  # no reserved-but-empty .tmp the size of the pack left behind
            need = f", {(header.data_offset + header.data_bytes) / 2**20:,.1f} MiB needed" \
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
            raise UserError(f"--output: cannot write {self.tmp} ({err.strerror or err}{need}); choose another "
                            "--output or free disk space") from None
        shape = (header.count, header.channels, header.size, header.size)
        self.images = np.memmap(self.tmp, dtype=np.uint8, mode="r+", offset=header.data_offset, shape=shape) \
            if header.count else np.zeros(shape, dtype=np.uint8)

    def commit(self) -> Path:
        try:
            if isinstance(self.images, np.memmap):
                self.images.flush()
            del self.images
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except OSError as err:  # the caller's abort() removes the .tmp
            raise UserError(f"--output: cannot write {self.path} ({err.strerror or err}); choose another --output "
                            "or free disk space") from None
        return self.path

    def abort(self) -> None:
        self.images = None  # unmaps the file (the last reference)
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:  # a disk that went read-only: nothing more can be done about the leftover
            pass


def reserve(fd: int, size: int) -> None:
    """Extend the open file `fd` to `size` bytes with its blocks allocated now, so that a full disk is an
    OSError(ENOSPC) here, not a SIGBUS inside a memory map later. Where the system has no posix_fallocate
    (macOS, Windows) the file is only extended."""
    if hasattr(os, "posix_fallocate") and size > 0:
        os.posix_fallocate(fd, 0, size)
    os.ftruncate(fd, size)


def read_header(path: str | Path, key: str = "data.root") -> PackHeader:
    """The checked header of pack file `path`; one-line UserError (naming `key`) for anything wrong."""
    path = Path(path)
    remake = f"make one with {pack_command(path)}"
    if path.is_dir():
        raise UserError(f"{key}: {path} is a folder, not a pack file: train on it with data.source folder, or "
                        f"pack it with {pack_command(path.with_suffix(SUFFIX), path)}")
    if not path.is_file():
        raise UserError(f"{key}: pack file not found: {path} ({remake})")
    actual = path.stat().st_size
    with open(path, "rb") as fh:
        start = fh.read(_PREFIX.size)
        if len(start) < _PREFIX.size or not start.startswith(MAGIC):
            raise UserError(f"{key}: {path} is not a facetrain pack (it starts with {start[:8]!r}, a pack with "
                            f"{MAGIC!r}); give a file written by python -m facetrain.pack, or use data.source "
                            "folder for image folders")
        _, length = _PREFIX.unpack(start)
        if _PREFIX.size + length > actual:
            raise UserError(f"{key}: {path} is truncated: {actual:,} bytes, shorter than its own header "
                            f"({_PREFIX.size + length:,} bytes); repack it ({pack_command(path, replace=True)})")
        body = fh.read(length)
    try:
        meta = json.loads(body)
        if not isinstance(meta, dict):
            raise ValueError(f"the header is a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != "facetrain-pack":
            raise ValueError("format is not facetrain-pack")
        version = int(meta["version"])
        if version > VERSION:
            raise UserError(f"{key}: {path} is pack format version {version}; this facetrain reads version "
                            f"{VERSION} and older: update facetrain or repack it")
        header = PackHeader(count=int(meta["count"]), channels=int(meta["channels"]), size=int(meta["size"]),
                            identities=[str(n) for n in meta["identities"]],
                            labels=[int(v) for v in meta["labels"]], files=[str(f) for f in meta["files"]],
                            source=str(meta.get("source", "")), preflight=dict(meta.get("preflight", {})),
                            alignment=meta.get("alignment"),
                            data_offset=int(meta["data_offset"]), version=version)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{key}: {path} has a damaged header ({type(err).__name__}: {str(err)[:120]}); repack "
                        f"it ({pack_command(path, replace=True)})") from None
    if header.alignment is not None and not isinstance(header.alignment, dict):
        raise UserError(f"{key}: {path} has a damaged header (alignment is not a recipe); repack it "
                        f"({pack_command(path, replace=True)})")
    if (header.channels not in (1, 3) or header.size <= 0 or header.count < 0
            or header.data_offset < _PREFIX.size + length):  # the images start after the header
        raise UserError(f"{key}: {path} has an impossible header ({header.count} images of {header.channels} "
                        f"x {header.size} x {header.size} at byte {header.data_offset}); repack it "
                        f"({repack_command(path, header)})")
    expected = header.data_offset + header.data_bytes
    if actual != expected:
        problem = "is truncated" if actual < expected else f"has {actual - expected:,} bytes after its images"
        raise UserError(f"{key}: {path} {problem}: {actual:,} bytes, its header promises {expected:,} "
                        f"({header.count:,} images of {header.channels} x {header.size} x {header.size}); "
                        f"repack it ({repack_command(path, header)})")
    _check_labels(path, header, key)
    return header


def _check_labels(path: Path, header: PackHeader, key: str) -> None:
    """Labels must match the images: one per image, each naming an identity, and that identity the folder the
    image came from (`<identity>/<file>`)."""
    redo = f"the pack is inconsistent: repack it ({repack_command(path, header)})"
    if len(header.labels) != header.count or len(header.files) != header.count:
        raise UserError(f"{key}: {path} holds {header.count:,} images but {len(header.labels):,} labels and "
                        f"{len(header.files):,} file names; {redo}")
    labels = np.asarray(header.labels, dtype=np.int64)
    n = len(header.identities)
    if header.count and (labels.min() < 0 or labels.max() >= n):
        bad = int(np.flatnonzero((labels < 0) | (labels >= n))[0])
        raise UserError(f"{key}: {path}: image {bad} ({header.files[bad]}) has label {labels[bad]}, but the "
                        f"pack names {n} identities (0..{n - 1}); {redo}")
    for i, (label, name) in enumerate(zip(header.labels, header.files, strict=True)):
        folder = name.split("/", 1)[0]
        if folder != header.identities[label]:
            raise UserError(f"{key}: {path}: image {i} ({name}) is labelled {header.identities[label]!r}, not "
                            f"the identity of its folder {folder!r}; {redo}")
    if header.count and len(np.unique(labels)) != n:
        missing = sorted(set(range(n)) - set(np.unique(labels).tolist()))
        raise UserError(f"{key}: {path}: identity {header.identities[missing[0]]!r} has no image; {redo}")


class PackImages:
    """The images of a pack, memory-mapped read-only on first use in each process (a DataLoader worker maps
    the file itself instead of receiving a pickled copy of it). `pack(i)` returns image i as a PIL image (the
    FaceSet loader interface: validation and the PIL training path); `batch(indices)` a uint8 array."""

    def __init__(self, path: str | Path, header: PackHeader):
        self.path = str(path)
        self.shape = (header.count, header.channels, header.size, header.size)
        self.offset = header.data_offset
        self.alignment = header.alignment  # the source folder's facetrain.align recipe, for the bundle
        self._array: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=self.shape)
        return self._array

    def __call__(self, i: int) -> Image.Image:
        image = np.asarray(self.array[int(i)])
        if image.shape[0] == 1:
            return Image.fromarray(image[0], "L")
        return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), C, S, S) uint8, a copy (one fancy-index gather from the map)."""
        return self.array[np.asarray(indices, dtype=np.int64)]


__all__ = ["MAGIC", "VERSION", "SUFFIX", "PackHeader", "PackWriter", "read_header", "is_pack_file", "PackImages",
           "pack_command", "repack_command", "sized_name"]
