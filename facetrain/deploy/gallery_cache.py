"""The gallery's enrolment cache on disk: embeddings keyed so that they cannot be stale.

`cache_dir` (the commands default it to `default_cache_dir`: `$XDG_CACHE_HOME/facetrain` or `~/.cache/facetrain`,
outside the user's data; `--cache-dir` overrides) holds per (model, gallery folder)
`gallery-<model fingerprint[:16]>-<gallery path hash[:16]>.safetensors` (one tensor, "embeddings", (N, D)
float32, the usable photos in scan order) and a JSON manifest next to it: format, version, model fingerprint,
the gallery's resolved path, whether its photos were embedded as facetrain.align crops (the alignment
decision), the pre-flight's pixel limit, identity names, per file its path relative to the gallery, size and
the sha256 of its content, and the photos left out (`--bad-images skip`). A later enrolment reuses the cache
only if every one of these still matches; otherwise it embeds again and rewrites it.

Why content hashes: size + mtime (version 1) missed a swapped file that kept both, and answered with the wrong
identity. Hashing reads every file once per enrolment: measured 0.1-0.35 s for 1,000 photos of 23 KB (250 px
JPEGs, in the page cache) on this project's 2-core CPU, against 0.01-0.03 s for size + mtime and 2.7 s for
enrolling them without the cache even with timm's tiny test network (docs/evaluation.md). The path hash in the
name keeps one cache per gallery when several galleries share a `--cache-dir`. The fingerprint is the sha256 of
the weights file and of everything else that changes an embedding. Version-1 caches (in
`<gallery>/.facetrain-cache`) are never read: the gallery is embedded again into the new place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.model.files import WEIGHTS_FILE

CACHE_FORMAT = "facetrain-gallery"
CACHE_VERSION = 2  # 2: files keyed by content (sha256), the alignment decision, photos left out; 1: size + mtime
CACHE_HOME_DIR = "facetrain"  # the default cache folder under $XDG_CACHE_HOME (or ~/.cache)
LEGACY_CACHE_DIR = ".facetrain-cache"  # where version 1 wrote its caches, inside the gallery (never read now)
CACHE_TENSOR = "embeddings"  # the one tensor of the cache file
KEY_CHARS = 16  # hex characters of the model fingerprint and of the gallery path hash in the file name
HASH_CHUNK_BYTES = 1 << 20  # read size while hashing the weights and the gallery files
HASH_THREADS = 4  # gallery files hashed at a time (hashlib releases the GIL on large buffers; reads overlap)


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """`$XDG_CACHE_HOME/facetrain`, else `~/.cache/facetrain` (the XDG base-directory rule: a relative
    XDG_CACHE_HOME is ignored). `env` is the caller's environment: the commands pass os.environ, the library
    never reads it."""
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / CACHE_HOME_DIR


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(embedder) -> str:
    """sha256 of the weights file and of everything else that changes an embedding."""
    weights = embedder.path / WEIGHTS_FILE if embedder.path.is_dir() else embedder.path  # or the exported .onnx
    h = hashlib.sha256((getattr(embedder, "weights_sha256", "") or file_sha256(weights)).encode())
    extra = {"model": embedder.meta["model"], "preprocess": embedder.preprocess.to_dict(), "flip": embedder.flip,
             "precision": embedder.precision, "alignment": embedder.alignment}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _file_entry(root: Path, path: str) -> list:
    """[path relative to the gallery, size in bytes, sha256 of the content]; size and hash None when the file
    cannot be read (the pre-flight then names it; the entry matches only a cache that saw it unreadable too)."""
    rel = os.path.relpath(path, root)
    try:
        return [rel, os.path.getsize(path), file_sha256(path)]
    except OSError:
        return [rel, None, None]


def file_entries(root: Path, paths: list[str]) -> list[list]:
    """The cache key of every gallery file: its content, not its size and mtime (a swap keeping both is seen)."""
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(lambda p: _file_entry(root, p), paths))


@dataclass
class CacheFiles:
    tensors: Path
    manifest: Path

    @classmethod
    def of(cls, cache_dir: str | Path, root: Path, fingerprint: str) -> CacheFiles:
        where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()  # one cache per gallery folder
        tensors = Path(cache_dir) / f"gallery-{fingerprint[:KEY_CHARS]}-{where[:KEY_CHARS]}.safetensors"
        return cls(tensors, tensors.with_suffix(".json"))


def manifest(fingerprint: str, root: Path, model: Path, aligned_crops: bool, max_image_pixels: int,
             names: list[str], files: list[list], skipped: list[dict]) -> dict:
    """The manifest of a gallery's cache; `skipped` paths are stored relative to the gallery."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model_fingerprint": fingerprint,
            "gallery": str(root.resolve()), "model": str(model), "aligned_crops": aligned_crops,
            "max_image_pixels": max_image_pixels, "names": names, "files": files,
            "skipped": [{**b, "path": os.path.relpath(b["path"], root)} for b in skipped]}


def stale_reason(cached: dict | None, want: dict) -> str | None:
    """Why the cache `cached` (its manifest) cannot stand for `want`, or None if it can."""
    if cached is None:
        return "no cache"
    if cached.get("format") != CACHE_FORMAT or cached.get("version") != CACHE_VERSION:
        return f"cache format {cached.get('format')!r} version {cached.get('version')!r}, not {CACHE_VERSION}"
    if cached.get("model_fingerprint") != want["model_fingerprint"]:
        return "model changed"
    if cached.get("aligned_crops") != want["aligned_crops"]:
        now = "facetrain.align crops, embedded as they are" if want["aligned_crops"] else "raw photos, aligned"
        return f"alignment decision changed (now: {now})"
    if cached.get("max_image_pixels") != want["max_image_pixels"]:  # decides which photos the pre-flight refuses
        return f"--max-image-pixels changed ({cached.get('max_image_pixels')} -> {want['max_image_pixels']})"
    if cached.get("files") != want["files"] or cached.get("names") != want["names"]:
        old = {tuple(f) for f in cached.get("files") or []}
        new = {tuple(f) for f in want["files"]}
        return f"gallery changed ({len(new - old)} new or modified, {len(old - new)} removed or modified files)"
    return None


def _read_manifest(files: CacheFiles) -> tuple[dict | None, str | None]:
    if not files.manifest.is_file():
        return None, None
    try:
        data = json.loads(files.manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "unreadable manifest"
    return (data, None) if isinstance(data, dict) else (None, "unreadable manifest")


def _read_tensors(tensors_file: Path, rows: int) -> tuple[np.ndarray | None, str | None]:
    """(embeddings, None) from a cache file of `rows` rows, or (None, why not)."""
    from safetensors.numpy import load_file

    if not tensors_file.is_file():
        return None, "embeddings file missing"
    try:
        emb = load_file(str(tensors_file))[CACHE_TENSOR]
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail
        return None, f"unreadable embeddings ({type(err).__name__})"
    return (emb, None) if emb.shape[0] == rows else (None, "row count differs")


def read(files: CacheFiles, want: dict, root: Path) -> tuple[tuple[np.ndarray, list[dict]] | None, str | None]:
    """((embeddings, photos left out with full paths), None) when the cache matches `want` exactly, else
    (None, why not)."""
    cached, reason = _read_manifest(files)
    reason = reason or stale_reason(cached, want)
    if reason is not None:
        return None, reason
    skipped = [{**b, "path": str(root / b["path"])} for b in cached.get("skipped", [])]
    emb, reason = _read_tensors(files.tensors, len(want["files"]) - len(skipped))
    return (None, reason) if emb is None else ((emb, skipped), None)


def write(files: CacheFiles, emb: np.ndarray, manifest_: dict) -> None:
    """Embeddings, then the manifest, each atomically: a manifest always describes a complete embeddings file."""
    from safetensors.numpy import save_file

    files.tensors.parent.mkdir(parents=True, exist_ok=True)
    tmps = (files.tensors.with_suffix(".tmp"), files.manifest.with_suffix(".json.tmp"))
    try:
        save_file({CACHE_TENSOR: np.ascontiguousarray(emb)}, str(tmps[0]))
        os.replace(tmps[0], files.tensors)
        tmps[1].write_text(json.dumps(manifest_))
        os.replace(tmps[1], files.manifest)
    except OSError:
        for tmp in tmps:  # a full disk leaves no half-written file behind
            tmp.unlink(missing_ok=True)
        raise


def status(reason: str | None) -> str:
    """The cache status an enrolment reports: "hit", "built" or "stale: <why>, rebuilt"."""
    return "hit" if reason is None else "built" if reason == "no cache" else f"stale: {reason}, rebuilt"
