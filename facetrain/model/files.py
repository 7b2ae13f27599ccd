"""What `--model` can name, and a bundle's metadata: file names and JSON only, never torch.

A bundle is a directory: `model.safetensors` (weights only, nothing unpickled on load), `facetrain.json`
(format tag, model config, preprocessing, calibrated threshold, training config, model card) and
`MODEL_CARD.md` (the card rendered, `model.card`; bundles from before cards have none until evaluated).
Training writes the best model as `<output_dir>/bundle/`; every checkpoint directory holds the same files, so
the evaluator and verifier accept either. `facetrain.export` turns a bundle into one `.onnx` file for the
onnxruntime backend.

`resolve_model_path` is the one answer to "what can --model name?": a bundle or checkpoint directory, a
training run directory (its best model, `<run>/bundle`), or with backend "onnxruntime" an exported `.onnx`
file. The weights themselves are read and written by `model.bundle` (PyTorch); the service and the command
line use this module without it.

`check_meta` validates the metadata a model is used with (types, ranges, required keys): a hand-edited or
damaged `facetrain.json` or ONNX metadata is one line naming the file and the key, before anything is served
or computed with it. `without_local_paths` is what an export keeps of the training provenance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from facetrain.errors import UserError
from facetrain.model.card import CARD_FILE, CARD_KEY, render_markdown
from facetrain.runtime.atomic_dir import recover_dir, write_atomic

BUNDLE_FORMAT = "facetrain-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "facetrain.json"
ONNX_SUFFIX = ".onnx"
EXPORT_FILE = "model.onnx"  # facetrain.export's default output inside the bundle
INPUT_SPEC_EXAMPLE = "size=112,order=rgb,range=0-255"  # a third-party model's --input-spec (SFace's), in messages


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
        raise UserError(f"--model: {path} is an ONNX file: pass --backend onnxruntime to use a facetrain.export file "
                        "(or the bundle it was exported from); a third-party face model is scored by facetrain.eval "
                        f"with its input: --input-spec {INPUT_SPEC_EXAMPLE} (from the model's documentation)")
    if path.is_dir() and not (path / META_FILE).is_file():
        bundle = recover_dir(path / "bundle")
        if (bundle / META_FILE).is_file():
            path = bundle
    return Path(read_bundle_meta(path)["path"])  # raises a one-line error for anything else


def check_init_from(model_cfg) -> dict:
    """The metadata of `model.init_from` (a bundle, checkpoint or run directory) after checking that its network
    fits the config's (same backbone and embedding_dim): one line naming the key otherwise, before any data is
    read."""
    if is_onnx_file(model_cfg.init_from):  # an export holds no trainable weights
        raise UserError(f"model.init_from: {model_cfg.init_from} is an ONNX file; give the facetrain bundle it was "
                        "exported from (e.g. runs/<name>/bundle)")
    meta = check_bundle(model_cfg.init_from, "model.init_from")
    for key in ("backbone", "embedding_dim"):
        theirs, ours = meta["model"].get(key), getattr(model_cfg, key)
        if theirs != ours:
            raise UserError(f"model.init_from: {meta['path']} has model.{key} {theirs!r}, this config {ours!r}; "
                            f"set model.{key} {theirs} to fine-tune it")
    return meta


def check_bundle(path: str | Path, key: str) -> dict:
    """The metadata of the bundle, checkpoint or run directory that the setting `key` names; one line naming
    `key` otherwise."""
    try:
        return read_bundle_meta(resolve_model_path(path))
    except UserError as err:
        raise UserError(f"{key}: {str(err).removeprefix('--model: ')}") from None


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
    check_meta(meta, meta_path, ".".join, "restore the file the run wrote (python -m facetrain.eval writes the "
               "threshold)")
    meta["path"] = str(path)
    return meta


def update_bundle_meta(path: str | Path, **fields) -> None:
    """Merge fields (e.g. the calibrated threshold) into a bundle's metadata, atomically (a refused write is
    one line; the bundle keeps its old metadata). A new model card (`model_card`) is rendered into
    MODEL_CARD.md after the metadata: the JSON is the record, the Markdown its view (a kill in between leaves
    the view one step behind until the next write)."""
    meta = read_bundle_meta(path)
    meta.pop("path", None)
    meta.update(fields)
    text = json.dumps(meta, indent=2)
    todo = "make the model folder writable"
    write_atomic(Path(path) / META_FILE, lambda tmp: tmp.write_text(text), todo)
    if CARD_KEY in fields:
        card = render_markdown(fields[CARD_KEY])
        write_atomic(Path(path) / CARD_FILE, lambda tmp: tmp.write_text(card), todo)


# ----------------------------------------------------------------------------------------------------------
# Checking metadata before it is used

_MISSING = object()


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _channel_list(positive: bool) -> Callable[[object], bool]:
    """Per-channel mean or std: 1 or 3 finite numbers (std > 0: the graph divides by it)."""
    return lambda v: (isinstance(v, list) and len(v) in (1, 3) and all(_number(x) for x in v)
                      and (not positive or all(x > 0 for x in v)))


def _optional(test: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or v is _MISSING or test(v)


# (keys from the top of the metadata, test, what the value must be). The decision threshold is a cosine
# similarity, so it lies in [-1, 1]; a FAR is a rate in (0, 1]. A NaN threshold would answer "different
# people" to every pair, silently: refused here.
META_CHECKS: tuple[tuple[tuple[str, ...], Callable[[object], bool], str], ...] = (
    (("model", "backbone"), lambda v: isinstance(v, str) and bool(v), "a backbone name"),
    (("model", "embedding_dim"), _positive_int, "a positive integer"),
    (("preprocess", "image_size"), _positive_int, "a positive integer (pixels)"),
    (("preprocess", "mean"), _channel_list(False), "a list of 1 or 3 finite numbers"),
    (("preprocess", "std"), _channel_list(True), "a list of 1 or 3 finite numbers > 0"),
    (("threshold",), _optional(lambda v: _number(v) and -1 <= v <= 1), "null or a number in [-1, 1]"),
    (("threshold_far",), _optional(lambda v: _number(v) and 0 < v <= 1), "null or a number in (0, 1]"),
    (("threshold_calibration",), _optional(lambda v: isinstance(v, dict)), "null or a JSON object"),
    (("alignment",), _optional(lambda v: isinstance(v, dict)), "null or a JSON object (a facetrain.align recipe)"),
    ((CARD_KEY,), _optional(lambda v: isinstance(v, dict)), "null or a JSON object (the model card)"),
)


def _lookup(meta: dict, keys: tuple[str, ...]):
    value = meta
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _shown(value) -> str:
    if value is _MISSING:
        return "missing"
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta: dict, path: str | Path, key_name: Callable[[tuple[str, ...]], str], fix: str) -> None:
    """Every `META_CHECKS` entry of a model's metadata, or a one-line error naming the file and the key
    (`key_name` spells a key as the file stores it) and `fix` (what to do)."""
    for keys, test, expected in META_CHECKS:
        value = _lookup(meta, keys)
        if not test(value):
            raise UserError(f"{path}: metadata {key_name(keys)} is {_shown(value)}, expected {expected}; {fix}")


# ----------------------------------------------------------------------------------------------------------
# Provenance without local paths

# Metadata values that are paths on the machine that trained or calibrated the model. An export keeps their
# last component (the data set's folder name, the run's name), not where they lived.
LOCAL_PATH_KEYS = (("config", "data", "root"), ("config", "model", "pretrained_file"), ("config", "model", "init_from"),
                   ("config", "train", "output_dir"), ("config", "train", "resume"),
                   ("threshold_calibration", "data"), ("threshold_calibration", "eval_dir"))


def without_local_paths(meta: dict) -> dict:
    """A copy of a bundle's metadata with every `LOCAL_PATH_KEYS` value cut to its last path component."""
    meta = json.loads(json.dumps(meta))
    meta.pop("path", None)
    for keys in LOCAL_PATH_KEYS:
        parent = _lookup(meta, keys[:-1])
        value = parent.get(keys[-1]) if isinstance(parent, dict) else None
        if isinstance(value, str) and ("/" in value or "\\" in value):
            parent[keys[-1]] = Path(value.replace("\\", "/")).name
    return meta
