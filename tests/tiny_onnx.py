"""A tiny verifier graph written with onnx.helper, in milliseconds and without torch, carrying the metadata
facetrain.export writes: for service tests and the hostile load benchmark, where what matters is the HTTP and
decoding path, not the model. Its embedding is the mean colour of each of 4 x 4 tiles, centred and
L2-normalised (N x 48 float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facetrain.deploy.onnx_embedder import INPUT_NAME, OUTPUT_NAME, encode_metadata

SIZE = 32  # input side, px
TILES = 4  # tiles per side
DIM = TILES * TILES * 3


def write_tiny_onnx(path: Path, threshold: float | None = 0.5) -> Path:
    import onnx
    from onnx import TensorProto, helper

    tile = SIZE // TILES
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "tiles_shape"], ["t"]),  # N, 4, 8, 4, 8, 3
        helper.make_node("ReduceMean", ["t", "axes"], ["m"], keepdims=0),  # N, 4, 4, 3
        helper.make_node("Reshape", ["m", "flat_shape"], ["f"]),  # N, 48
        helper.make_node("ReduceMean", ["f", "last"], ["mu"], keepdims=1),
        helper.make_node("Sub", ["f", "mu"], ["c"]),
        helper.make_node("Add", ["c", "eps"], ["ce"]),  # a flat image still has a direction
        helper.make_node("LpNormalization", ["ce"], [OUTPUT_NAME], axis=-1, p=2),
    ]
    inits = [
        helper.make_tensor("tiles_shape", TensorProto.INT64, [6], [-1, TILES, tile, TILES, tile, 3]),
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 4]),
        helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, DIM]),
        helper.make_tensor("last", TensorProto.INT64, [1], [1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [DIM], list(np.linspace(1e-3, 2e-3, DIM))),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                                                             ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {"model": {"backbone": "tiny_tiles", "embedding_dim": DIM},
            "preprocess": {"image_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3}, "step": 0}
    fields = {"facetrain_version": "test", "backbone": "tiny_tiles", "embedding_dim": DIM, "input_size": SIZE,
              "input_layout": f"{INPUT_NAME}: N x {SIZE} x {SIZE} x 3 uint8", "mean": [0.5] * 3, "std": [0.5] * 3,
              "flip_test": False, "batchnorm_folded": True, "alignment": None, "threshold": threshold,
              "threshold_far": None if threshold is None else 1e-3, "threshold_calibration": None}
    for key, value in encode_metadata(meta, fields).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, str(path))
    return path
