"""Export a bundle to one ONNX file that takes aligned face crops and returns L2-normalised embeddings.

    python -m facetrain.export --model runs/exp/bundle                          # -> runs/exp/bundle/model.onnx
    python -m facetrain.export --model runs/exp/bundle --output verifier.onnx --opset 18

The graph's input `images` is (N, H, W, 3) uint8 RGB (N dynamic; H = W = the bundle's image size), its output
`embeddings` (N, D) float32, L2-normalised: cosine similarity = dot product. Inside the graph: the bundle's
mean/std normalisation, the model with BatchNorm folded into its convolutions (`model.fold_batchnorm`), and
the flip test when the bundle's threshold was calibrated with it (`--flip/--no-flip` overrides). What stays
outside, because ONNX's Resize is not PIL's: decoding, the face alignment the bundle records, and the resize
to H x W with PIL bilinear (`onnx_runtime.to_input_array`, identical to `data.eval_transform`).

The file's metadata carries the facetrain version, backbone, embedding size, input size and layout, mean/std,
the alignment recipe, and the calibrated threshold with its FAR (`onnx_runtime.META_FIELDS`). The export goes
through torch's exporter (`torch.onnx.export`, dynamo), is checked with `onnx.checker`, and is run once with
onnxruntime against the PyTorch model before the file is written (cosine >= 0.9999 on a random batch).
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from facetrain.runtime import threads

os.environ.update(threads.wait_policy())  # before torch loads: facetrain/runtime/threads.py

from facetrain.cli import print_result, run_cli
from facetrain.errors import UserError

#: Smallest cosine between the PyTorch and onnxruntime embeddings of the export's self-check.
MIN_COSINE = 0.9999


def build_parser():
    from facetrain.cli import ArgumentParser

    p = ArgumentParser(prog="facetrain.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle or checkpoint directory (or a run directory)")
    p.add_argument("--output", default="", help="ONNX file to write (default <bundle>/model.onnx)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's recommended one)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="put the flip test in the graph (default: as used when the bundle's threshold was "
                   "calibrated)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def facetrain_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facetrain")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown"


def export_graph(model, pre, flip: bool):
    """The module that becomes the ONNX graph: uint8 NHWC crops -> normalised -> model (+ mirrored) -> L2."""
    import torch
    import torch.nn.functional as F

    class ExportGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
            # the constants of data.ToModelInput: x * (1 / (255 std)) - mean / std
            self.register_buffer("scale", 1.0 / (255.0 * std))
            self.register_buffer("shift", -mean / std)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
            emb = self.model(x).float()
            if flip:  # as embed.embed_dataset: sum of the two unit embeddings, re-normalised
                emb = F.normalize(emb + self.model(torch.flip(x, dims=[3])).float(), dim=-1)
            return emb

    return ExportGraph().eval()


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


def export(model_path: str | Path, output: str | Path = "", opset: int | None = None,
           flip: bool | None = None) -> dict:
    """Export a bundle; returns what was written (the summary `--json` prints)."""
    import numpy as np
    import torch

    from facetrain.cli import resolve_model_path
    from facetrain.deploy.onnx_embedder import INPUT_NAME, OUTPUT_NAME, encode_metadata, import_onnxruntime
    from facetrain.model.bundle import load_bundle
    from facetrain.model.network import fold_batchnorm

    try:
        import onnx
    except ImportError:
        raise UserError('facetrain.export needs the onnx package: pip install -e ".[serve]"') from None
    ort = import_onnxruntime()
    if opset is not None and opset < 1:
        raise UserError(f"--opset: must be a positive ONNX opset number, e.g. 18; got {opset}")
    path = resolve_model_path(model_path)
    out = Path(output) if output else path / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--output: {out} must end in .onnx")
    if not out.parent.is_dir():
        raise UserError(f"--output: folder not found: {out.parent}")
    model, pre, meta = load_bundle(path)
    if flip is None:
        flip = bool((meta.get("threshold_calibration") or {}).get("flip", False))
    size = pre.image_size
    folded = fold_batchnorm(model, size)
    graph = export_graph(folded, pre, flip)
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], external_data=False, verbose=False,
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        proto = program.model_proto
    except Exception as err:  # the exporter raises many types; the user needs the backbone and the reason
        first = (str(err).strip().splitlines() or [""])[0][:240]
        raise UserError(f"--model: cannot export backbone {meta['model']['backbone']!r} to ONNX"
                        f"{f' at opset {opset}' if opset else ''} ({type(err).__name__}: {first})") from None
    produced = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if opset is not None and produced != {opset}:
        # the exporter writes opset >= 18 natively and tries a version conversion below that, keeping its own
        # opset (with a warning only) when the conversion fails
        raise UserError(f"--opset {opset}: torch's exporter could not convert the graph of "
                        f"{meta['model']['backbone']!r} to opset {opset} (it produced {sorted(produced)}); use "
                        "--opset 18 or higher, or leave the option out")

    fields = {
        "facetrain_version": facetrain_version(),
        "backbone": meta["model"]["backbone"],
        "embedding_dim": int(meta["model"]["embedding_dim"]),
        "input_size": size,
        "input_layout": f"{INPUT_NAME}: N x {size} x {size} x 3 uint8 RGB (aligned face crops, resized with PIL "
                        f"bilinear); {OUTPUT_NAME}: N x D float32, L2-normalised",
        "mean": list(pre.mean), "std": list(pre.std),
        "flip_test": flip,
        "batchnorm_folded": _count_batchnorm(folded) == 0 < _count_batchnorm(model),
        "alignment": meta.get("alignment"),
        "threshold": meta.get("threshold"), "threshold_far": meta.get("threshold_far"),
        "threshold_calibration": meta.get("threshold_calibration"),
    }
    for key, value in encode_metadata(meta, fields).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"facetrain embedding model {fields['backbone']} ({fields['embedding_dim']}-d), "
                        f"{fields['input_layout']}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        first = (str(err).strip().splitlines() or [""])[0][:240]
        raise UserError(f"--model: the exported graph of {fields['backbone']!r} fails onnx.checker ({first}); "
                        "try another --opset") from None

    # self-check: onnxruntime on the serialised file against the PyTorch model as trained (BatchNorm unfolded)
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    with torch.no_grad():
        want = export_graph(model, pre, flip)(torch.from_numpy(images)).numpy()
    cosine = float((got * want).sum(axis=1).min())
    if not cosine >= MIN_COSINE:
        raise UserError(f"--model: the ONNX export of {fields['backbone']!r} does not reproduce the PyTorch "
                        f"embeddings (min cosine {cosine:.6f} < {MIN_COSINE}); try another --opset")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"output": str(out), "model": str(path), "opset": opsets.get("ai.onnx"), "bytes": len(data),
            "self_check_min_cosine": cosine, **{k: fields[k] for k in ("backbone", "embedding_dim", "input_size",
                                                                      "flip_test", "batchnorm_folded", "threshold",
                                                                      "threshold_far")},
            "alignment": fields["alignment"] is not None}


def describe(result: dict) -> str:
    threshold = (f"threshold {result['threshold']:.4f} at FAR {result['threshold_far']:.0e}"
                 if result["threshold"] is not None and result["threshold_far"] is not None else
                 "no calibrated threshold (run facetrain.eval on the bundle or the exported file)")
    return (f"wrote {result['output']} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}): "
            f"{result['backbone']}, {result['embedding_dim']}-d, input N x {result['input_size']} x "
            f"{result['input_size']} x 3 uint8, flip test {'in the graph' if result['flip_test'] else 'off'}, "
            f"BatchNorm {'folded' if result['batchnorm_folded'] else 'not folded'}, "
            f"alignment {'recorded' if result['alignment'] else 'none'}, {threshold}; onnxruntime reproduces "
            f"PyTorch to cosine >= {result['self_check_min_cosine']:.6f}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    print_result(export(args.model, args.output, args.opset, args.flip), args.json, describe)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
