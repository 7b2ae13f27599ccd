"""Export a bundle to one ONNX file that takes aligned face crops and returns L2-normalised embeddings.

    python -m facetrain.export --model runs/exp/bundle                          # -> runs/exp/bundle/model.onnx
    python -m facetrain.export --model runs/exp/bundle --output verifier.onnx --opset 18

The graph's input `images` is (N, H, W, 3) uint8 RGB (N dynamic; H = W = the bundle's image size), its output
`embeddings` (N, D) float32, L2-normalised: cosine similarity = dot product. Inside the graph: the bundle's
mean/std normalisation, the model with BatchNorm folded into its convolutions (`model.network.fold_batchnorm`), and
the flip test when the bundle's threshold was calibrated with it (`--flip/--no-flip` overrides). What stays
outside, because ONNX's Resize is not PIL's: decoding, the face alignment the bundle records, and the resize
to H x W with PIL bilinear (`deploy.onnx_embedder.to_input_array`, identical to `data.transforms.eval_transform`).

The file's metadata carries the facetrain version, backbone, embedding size, input size and layout, mean/std,
the alignment recipe, and the calibrated threshold with its FAR (`deploy.onnx_embedder.META_FIELDS`), and the
bundle's provenance (training config, calibration) with local paths cut to their last component unless
--keep-paths. The export goes
through torch's exporter (`torch.onnx.export`, dynamo), is checked with `onnx.checker`, and is run once with
onnxruntime against the PyTorch model before the file is written (cosine >= 0.9999 on a random batch).
"""

from __future__ import annotations

import argparse
import os

from facetrain.runtime import threads

os.environ.update(threads.wait_policy())  # before torch loads: facetrain/runtime/threads.py

from facetrain.cli import print_result, run_cli  # noqa: E402


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
    p.add_argument("--keep-paths", action="store_true", help="keep the local paths of the training config and "
                   "the calibration (data folders, run and weight files) in the file's metadata; by default only "
                   "their last component is kept, so a shipped file does not say where the data lives")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


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
    from facetrain.deploy.export import export  # imports torch: after the command line parsed (--help is quick)

    print_result(export(args.model, args.output, args.opset, args.flip, args.keep_paths), args.json, describe)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
