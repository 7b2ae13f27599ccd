"""A teacher: any face-embedding model in a file, embedding the images a student sees.

    teacher = load_teacher("face_recognition_sface_2021dec_int8bq.onnx", "size=112,order=rgb,range=0-255")
    emb = teacher.embed(images)  # (N, 3, H, W) float RGB in [0, 1], any H, W -> (N, D) float32, L2-normalised

Three kinds of file (`TEACHER_KINDS`, chosen by `teacher_kind`):
  - "onnx": a third-party ONNX model (NCHW float input). Its input (side, channel order, value range, mean/std)
    is not in the file, so the user gives it as an `InputSpec` ("size=112,order=rgb,range=0-255"), or the file
    carries one under the metadata key `INPUT_SPEC_KEY`. Generic quirks of downloaded graphs are handled in
    memory, never in the file: inputs the graph declares but no node reads are dropped, initializers that are
    also listed as inputs become constants, and a fixed batch of 1 is made dynamic when the graph then runs
    batches (otherwise the batch is run one image at a time; `notes` says which).
  - "facetrain-onnx": a `facetrain.export` file (uint8 NHWC input, its metadata says the rest).
  - "bundle": a facetrain bundle or run directory, run in PyTorch (imported only for this kind).

Everything is checked at load, each failure one line naming the file and what to do: a missing file, a file
that is not ONNX, a graph onnxruntime cannot run, more than one real input, a spec that does not fit the graph,
an output that is not an (N, D) embedding. The images are resized to the teacher's side inside `embed` (PIL
bilinear, antialiased when shrinking, as the evaluation's resize), so the training loop can hand the teacher the
very view the student sees. Torch-free at import; `embed` returns a tensor on the input's device when given one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from facetrain.deploy.input_spec import CHANNELS, SPEC_FORMS, InputSpec, parse_input_spec
from facetrain.deploy.onnx_embedder import (
    CPU_PROVIDER,
    META_BUNDLE,
    OnnxEmbedder,
    decode_workers,
    first_line,
    import_onnxruntime,
    new_session,
)
from facetrain.deploy.onnx_graph import TEACHER_TODO, check_input, drop_unused_inputs, free_batch, read_onnx
from facetrain.errors import UserError

INPUT_SPEC_KEY = "facetrain_input_spec"  # a third-party file's input spec, if someone stored it in the metadata
PROBE_BATCH = 2  # images of the load-time test run: proves a dynamic batch and the output's shape
# onnxruntime keeps DequantizeLinear nodes (for its int8 kernels) unless QDQ handling is off; off, constant
# folding turns quantized weights into fp32 once at load (bench/teacher_cost.py measures which is faster)
FOLD_QUANTIZED = {"session.disable_quant_qdq": "1"}
CUDA_PROVIDER = "CUDAExecutionProvider"  # onnxruntime-gpu's; the plain onnxruntime wheel has the CPU only


# ---------------------------------------------------------------------------------------------- images


def resize_batch(x: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float -> (N, C, size, size) float32 by PIL's bilinear resize per channel (antialiased when
    shrinking, the resize `onnx_embedder.resize_to_input` gives an 8-bit image); no copy when already there."""
    if x.shape[-2:] == (size, size):
        return np.asarray(x, dtype=np.float32)
    out = np.empty((*x.shape[:2], size, size), dtype=np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = Image.fromarray(np.asarray(x[i, c], dtype=np.float32), mode="F")
            out[i, c] = np.asarray(img.resize((size, size), Image.BILINEAR))
    return out


def _as_numpy(images) -> np.ndarray:
    """A torch tensor or array of images -> float32 numpy (N, 3, H, W); checked, since a wrong layout would give
    plausible but meaningless embeddings."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    if arr.ndim != 4 or arr.shape[1] != CHANNELS:
        raise ValueError(f"teacher.embed: images must be (N, {CHANNELS}, H, W) RGB in [0, 1], got {arr.shape}")
    return arr


def _like_input(emb: np.ndarray, images):
    """Embeddings as the caller's type: a tensor on the images' device for a tensor, else numpy."""
    if not hasattr(images, "detach"):
        return emb
    import torch

    return torch.from_numpy(emb).to(images.device)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- teachers


class Teacher(Protocol):
    """What every kind of teacher offers (the distillation losses and the training loop rely on this only)."""

    path: Path
    notes: list[str]
    """What was done to run the file (quirks handled) and, when it is not the CPU it was asked for, where it
    runs ("on cuda:0"; "on the CPU, not cuda:0: ..."), for logs; empty for a file that ran as it is."""

    @property
    def image_size(self) -> int: ...  # px: the side images are resized to inside `embed`

    @property
    def dim(self) -> int: ...  # D, the embedding size

    def embed(self, images):
        """(N, 3, H, W) float RGB in [0, 1] (numpy or torch, any H, W) -> (N, D) float32 L2-normalised, numpy
        for numpy input, a tensor on the images' device for a tensor."""


@dataclass
class OnnxTeacher:
    """A third-party ONNX model in onnxruntime. `embed(images)`: (N, 3, H, W) float RGB in [0, 1] -> (N, D)
    float32 L2-normalised; `batched` False: the graph only runs one image at a time (looped)."""

    session: object
    input_name: str
    spec: InputSpec
    path: Path
    batched: bool = True
    notes: list[str] = field(default_factory=list)
    dim: int = 0

    @property
    def image_size(self) -> int:
        return self.spec.size

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, size, size) float RGB in [0, 1] -> the raw (N, D) output, float32."""
        feed = self.spec.apply(x)
        if self.batched:
            return np.asarray(self.session.run(None, {self.input_name: feed})[0], dtype=np.float32)
        return np.concatenate([np.asarray(self.session.run(None, {self.input_name: feed[i:i + 1]})[0], np.float32)
                               for i in range(feed.shape[0])])

    def embed(self, images):
        x = resize_batch(_as_numpy(images), self.spec.size)
        return _like_input(l2_normalise(self.forward(x)) if len(x) else np.zeros((0, self.dim), np.float32),
                           images)


def _probe(teacher: OnnxTeacher) -> int:
    """Run a small batch; the output must be (N, D) with N the batch. Returns D."""
    batch = PROBE_BATCH if teacher.batched else 1
    x = np.full((batch, CHANNELS, teacher.spec.size, teacher.spec.size), 0.5, dtype=np.float32)
    try:
        out = teacher.forward(x)
    except Exception as err:  # onnxruntime's RuntimeException & co
        raise UserError(f"{teacher.path}: onnxruntime cannot run this graph on a {teacher.spec.size} px image "
                        f"({type(err).__name__}: {first_line(err)}); check --input-spec against the model's "
                        "documentation") from None
    if out.ndim != 2 or out.shape[0] != batch or out.shape[1] < 1:
        raise UserError(f"{teacher.path}: the first output is {list(out.shape)} for {batch} image(s), not an "
                        f"(N, D) embedding; {TEACHER_TODO}")
    return int(out.shape[1])


def stored_spec(proto) -> str:
    props = {p.key: p.value for p in proto.metadata_props}
    return props.get(INPUT_SPEC_KEY, "")


def onnx_providers(device: str, available: list[str]) -> tuple[list, str]:
    """(onnxruntime execution providers, note) for a teacher serving a student that trains on `device`
    ("cpu", "cuda", "cuda:1"; `available`: onnxruntime's providers). On a GPU the teacher runs there too when
    onnxruntime can: on the CPU an ONNX teacher would cost many times the student's GPU step."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return [CPU_PROVIDER], ""
    if kind != "cuda":  # mps, xpu, ...: onnxruntime's providers for them are not wired here
        return [CPU_PROVIDER], f"on the CPU, not {device}: facetrain runs ONNX teachers on CUDA GPUs or the CPU"
    if CUDA_PROVIDER not in available:
        return [CPU_PROVIDER], (f"on the CPU, not {device}: this onnxruntime has no CUDA provider (to run the "
                                "teacher on the GPU: pip uninstall onnxruntime && pip install onnxruntime-gpu)")
    return [(CUDA_PROVIDER, {"device_id": int(index or 0)}), CPU_PROVIDER], f"on {device} (onnxruntime CUDA)"


def _placed(session, device: str, wanted: list, note: str) -> list[str]:
    """The note on where the teacher runs, checked against the session: onnxruntime drops a provider it
    cannot start (CUDA libraries missing) with only a log line, so a GPU the session lacks is said here."""
    if len(wanted) > 1 and CUDA_PROVIDER not in session.get_providers():
        note = f"on the CPU, not {device}: onnxruntime could not start its CUDA provider (check its CUDA libraries)"
    return [note] if note else []


def load_onnx_teacher(path: Path, spec: InputSpec | str | None, threads: int = 0,
                      fold_quantized: bool = True, device: str = "cpu") -> OnnxTeacher:
    """A third-party ONNX file (see the module docstring). `spec` None: the file's metadata `INPUT_SPEC_KEY`."""
    proto = read_onnx(path)
    spec = spec or stored_spec(proto)
    if not spec:
        raise UserError(f"{path}: a model without facetrain metadata needs its input spec (--input-spec or the "
                        f"teacher's input_spec), {SPEC_FORMS}: see the model's documentation")
    spec = parse_input_spec(spec) if isinstance(spec, str) else spec
    notes = drop_unused_inputs(proto)
    name = check_input(proto, spec, path)
    config = FOLD_QUANTIZED if fold_quantized else None
    providers, placed = onnx_providers(device, import_onnxruntime().get_available_providers())

    def session(model: bytes):
        return new_session(model, path, threads, TEACHER_TODO, config, providers)

    fixed = proto.SerializeToString()
    if free_batch(proto):
        try:
            teacher = OnnxTeacher(session(proto.SerializeToString()), name, spec, path, True, notes)
            teacher.dim = _probe(teacher)
            teacher.notes.append("fixed batch of 1 made dynamic")
            teacher.notes += _placed(teacher.session, device, providers, placed)
            return teacher
        except UserError:  # the graph itself depends on the batch of 1 (a Reshape to 1 x ...): loop instead
            notes = [*notes, "fixed batch of 1 kept: the graph only runs one image, batches are looped"]
            teacher = OnnxTeacher(session(fixed), name, spec, path, False, notes)
    else:
        teacher = OnnxTeacher(session(fixed), name, spec, path, True, notes)
    teacher.dim = _probe(teacher)
    teacher.notes += _placed(teacher.session, device, providers, placed)
    return teacher


@dataclass
class ExportedTeacher:
    """A facetrain.export file: its graph takes (N, S, S, 3) uint8 and normalises itself (flip test included
    if it was exported with one), so images in [0, 1] are resized and quantised to 8 bits first."""

    embedder: OnnxEmbedder
    notes: list[str] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        return self.embedder.preprocess.image_size

    @property
    def dim(self) -> int:
        return self.embedder.embedding_dim

    @property
    def path(self) -> Path:
        return self.embedder.path

    def embed(self, images):
        x = resize_batch(_as_numpy(images), self.image_size)
        pixels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return _like_input(l2_normalise(self.embedder.run(np.ascontiguousarray(pixels))), images)


def load_exported_teacher(path: Path, spec, threads: int = 0, fold_quantized: bool = True,
                          device: str = "cpu") -> ExportedTeacher:
    if spec:
        raise UserError(f"{path}: a facetrain.export file states its own input in its metadata; drop the input spec")
    providers, placed = onnx_providers(device, import_onnxruntime().get_available_providers())
    embedder = OnnxEmbedder.load(path, aligned=True, threads=threads, num_workers=0, providers=providers)
    return ExportedTeacher(embedder, _placed(embedder.session, device, providers, placed))


@dataclass
class BundleTeacher:
    """A facetrain bundle in PyTorch, on the CPU unless moved: resize, the bundle's mean/std, the model."""

    model: object
    preprocess: object
    path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def dim(self) -> int:
        return int(self.model.head.out_features)

    def embed(self, images):
        import torch
        import torch.nn.functional as F

        x = images if hasattr(images, "detach") else torch.from_numpy(_as_numpy(images))
        device = next(self.model.parameters()).device
        x = x.detach().float().to(device)
        size = self.preprocess.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.preprocess.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std, device=device).view(1, -1, 1, 1)
        with torch.no_grad():
            emb = F.normalize(self.model((x - mean) / std).float(), dim=1)
        return emb.to(images.device) if hasattr(images, "detach") else emb.cpu().numpy()


def load_bundle_teacher(path: Path, spec, threads: int = 0, fold_quantized: bool = True,
                        device: str = "cpu") -> BundleTeacher:
    if spec:
        raise UserError(f"{path}: a facetrain bundle states its own input in facetrain.json; drop the input spec")
    from facetrain.model.bundle import load_bundle
    from facetrain.model.files import resolve_model_path

    model, pre, meta = load_bundle(resolve_model_path(path))
    return BundleTeacher(model.eval().to(device), pre, Path(meta["path"]), [] if device == "cpu" else [f"on {device}"])


TEACHER_KINDS = {"onnx": load_onnx_teacher, "facetrain-onnx": load_exported_teacher, "bundle": load_bundle_teacher}


def teacher_kind(path: Path) -> str:
    """"bundle" for a directory, "facetrain-onnx" for a file with facetrain.export's metadata, else "onnx"."""
    if path.is_dir():
        return "bundle"
    if not path.exists():
        raise UserError(f"{path}: not found; {TEACHER_TODO}")
    props = {p.key for p in read_onnx(path).metadata_props}
    return "facetrain-onnx" if META_BUNDLE in props else "onnx"


def load_teacher(path: str | Path, spec: InputSpec | str | None = None, threads: int = 0,
                 fold_quantized: bool = True, device: str = "cpu") -> Teacher:
    """The teacher in `path` (any of `TEACHER_KINDS`), checked by a test run. spec: the input of a third-party
    ONNX file (an InputSpec or its text form; refused for the other kinds, whose files say it). threads:
    onnxruntime's intra-op threads (0 = one per physical core). fold_quantized: int8 weights dequantized to
    fp32 once at load instead of at every run. device: where the student trains ("cpu", "cuda:0"): the
    teacher runs there too when it can (`onnx_providers`; a bundle is moved there); `notes` says where."""
    path = Path(path)
    return TEACHER_KINDS[teacher_kind(path)](path, spec, threads, fold_quantized, str(device))


def teacher_sha256(path: str | Path) -> str:
    """The sha256 that names a teacher in audit.json and the model card: of the file, or of a bundle's weights
    file (a bundle is a folder; a run or checkpoint directory names the bundle it holds)."""
    from facetrain.deploy.gallery_cache import file_sha256
    from facetrain.model.files import WEIGHTS_FILE, resolve_model_path

    path = Path(path)
    return file_sha256(resolve_model_path(path) / WEIGHTS_FILE if path.is_dir() else path)


def describe(teacher: Teacher) -> str:
    """One line for logs and reports: the file, its input, what was done to run it and (unless the CPU it was
    asked for) where it runs."""
    spec = teacher.spec.describe() if isinstance(teacher, OnnxTeacher) else f"size={teacher.image_size} (its file's)"
    notes = "; ".join(teacher.notes)
    return f"{teacher.path}: {spec}, {teacher.dim}-d" + (f" ({notes})" if notes else "")



def _file_input(path: str, size: int) -> np.ndarray:
    """One image file -> (3, size, size) float32 RGB in [0, 1], resized as the evaluation resizes."""
    from facetrain.data.images import load_image
    from facetrain.deploy.onnx_embedder import to_input_array

    return to_input_array(load_image(path), size).transpose(2, 0, 1).astype(np.float32) / 255.0


def embed_files(teacher: Teacher, paths: list[str], batch_size: int = 64, threads: int = 0,
                progress=None) -> np.ndarray:
    """(N, D) teacher embeddings of image files, in order: each batch decoded on `threads` threads (0 = the
    decode default; PIL releases the GIL) while the previous one runs; progress(done, total) after each batch."""
    from concurrent.futures import ThreadPoolExecutor

    starts = list(range(0, len(paths), batch_size))
    out = []
    with ThreadPoolExecutor(max_workers=threads or decode_workers(-1) or 1) as pool:
        def submit(start: int):
            return [pool.submit(_file_input, p, teacher.image_size) for p in paths[start:start + batch_size]]

        ahead = submit(starts[0]) if starts else []
        for k, start in enumerate(starts):
            batch = np.stack([f.result() for f in ahead])
            ahead = submit(starts[k + 1]) if k + 1 < len(starts) else []
            out.append(np.asarray(teacher.embed(batch), dtype=np.float32))
            if progress:
                progress(min(start + batch_size, len(paths)), len(paths))
    return np.concatenate(out) if out else np.zeros((0, teacher.dim), np.float32)


# ---------------------------------------------------------------------------------------------- as a baseline


@dataclass
class TeacherEmbedder(OnnxEmbedder):
    """A third-party ONNX model with `OnnxEmbedder`'s interface, so `facetrain.eval` scores it in the same
    protocols and report as a trained model: image files -> (S, S, 3) uint8 (the same decoding and resize) ->
    the teacher (flip test: plus the mirrored image's embedding, re-normalised). It only sees aligned crops:
    nothing records how its training faces were cut. Its file is never written (`meta["third_party"]`)."""

    teacher: OnnxTeacher | None = None
    crops: bool = False
    """True: the images are aligned crops (--aligned), whatever the folder."""

    @classmethod
    def from_file(cls, model_path: str | Path, spec: str, batch_size: int = 64, num_workers: int = -1,
                  flip: bool | None = None, aligned: bool = False, threads: int = 0) -> TeacherEmbedder:
        from facetrain.data.images import Preprocess

        path = Path(model_path)
        if teacher_kind(path) != "onnx":
            raise UserError(f"--input-spec: {path} is a facetrain model whose metadata states its input; drop "
                            "the option")
        teacher = load_onnx_teacher(path, spec, threads)
        meta = {"third_party": True, "input_spec": teacher.spec.describe(), "notes": teacher.notes, "step": None,
                "model": {"embedding_dim": teacher.dim}, "alignment": None}
        pre = Preprocess(teacher.spec.size, [0.0] * CHANNELS, [1.0] * CHANNELS)
        return cls(teacher.session, meta, path, pre, bool(flip), None, batch_size, decode_workers(num_workers),
                   teacher=teacher, crops=aligned)

    @property
    def embedding_dim(self) -> int:
        return self.teacher.dim

    def aligned_folder(self, folder: str | Path, option: str) -> bool:
        from facetrain.alignment.recipe import recipe_of_folder

        if self.crops or recipe_of_folder(folder) is not None:
            return True
        raise UserError(f"{option}: {folder} is not a facetrain.align folder, and a third-party model ({self.path}) "
                        "embeds aligned face crops only: align the photos first (python -m facetrain.align --size "
                        f"{self.teacher.spec.size} ...), or pass --aligned if they are aligned crops already")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, D) float32 L2-normalised, in slices of at most `batch_size` images."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            emb = l2_normalise(self.teacher.forward(x[i:i + self.batch_size]))
            if self.flip:  # the mirrored face's embedding added, as the PyTorch path's flip test does
                emb = l2_normalise(emb + l2_normalise(self.teacher.forward(x[i:i + self.batch_size, :, :, ::-1])))
            out.append(emb)
        return np.concatenate(out) if out else np.zeros((0, self.teacher.dim), np.float32)
