"""Embedding through onnxruntime: the deployment path for a `model.onnx` from `facetrain.export`.

Only onnxruntime, numpy and PIL are imported here, never torch, so a service or batch job needs neither
PyTorch model code nor a GPU stack to embed faces (the "serve" extra, `errors.INSTALL`). The one exception is a
model that records a face-alignment recipe and is given raw photos: the MTCNN detector of `facetrain.alignment`
runs in PyTorch (facenet-pytorch), loaded with the first photo; aligned crops (`aligned=True`) need none of
that. `facetrain.verify`, `identify` and `eval` reach this through `--backend onnxruntime`
(`evaluation.embedding.load_embedder`), the service (`deploy.app`) directly.

What happens to an image, identical to the PyTorch path (`embed.Embedder` with `data.eval_transform`):
  file or bytes -> `images.load_image` (EXIF orientation, 8-bit gray or RGB) -> the bundle's face alignment
  when the export recorded a recipe and the input is not already aligned -> PIL bilinear resize to the
  model's input size (what torchvision's Resize does to a PIL image; antialiased when shrinking) -> gray
  repeated to 3 channels -> one (H, W, 3) uint8 array. The ONNX graph does the rest: normalisation with the
  bundle's mean/std, the model, the flip test when it was exported with one, L2 normalisation.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from facetrain.alignment.check import AlignmentFailed, check_alignment, is_aligned_folder
from facetrain.alignment.recipe import align_image
from facetrain.data.images import Preprocess, load_image
from facetrain.errors import INSTALL, UserError
from facetrain.model.card import CARD_KEY, render_markdown
from facetrain.model.files import INPUT_SPEC_EXAMPLE, check_meta, resolve_onnx_path, without_local_paths
from facetrain.runtime.atomic_dir import write_atomic

INPUT_NAME = "images"  # (N, H, W, 3) uint8 RGB, N dynamic
OUTPUT_NAME = "embeddings"  # (N, D) float32, L2-normalised

# Metadata keys of an exported file (`metadata_props`, strings; JSON where the value is not a plain string).
# The bundle's own metadata (model config, preprocessing, step, training config) travels whole under
# META_BUNDLE; the keys below it are the deployment facts a reader of the file looks for, and win over it.
META_BUNDLE = "facetrain_bundle"
META_FIELDS = ("facetrain_version", "backbone", "embedding_dim", "input_size", "input_layout", "mean", "std",
               "flip_test", "batchnorm_folded", "alignment", "threshold", "threshold_far", "threshold_calibration",
               CARD_KEY)
# what facetrain.eval rewrites: the threshold and the model card that records the evaluation behind it
CALIBRATION_FIELDS = ("threshold", "threshold_far", "threshold_calibration", CARD_KEY)
# the card rendered as Markdown (JSON-encoded like every value) for people reading the file; never read back
META_CARD_MARKDOWN = "model_card_markdown"
TOP_FIELDS = (*CALIBRATION_FIELDS, "alignment")  # decoded to the top of the metadata, as in a bundle
EXPORT_AGAIN = "export the bundle again (python -m facetrain.export) instead of editing the file"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"the onnxruntime backend needs the onnxruntime package: {INSTALL['serve']}") from None
    return onnxruntime


def _props_key(keys: tuple[str, ...]) -> str:
    """How an exported file stores a metadata key: the deployment fields at the top, the rest in META_BUNDLE."""
    return keys[0] if keys[0] in TOP_FIELDS else ".".join((META_BUNDLE, *keys))


def _json_prop(props: dict[str, str], key: str, path: Path):
    try:
        return json.loads(props[key])
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: metadata {key} is not valid JSON ({err}); {EXPORT_AGAIN}") from None


def decode_metadata(props: dict[str, str], path: Path) -> dict:
    """Metadata strings of an exported file -> a dict shaped like a bundle's `facetrain.json` (model,
    preprocess, threshold, threshold_far, threshold_calibration, alignment, ...), its types and ranges checked
    (`model.files.check_meta`): a hand-edited or damaged file is one line naming the key."""
    if META_BUNDLE not in props:
        raise UserError(f"{path}: not exported by facetrain.export (metadata key {META_BUNDLE!r} missing); "
                        "export the bundle with `python -m facetrain.export --model <bundle>`, or for a third-party "
                        f"face model give facetrain.eval its input: --input-spec {INPUT_SPEC_EXAMPLE} "
                        "(from the model's documentation)")
    meta = _json_prop(props, META_BUNDLE, path)
    if not isinstance(meta, dict):
        raise UserError(f"{path}: metadata {META_BUNDLE} is a JSON {type(meta).__name__}, not an object; "
                        f"{EXPORT_AGAIN}")
    fields = {k: _json_prop(props, k, path) for k in META_FIELDS if k in props}
    meta.update({k: v for k, v in fields.items() if k in TOP_FIELDS})
    meta["export"] = {k: v for k, v in fields.items() if k not in TOP_FIELDS}
    check_meta(meta, path, _props_key, EXPORT_AGAIN)
    if not isinstance(meta["export"].get("flip_test", False), bool):
        raise UserError(f"{path}: metadata flip_test is {meta['export']['flip_test']!r}, expected true or false; "
                        f"{EXPORT_AGAIN}")
    meta["path"] = str(path)
    return meta


def check_graph(session, meta: dict, path: Path) -> None:
    """The graph's input and output agree with the metadata: N x S x S x 3 uint8 in, S the image size the
    images are resized to; N x D out, D the embedding size. A disagreement would fail on every request."""
    size, dim = meta["preprocess"]["image_size"], meta["model"]["embedding_dim"]
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise UserError(f"{path}: the graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, not "
                        f"{INPUT_NAME!r} and {OUTPUT_NAME!r}; {EXPORT_AGAIN}")
    shape, kind = list(inputs[INPUT_NAME].shape), inputs[INPUT_NAME].type
    if kind != "tensor(uint8)" or not _dims_match(shape, [None, size, size, 3]):
        raise UserError(f"{path}: the graph's input {INPUT_NAME} is {kind} {shape}, but the metadata "
                        f"{_props_key(('preprocess', 'image_size'))} says N x {size} x {size} x 3 uint8; "
                        f"{EXPORT_AGAIN}")
    stated = meta["export"].get("input_size", size)
    if stated != size:
        raise UserError(f"{path}: metadata input_size is {stated!r} but "
                        f"{_props_key(('preprocess', 'image_size'))} is {size}; {EXPORT_AGAIN}")
    out = list(outputs[OUTPUT_NAME].shape)
    if not _dims_match(out, [None, dim]):
        raise UserError(f"{path}: the graph's output {OUTPUT_NAME} is {out}, but the metadata "
                        f"{_props_key(('model', 'embedding_dim'))} says N x {dim}; {EXPORT_AGAIN}")


def _dims_match(shape: list, want: list) -> bool:
    """Static dims equal `want`'s (None: any); symbolic dims (strings, None) match anything."""
    return len(shape) == len(want) and all(w is None or not isinstance(d, int) or d == w
                                           for d, w in zip(shape, want, strict=True))


def encode_metadata(meta: dict, fields: dict) -> dict[str, str]:
    """The inverse of `decode_metadata`: bundle metadata (without the deployment fields) + those fields."""
    bundle = {k: v for k, v in meta.items() if k not in (*TOP_FIELDS, "path", "export")}
    props = {META_BUNDLE: json.dumps(bundle)}
    props.update({k: json.dumps(fields[k]) for k in META_FIELDS if k in fields})
    if isinstance(fields.get(CARD_KEY), dict):
        props[META_CARD_MARKDOWN] = json.dumps(render_markdown(fields[CARD_KEY]))
    return props


def update_metadata(path: str | Path, **fields) -> None:
    """Merge calibration fields (threshold, threshold_far, threshold_calibration, model_card) into an exported
    file's metadata, atomically: `facetrain.eval --backend onnxruntime` calibrates the file it evaluated."""
    unknown = set(fields) - set(CALIBRATION_FIELDS)
    if unknown:
        raise ValueError(f"update_metadata: only {CALIBRATION_FIELDS} can change, got {sorted(unknown)}")
    try:
        import onnx
    except ImportError:
        raise UserError(f"writing the threshold into {path} needs the onnx package: {INSTALL['serve']}") from None
    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    fields = without_local_paths(fields)  # a file that travels
    props.update({k: json.dumps(v) for k, v in fields.items()})
    if isinstance(fields.get(CARD_KEY), dict):
        props[META_CARD_MARKDOWN] = json.dumps(render_markdown(fields[CARD_KEY]))
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    write_atomic(path, lambda tmp: onnx.save(proto, str(tmp)), "make the model file's folder writable")


CPU_PROVIDER = "CPUExecutionProvider"


def new_session(source: str | bytes, path: Path, threads: int = 0, todo: str = "export the bundle again",
                config: dict[str, str] | None = None, providers: list | None = None):
    """An onnxruntime session over a file name or serialized model (`path` names it in errors); a graph
    onnxruntime refuses is one line ending with `todo`. threads: intra-op threads (0 = one per physical core);
    `config`: extra session config entries; `providers`: onnxruntime's execution providers (default: the CPU)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: a third-party graph's warnings are not the user's to fix
    # idle threads sleep instead of spinning between calls (onnxruntime's default spins): the cores go to
    # image decoding, PyTorch or other processes in between, as OMP_WAIT_POLICY=PASSIVE does for torch
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers or [CPU_PROVIDER])
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        raise UserError(f"{path}: onnxruntime cannot load this file ({type(err).__name__}: {first_line(err)}); "
                        f"{todo}") from None


def decode_workers(num_workers: int) -> int:
    """Image decoding threads: `num_workers`, or for -1 the usable CPUs minus one (at most 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return num_workers if num_workers >= 0 else max(0, min(8, cpus - 1))


def first_line(err: Exception) -> str:
    """The first line of an exception's message, at most 200 characters: for one-line errors."""
    return (str(err).strip().splitlines() or [""])[0][:200]


# ----------------------------------------------------------------------------------------------------------
# Images -> model input


def resize_to_input(img: Image.Image, size: int) -> Image.Image:
    """The resize of `data.eval_transform`: torchvision's Resize((size, size), BILINEAR, antialias=True) on a
    PIL image calls PIL's `resize((size, size), BILINEAR)`, which filters over the whole source footprint when
    shrinking (antialiased) -- the tests check the pixels are identical."""
    return img.resize((size, size), Image.BILINEAR)


def to_input_array(img: Image.Image, size: int) -> np.ndarray:
    """An 8-bit gray or RGB PIL image -> (size, size, 3) uint8. Gray is resized on its one channel, then
    repeated, as the PyTorch path does (`data.ToModelInput` broadcasts it)."""
    arr = np.asarray(resize_to_input(img, size), dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------------------
# The embedder


@dataclass
class OnnxEmbedder:
    """An exported model in an onnxruntime session, with the interface of `embed.Embedder` in numpy:
    `embed(paths)` -> (N, D) float32 L2-normalised, `.meta`, `.path`, `.flip`, `.preprocess`, `.precision`,
    `.is_main`, `.alignment`, `aligned_folder`, `last_failures`."""

    session: object
    meta: dict
    path: Path
    preprocess: Preprocess
    flip: bool
    alignment: dict | None = None
    """The recipe raw photos are aligned with; None: images are embedded as they are."""
    batch_size: int = 64
    num_workers: int = 0
    precision: str = "no"  # an fp32 graph: the PyTorch path's name for "no autocast"
    is_main: bool = True
    num_processes: int = 1
    last_failures: list[dict] = field(default_factory=list, repr=False)
    """Photos of the last `embed(..., record_failures=True)` without a usable face (index, path, reason)."""
    last_faces: list[dict] = field(default_factory=list, repr=False)
    """Photos of the last `embed` with several faces: index, path, faces, box used, why (`AlignResult.face_record`)."""
    weights_sha256: str = ""
    """sha256 of the graph file, set where the file does not outlive the session (a bundle served through a
    temporary export); "" = hash `path` when needed (`deploy.gallery_cache.model_fingerprint`)."""

    @classmethod
    def load(cls, model_path: str | Path, batch_size: int = 64, num_workers: int = -1, flip: bool | None = None,
             aligned: bool = False, threads: int = 0, providers: list | None = None) -> OnnxEmbedder:
        """flip: None = as exported; True/False must match the graph (the flip test is part of it).
        aligned=True: the images are aligned crops already (the recorded recipe is not applied). threads:
        onnxruntime's intra-op threads (0 = its default, one per physical core). num_workers: decoding
        threads (-1 = the CPU count minus one, at most 8). providers: onnxruntime's (default: the CPU)."""
        path = resolve_onnx_path(model_path)
        session = new_session(str(path), path, threads, "export the bundle again", providers=providers)
        meta = decode_metadata(session.get_modelmeta().custom_metadata_map, path)
        check_graph(session, meta, path)
        graph_flip = bool(meta["export"].get("flip_test", False))
        if flip is not None and bool(flip) != graph_flip:
            have = "with" if graph_flip else "without"
            raise UserError(f"--flip: {path} was exported {have} the flip test, which is part of its graph; "
                            f"export again with --{'' if flip else 'no-'}flip, or drop the option")
        alignment = check_alignment(meta, path, aligned)
        return cls(session, meta, path, Preprocess(**meta["preprocess"]), graph_flip, alignment, batch_size,
                   decode_workers(num_workers))

    @property
    def embedding_dim(self) -> int:
        return int(self.session.get_outputs()[0].shape[1])

    def aligned_folder(self, folder: str | Path, option: str) -> bool:
        """True when `folder` holds crops facetrain.align cut with this model's recipe (its marker file): they
        are embedded as they are. Crops cut with another recipe are refused with one line."""
        return is_aligned_folder(folder, self.alignment, option, "model")

    def prepare(self, source: str | Path | bytes | Image.Image, name: str = "image", align: bool = True,
                face: dict | None = None) -> np.ndarray:
        """One image (path, file bytes or PIL image) -> the (H, W, 3) uint8 model input. Decoding errors are
        PIL's (the caller names the source); a photo without a usable face raises AlignmentFailed. `face`, when
        given, receives which face was used (`AlignResult.face_record`) if the photo was aligned."""
        if self.alignment is None or not align:
            return to_input_array(load_image(source, keep_gray=True), self.preprocess.image_size)
        res = align_image(load_image(source), self.alignment)
        if not res.ok:
            raise AlignmentFailed(name, res.status, res.reason)
        if face is not None:
            face.update(res.face_record())
        return to_input_array(res.crop, self.preprocess.image_size)

    def _prepare_file(self, path: str, index: int, align: bool, failures: list | None, faces: list) -> np.ndarray:
        face: dict = {}
        try:
            arr = self.prepare(path, name=path, align=align, face=face)
            if face.get("faces", 0) > 1:  # list.append is atomic: the decoding threads share the list
                faces.append({"index": index, "path": path, "status": "ok", **face})
            return arr
        except AlignmentFailed as err:
            if failures is None:
                raise
            failures.append({"index": index, "path": path, "status": err.status, "reason": err.reason})
            size = self.preprocess.image_size  # a black crop in the failed photo's row; the caller drops it
            return np.zeros((size, size, 3), dtype=np.uint8)
        except UserError:
            raise
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise UserError(f"{path}: cannot decode image ({type(err).__name__}: {err}); remove or replace "
                            "the file") from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, D) float32 embeddings, in slices of at most `batch_size` images."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        out = [self.session.run([OUTPUT_NAME], {INPUT_NAME: batch[i:i + self.batch_size]})[0]
               for i in range(0, batch.shape[0], self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed(self, paths: Sequence[str], num_workers: int | None = None, align: bool = True,
              record_failures: bool = False) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of image files, in order. With workers, the next batch is
        decoded on threads (PIL releases the GIL while decoding and resizing) while the model runs on this
        one; at most two batches of pixels are held at a time. With the recorded alignment recipe (and
        align=True) the files are raw photos, aligned first; one without a usable face is a one-line error,
        or with record_failures=True a black row to drop, listed in `self.last_failures`."""
        paths = [str(p) for p in paths]
        failures: list | None = [] if record_failures else None
        faces: list = []
        workers = self.num_workers if num_workers is None else num_workers
        starts = range(0, len(paths), self.batch_size)

        def batch(start: int, submit=None):
            items = [(p, start + k, align, failures, faces)
                     for k, p in enumerate(paths[start:start + self.batch_size])]
            return [submit(self._prepare_file, *item) if submit else self._prepare_file(*item) for item in items]

        out = []
        if workers <= 0 or len(paths) <= 1:
            out = [self.run(np.stack(batch(start))) for start in starts]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                ahead = deque([batch(starts[0], pool.submit)])
                for k in range(len(starts)):
                    if k + 1 < len(starts):
                        ahead.append(batch(starts[k + 1], pool.submit))
                    out.append(self.run(np.stack([f.result() for f in ahead.popleft()])))
        self.last_failures = sorted(failures, key=lambda r: r["index"]) if failures is not None else []
        self.last_faces = sorted(faces, key=lambda r: r["index"])
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), dtype=np.float32)
