"""Images -> L2-normalised embeddings: one path for validation, eval, verify and identify.

`embed_dataset`: batched, rank-sharded embedding of a dataset (validation during training embeds with it).
Each rank embeds a contiguous shard (`distributed.shard_range`) in batches and the shards are gathered in
order, so every rank ends with the embeddings of all images, none duplicated or dropped, whatever the count.

`Embedder`: a bundle loaded with its preprocessing, embedding lists of image files through `embed_dataset`.
eval, verify and identify embed through it (`load_embedder`, `--backend torch`, or the same interface over an
exported file in onnxruntime, `--backend onnxruntime`), so all three preprocess an image exactly as
validation during training did (`data.eval_transform` with the bundle's stored preprocessing, the same
autocast and memory layout), aligning raw photos first when the bundle has an alignment recipe.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facetrain.alignment.check import AlignmentFailed, check_alignment, is_aligned_folder  # torch-free: shared
from facetrain.data.images import Preprocess, load_image
from facetrain.data.transforms import ToModelInput, collate, eval_transform
from facetrain.errors import UserError
from facetrain.model.bundle import load_bundle
from facetrain.model.files import resolve_model_path
from facetrain.model.network import inference_model
from facetrain.runtime.distributed import gather_uneven, shard_range


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset, positions: range):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.dataset[self.positions[i]][0]


@torch.no_grad()
def embed_dataset(model: nn.Module, dataset, pre: Preprocess, batch_size: int, accelerator=None,
                  num_workers: int = 0, flip: bool = False, channels_last: bool = False) -> torch.Tensor:
    """L2-normalised embeddings (N, D) float32 on CPU for every item of `dataset` ((uint8 image, ...) tuples
    from `data.eval_transform`), normalised with `pre`'s mean/std.

    flip=True adds the embedding of the mirrored image before re-normalising (the flip test)."""
    # Never through DDP: its forward broadcasts BatchNorm buffers (a collective), so a rank with fewer batches
    # than another (or none: fewer images than processes) would leave the others waiting forever.
    model = getattr(model, "module", model)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    positions = shard_range(len(dataset), rank, world)
    loader = torch.utils.data.DataLoader(_Indexed(dataset, positions), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         collate_fn=collate)
    to_input = ToModelInput(pre, device, channels_last)
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    chunks = []
    with autocast:
        for images in loader:
            images = to_input(images)
            emb = model(images).float()
            if flip:
                emb = torch.nn.functional.normalize(emb + model(torch.flip(images, dims=[3])).float(), dim=-1)
            chunks.append(emb)
    model.train(was_training)
    dim = _output_dim(model)
    local = torch.cat(chunks) if chunks else torch.zeros((0, dim), device=device)
    if world > 1:
        local = gather_uneven(local, len(dataset), accelerator)
    return local.cpu()


def _output_dim(model: nn.Module) -> int:
    inner = getattr(model, "module", model)
    return inner.head.out_features


# ----------------------------------------------------------------------------------------------------------
# Image files through a bundle: eval, verify and identify


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (model input, position); a file that cannot be decoded is a one-line error naming it.

    alignment (a recipe dict, `alignment.AlignmentRecipe`): the files are raw photos, each cut to the face crop
    exactly as facetrain.align cut the training photos. A photo without a usable face is a one-line error
    naming it, or, with `failures` (a folder), a black crop whose position and reason are appended to
    `<failures>/<pid>.jsonl` (DataLoader workers cannot return anything else; the caller drops those rows).
    `faces` (a folder): photos with several faces get a record there too, saying which face was used."""

    def __init__(self, paths: list[str], transform, alignment: dict | None = None, failures: str | None = None,
                 faces: str | None = None):
        self.paths, self.transform = list(paths), transform
        self.alignment, self.failures, self.faces = alignment, failures, faces or failures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            img = load_image(path, keep_gray=self.alignment is None)
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            name = f"image {i} (encoded bytes)" if isinstance(path, bytes) else path  # .bin sets hold bytes
            raise UserError(f"{name}: cannot decode image ({type(err).__name__}: {err}); remove or replace "
                            "the file") from None
        if self.alignment is not None:
            img = self._align(img, path, i)
        return self.transform(img), i

    def _align(self, img, path: str, i: int):
        from PIL import Image

        from facetrain.alignment.recipe import align_image

        res = align_image(img, self.alignment)
        if res.ok:
            if res.n_faces > 1 and self.faces:
                _append_record(self.faces, {"index": i, "path": path, "status": "ok", **res.face_record()})
            return res.crop
        if self.failures is None:
            # a plain UserError: DataLoader workers re-raise an exception type from its message alone
            raise UserError(str(AlignmentFailed(path, res.status, res.reason)))
        _append_record(self.failures, {"index": i, "path": path, "status": res.status, "reason": res.reason})
        size = int(self.alignment["size"])
        return Image.new("RGB", (size, size))


def _append_record(folder: str, record: dict) -> None:
    """One alignment record into this process's file of `folder` (DataLoader workers cannot return it)."""
    with open(Path(folder) / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class Embedder:
    """A loaded model with its preprocessing, placed on this process's device, embedding lists of files."""

    model: torch.nn.Module
    preprocess: Preprocess
    meta: dict
    path: Path
    accelerator: Any
    precision: str
    batch_size: int = 64
    num_workers: int = 0
    flip: bool = False
    fold_batchnorm: bool = True
    alignment: dict | None = None
    """The bundle's alignment recipe, applied to every raw photo; None: images are embedded as they are (the
    bundle has no recipe, or --aligned said the images are crops already)."""
    _folded: torch.nn.Module | None = field(default=None, repr=False)
    last_failures: list[dict] = field(default_factory=list, repr=False)
    """Photos of the last `embed(..., record_failures=True)` without a usable face (index, path, reason)."""
    last_faces: list[dict] = field(default_factory=list, repr=False)
    """Photos of the last `embed` with several faces: index, path, faces, box used, why (`AlignResult.face_record`)."""

    @classmethod
    def load(cls, model_path: str | Path, batch_size: int = 64, num_workers: int = -1, flip: bool | None = False,
             mixed_precision: str = "auto", fold_batchnorm: bool | None = None, aligned: bool = False) -> Embedder:
        """Load a bundle/checkpoint and create the Accelerator (here, never at import: under `accelerate
        launch` this joins the process group). Precision follows the trainer's rule: bf16 autocast only where
        it is faster (GPUs; bf16-capable CPUs at >= 160 px). flip=None: the flip test if the bundle's threshold
        was calibrated with it (verify and identify then score as the threshold expects). fold_batchnorm=None:
        the bundle's model.fold_batchnorm (BatchNorm folded into the convolutions for calls of `embed` with at
        least model.FOLD_MIN_IMAGES images). aligned=True: the images are already aligned crops, so a bundle's
        alignment recipe is not applied (raw photos are aligned with it otherwise, `check_alignment`)."""
        from accelerate import Accelerator

        from facetrain.data.dataset import default_num_workers
        from facetrain.runtime.precision import resolve_mixed_precision

        path = resolve_model_path(model_path)
        model, pre, meta = load_bundle(path)
        alignment = check_alignment(meta, path, aligned)  # before the Accelerator: a missing detector fails fast
        if flip is None:
            flip = bool((meta.get("threshold_calibration") or {}).get("flip", False))
        precision = resolve_mixed_precision(mixed_precision, pre.image_size)
        accelerator = Accelerator(mixed_precision=precision)
        model = model.to(accelerator.device)
        workers = num_workers if num_workers >= 0 else default_num_workers(accelerator.num_processes)
        if fold_batchnorm is None:
            fold_batchnorm = bool(meta["model"].get("fold_batchnorm", True))
        return cls(model, pre, meta, path, accelerator, precision, batch_size, workers, flip, fold_batchnorm,
                   alignment)

    @property
    def channels_last(self) -> bool:
        return bool(self.meta["model"].get("channels_last", False))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def aligned_folder(self, folder: str | Path, option: str) -> bool:
        """True when `folder` holds crops that facetrain.align cut with this bundle's recipe (its marker file):
        they are embedded as they are. Crops cut with another recipe are refused with one line."""
        return is_aligned_folder(folder, self.alignment, option, "bundle")

    def embed(self, paths: list[str], num_workers: int | None = None, align: bool = True,
              record_failures: bool = False) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of `paths`, in order, on every rank.

        With the bundle's alignment recipe (and align=True) the files are raw photos, aligned first; a photo
        without a usable face is a one-line error, or with record_failures=True a row to drop, listed in
        `self.last_failures` (every rank gets the whole list)."""
        import shutil
        import tempfile

        alignment = self.alignment if align else None
        records = tempfile.mkdtemp(prefix="facetrain-align-") if alignment is not None else None
        failures = records if record_failures else None
        try:
            emb = self._embed(ImageFiles(paths, eval_transform(self.preprocess), alignment, failures, records),
                              num_workers)
            found = _read_failures(records, self.accelerator) if records else []
        finally:
            if records:
                shutil.rmtree(records, ignore_errors=True)
        self.last_failures = [r for r in found if r["status"] != "ok"]
        self.last_faces = [r for r in found if r["status"] == "ok"]
        return emb

    def _embed(self, dataset: ImageFiles, num_workers: int | None) -> torch.Tensor:
        paths = dataset.paths
        workers = self.num_workers if num_workers is None else num_workers
        if self._folded is None:  # once folded, every later call uses the same copy (identify: gallery, probes)
            model = inference_model(self.model, self.preprocess.image_size, len(paths), self.fold_batchnorm)
            self._folded = model if model is not self.model else None
        model = self._folded if self._folded is not None else self.model
        return embed_dataset(model, dataset, self.preprocess, self.batch_size, self.accelerator,
                             num_workers=workers, flip=self.flip, channels_last=self.channels_last)


def _read_failures(folder: str, accelerator) -> list[dict]:
    """Failure records the DataLoader workers of this rank appended, gathered from every rank, by position."""
    records = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        records += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    return sorted(records, key=lambda r: r["index"])


class _TensorOutput:
    """An embedder that returns numpy arrays (`deploy.onnx_embedder.OnnxEmbedder`, which never imports torch) as
    eval, verify and identify use `Embedder`: `embed` returns a float32 tensor, everything else is its own."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def embed(self, paths: list[str], num_workers: int | None = None, align: bool = True,
              record_failures: bool = False) -> torch.Tensor:
        return torch.from_numpy(self.inner.embed(paths, num_workers, align=align, record_failures=record_failures))


def _load_onnxruntime(model_path: str | Path, batch_size: int = 64, num_workers: int = -1,
                      flip: bool | None = None, mixed_precision: str = "auto", fold_batchnorm: bool | None = None,
                      aligned: bool = False) -> _TensorOutput:
    from facetrain.deploy.onnx_embedder import OnnxEmbedder

    if mixed_precision not in ("auto", "no"):
        raise UserError(f"--mixed-precision {mixed_precision}: the onnxruntime backend runs the exported fp32 graph "
                        "(BatchNorm folded at export); drop the option or use --backend torch")
    return _TensorOutput(OnnxEmbedder.load(model_path, batch_size, num_workers, flip, aligned=aligned))


def _load_third_party(model_path: str | Path, spec: str, batch_size: int = 64, num_workers: int = -1,
                      flip: bool | None = None, mixed_precision: str = "auto", aligned: bool = False) -> _TensorOutput:
    """A third-party ONNX face model (`deploy.teacher.TeacherEmbedder`), its input described by `spec`."""
    from facetrain.deploy.teacher import TeacherEmbedder

    if mixed_precision not in ("auto", "no"):
        raise UserError(f"--mixed-precision {mixed_precision}: a third-party ONNX model runs as its file says "
                        "(onnxruntime, fp32 input); drop the option")
    return _TensorOutput(TeacherEmbedder.from_file(model_path, spec, batch_size, num_workers, flip, aligned))


#: `--backend` of eval, verify and identify: the bundle in PyTorch, or a `facetrain.export` file in onnxruntime.
EMBEDDER_BACKENDS = {"torch": Embedder.load, "onnxruntime": _load_onnxruntime}


def load_embedder(backend: str, model_path: str | Path, batch_size: int = 64, num_workers: int = -1,
                  flip: bool | None = None, mixed_precision: str = "auto", fold_batchnorm: bool | None = None,
                  aligned: bool = False, input_spec: str = ""):
    """`Embedder.load` for backend "torch"; for "onnxruntime" the same interface over an exported file, or with
    `input_spec` over a third-party ONNX model. flip None: as the threshold was calibrated (torch) / as exported
    (onnxruntime: the flip test is part of the graph, so True/False must match it; a third-party model: off)."""
    if input_spec:
        return _load_third_party(model_path, input_spec, batch_size, num_workers, flip, mixed_precision, aligned)
    return EMBEDDER_BACKENDS[backend](model_path, batch_size, num_workers, flip, mixed_precision, fold_batchnorm,
                                      aligned=aligned)

