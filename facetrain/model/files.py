"""What `--model` can name, and a bundle's metadata: file names and JSON only, never torch.

A bundle is a directory: `model.safetensors` (weights only, nothing unpickled on load) and `facetrain.json`
(format tag, model config, preprocessing, calibrated threshold, training config). Training writes the best
model as `<output_dir>/bundle/`; every checkpoint directory holds the same two files, so the evaluator and
verifier accept either. `facetrain.export` turns a bundle into one `.onnx` file for the onnxruntime backend.

`resolve_model_path` is the one answer to "what can --model name?": a bundle or checkpoint directory, a
training run directory (its best model, `<run>/bundle`), or with backend "onnxruntime" an exported `.onnx`
file. The weights themselves are read and written by `model.bundle` (PyTorch); the service and the command
line use this module without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from facetrain.errors import UserError
from facetrain.runtime.atomic_dir import recover_dir

BUNDLE_FORMAT = "facetrain-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "facetrain.json"
ONNX_SUFFIX = ".onnx"
EXPORT_FILE = "model.onnx"  # facetrain.export's default output inside the bundle


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


def resolve_onnx_path(path: str | Path, option: str = "--model") -> Path:
    """An existing `.onnx` file; anything else is a one-line error saying how to get one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{option}: not found: {path}")
    if not path.is_file() or not is_onnx_file(path):
        # a bundle's own model.onnx is never picked silently: it may predate the bundle's weights or threshold
        export = path / EXPORT_FILE
        exported = f" (or give its export, {export})" if export.is_file() else ""
        raise UserError(f"{option}: {path} is not an ONNX file; the onnxruntime backend needs one: run "
                        f"`python -m facetrain.export --model {path}`{exported}, or use --backend torch for a bundle")
    return path


def resolve_model_path(path: str | Path, backend: str = "torch") -> Path:
    """A bundle or checkpoint directory; a training run directory means its best model, `<run>/bundle`.
    backend "onnxruntime": an exported `.onnx` file (`resolve_onnx_path`)."""
    if backend == "onnxruntime":
        return resolve_onnx_path(path)
    path = Path(path)
    if path.is_file() and is_onnx_file(path):
        raise UserError(f"--model: {path} is an exported ONNX file: pass --backend onnxruntime to use it, or give "
                        "the bundle it was exported from")
    if path.is_dir() and not (path / META_FILE).is_file():
        bundle = recover_dir(path / "bundle")
        if (bundle / META_FILE).is_file():
            path = bundle
    return Path(read_bundle_meta(path)["path"])  # raises a one-line error for anything else


def read_bundle_meta(path: str | Path) -> dict:
    """A bundle's or checkpoint's `facetrain.json`, with "path" set to its directory; a one-line error for
    anything that is not one."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, META_FILE):
        path = path.parent
    path = recover_dir(path)  # a kill in the middle of a bundle swap left only <path>.old
    if not path.exists():
        raise UserError(f"--model: not found: {path}")
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"--model: {path} is not a facetrain bundle or checkpoint (expected a directory with "
                        f"{META_FILE} and {WEIGHTS_FILE}, e.g. <output_dir>/bundle)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path}: corrupt metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{meta_path}: not a facetrain bundle (format tag missing)")
    if meta.get("version", 0) > BUNDLE_VERSION:
        raise UserError(f"{meta_path}: bundle version {meta['version']} is newer than this facetrain; upgrade")
    meta["path"] = str(path)
    return meta


def update_bundle_meta(path: str | Path, **fields) -> None:
    """Merge fields (e.g. the calibrated threshold) into a bundle's metadata, atomically."""
    meta = read_bundle_meta(path)
    meta.pop("path", None)
    meta.update(fields)
    target = Path(path) / META_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, target)
