"""A bundle -> one ONNX file that takes aligned face crops (N, H, W, 3 uint8) and returns L2-normalised embeddings.

The graph holds the bundle's mean/std normalisation, the model with BatchNorm folded into its convolutions
(`model.network.fold_batchnorm`) and, when asked, the flip test; decoding, alignment and the PIL resize stay
outside (`deploy.onnx_embedder.to_input_array`). The file's metadata is `deploy.onnx_embedder.META_FIELDS`. The
export goes through torch's exporter (dynamo), is checked with `onnx.checker`, and is run once with onnxruntime
against the PyTorch model before the file is written. The one module of deploy/ that imports torch: the service
imports it only to serve a bundle, which it exports first.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facetrain.deploy.onnx_embedder import CPU_PROVIDER, INPUT_NAME, OUTPUT_NAME, encode_metadata, import_onnxruntime
from facetrain.errors import INSTALL, UserError
from facetrain.model.bundle import load_bundle
from facetrain.model.card import CARD_KEY, build_card
from facetrain.model.files import EXPORT_FILE, resolve_model_path, without_local_paths
from facetrain.model.network import fold_batchnorm
from facetrain.runtime.atomic_dir import write_atomic

#: Smallest cosine between the PyTorch and onnxruntime embeddings of the export's self-check.
MIN_COSINE = 0.9999
#: Images of the export's self-check (random uint8 crops, seed 0).
SELF_CHECK_IMAGES = 3
#: Longest excerpt of an exporter or checker message quoted in a one-line error (characters).
QUOTE_CHARS = 240
#: Lowest opset torch's exporter writes natively (its torchlib); a lower one is a conversion that may fail.
NATIVE_OPSET = 18


def facetrain_version() -> str:
    try:
        return version("facetrain")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown"


class ExportGraph(torch.nn.Module):
    """The module that becomes the ONNX graph: uint8 NHWC crops -> normalised -> model (+ mirrored) -> L2."""

    def __init__(self, model: torch.nn.Module, pre, flip: bool):
        super().__init__()
        self.model, self.flip = model, flip
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
        # the constants of data.ToModelInput: x * (1 / (255 std)) - mean / std
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
        emb = self.model(x).float()
        if self.flip:  # as evaluation.embedding.embed_dataset: sum of the two unit embeddings, re-normalised
            emb = F.normalize(emb + self.model(torch.flip(x, dims=[3])).float(), dim=-1)
        return emb


def export_graph(model: torch.nn.Module, pre, flip: bool) -> ExportGraph:
    return ExportGraph(model, pre, flip).eval()


@contextmanager
def _quiet_exporter():
    """The exporter's progress and fallback messages (torch.onnx, onnxscript loggers) at ERROR only while it
    runs: what matters of them (an opset it could not convert to, a failure) comes back as one line."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _count_batchnorm(module) -> int:
    return sum("BatchNorm" in type(m).__name__ for m in module.modules())


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:QUOTE_CHARS]


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"facetrain.export needs the onnx package: {INSTALL['serve']}") from None
    return onnx


def _output_path(bundle: Path, output: str | Path) -> Path:
    out = Path(output) if output else bundle / EXPORT_FILE
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--output: {out} must end in .onnx")
    if not out.parent.is_dir():
        raise UserError(f"--output: folder not found: {out.parent}")
    if out.is_dir():
        raise UserError(f"--output: {out} is a folder; give the file to write, e.g. {out / EXPORT_FILE}")
    return out


def _highest_opset() -> int:
    """The newest opset the installed onnx package knows: the exporter cannot write a newer one."""
    return int(_require_onnx().defs.onnx_opset_version())


def _opset_advice() -> str:
    return f"use an --opset from {NATIVE_OPSET} to {_highest_opset()}, or leave the option out"


def _check_opset(opset: int | None) -> None:
    """Refuse, before the export runs, an opset no ONNX release has (the exporter would fail to convert to it and
    keep its own, and the message would blame the conversion)."""
    if opset is not None and not 1 <= opset <= _highest_opset():
        raise UserError(f"--opset {opset}: not an ONNX opset the installed onnx {_require_onnx().__version__} "
                        f"knows (1 to {_highest_opset()}); {_opset_advice()}")


def _to_onnx(graph: ExportGraph, size: int, opset: int | None, backbone: str):
    """The exported ModelProto, at exactly `opset` when one is asked for."""
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], external_data=False, verbose=False,
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        proto = program.model_proto
    except Exception as err:  # the exporter raises many types; the user needs the backbone and the reason
        raise UserError(f"--model: cannot export backbone {backbone!r} to ONNX"
                        f"{f' at opset {opset}' if opset else ''} ({type(err).__name__}: {_first_line(err)})") from None
    produced = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if opset is not None and produced != {opset}:
        # the exporter writes opset >= NATIVE_OPSET natively and tries a version conversion below that, keeping
        # its own opset (with a warning only) when the conversion fails
        raise UserError(f"--opset {opset}: torch's exporter could not convert the graph of {backbone!r} to opset "
                        f"{opset} (it produced {sorted(produced)}); {_opset_advice()}")
    return proto


def _metadata_fields(meta: dict, pre, flip: bool, folded: bool) -> dict:
    """The deployment facts written into the file (`onnx_embedder.META_FIELDS`)."""
    size = pre.image_size
    return {
        "facetrain_version": facetrain_version(),
        "backbone": meta["model"]["backbone"],
        "embedding_dim": int(meta["model"]["embedding_dim"]),
        "input_size": size,
        "input_layout": f"{INPUT_NAME}: N x {size} x {size} x 3 uint8 RGB (aligned face crops, resized with PIL "
                        f"bilinear); {OUTPUT_NAME}: N x D float32, L2-normalised",
        "mean": list(pre.mean), "std": list(pre.std),
        "flip_test": flip,
        "batchnorm_folded": folded,
        "alignment": meta.get("alignment"),
        "threshold": meta.get("threshold"), "threshold_far": meta.get("threshold_far"),
        "threshold_calibration": meta.get("threshold_calibration"),
        CARD_KEY: build_card(meta),  # rebuilt: a bundle from before model cards gets one here
    }


def _annotate_and_check(onnx, proto, meta: dict, fields: dict) -> None:
    for key, value in encode_metadata(meta, fields).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"facetrain embedding model {fields['backbone']} ({fields['embedding_dim']}-d), "
                        f"{fields['input_layout']}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise UserError(f"--model: the exported graph of {fields['backbone']!r} fails onnx.checker "
                        f"({_first_line(err)}); try another --opset") from None


def _self_check(ort, data: bytes, reference: ExportGraph, size: int, backbone: str) -> float:
    """onnxruntime on the serialised file against `reference` (the PyTorch model as trained, BatchNorm unfolded):
    the smallest cosine over a random batch, refused below MIN_COSINE."""
    session = ort.InferenceSession(data, providers=[CPU_PROVIDER])
    images = np.random.default_rng(0).integers(0, 256, (SELF_CHECK_IMAGES, size, size, 3), dtype=np.uint8)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    with torch.no_grad():
        want = reference(torch.from_numpy(images)).numpy()
    cosine = float((got * want).sum(axis=1).min())
    if not cosine >= MIN_COSINE:
        raise UserError(f"--model: the ONNX export of {backbone!r} does not reproduce the PyTorch embeddings (min "
                        f"cosine {cosine:.6f} < {MIN_COSINE}); try another --opset")
    return cosine


def export(model_path: str | Path, output: str | Path = "", opset: int | None = None,
           flip: bool | None = None, keep_paths: bool = False) -> dict:
    """Export a bundle (flip None: the flip test as the bundle's threshold was calibrated); returns what was
    written (the summary `facetrain.export --json` prints). keep_paths: the metadata keeps the local paths of
    the training config and the calibration (data folders, output and weight files); by default they are cut
    to their last component (`model.files.without_local_paths`), so a shipped file does not tell where the
    data lives."""
    onnx = _require_onnx()
    ort = import_onnxruntime()
    _check_opset(opset)
    path = resolve_model_path(model_path)
    out = _output_path(path, output)
    model, pre, meta = load_bundle(path)
    if not keep_paths:
        meta = without_local_paths(meta)
    if flip is None:
        flip = bool((meta.get("threshold_calibration") or {}).get("flip", False))
    folded = fold_batchnorm(model, pre.image_size)
    backbone = meta["model"]["backbone"]
    proto = _to_onnx(export_graph(folded, pre, flip), pre.image_size, opset, backbone)
    fields = _metadata_fields(meta, pre, flip, _count_batchnorm(folded) == 0 < _count_batchnorm(model))
    _annotate_and_check(onnx, proto, meta, fields)
    data = proto.SerializeToString()
    cosine = _self_check(ort, data, export_graph(model, pre, flip), pre.image_size, backbone)
    write_atomic(out, lambda tmp: tmp.write_bytes(data), "free disk space or choose another --output")
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"output": str(out), "model": str(path), "opset": opsets.get("ai.onnx"), "bytes": len(data),
            "self_check_min_cosine": cosine, **{k: fields[k] for k in ("backbone", "embedding_dim", "input_size",
                                                                      "flip_test", "batchnorm_folded", "threshold",
                                                                      "threshold_far")},
            "alignment": fields["alignment"] is not None}
