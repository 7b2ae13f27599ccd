"""Hand-edited or damaged model metadata is one line naming the file and the key, at load, never a traceback,
a silent wrong answer, or a service that starts and then answers 500 (issue 26, item 6).

The ONNX files here are tiny graphs built with the onnx package (uint8 N x 32 x 32 x 3 in, the per-channel
mean as a 3-d L2-normalised embedding out) carrying the metadata facetrain.export writes: no torch, no
training, milliseconds each. A real export's metadata is checked in test_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facetrain.errors import UserError
from facetrain.model.files import read_bundle_meta

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from facetrain.deploy.onnx_embedder import OnnxEmbedder, encode_metadata  # noqa: E402

SIZE, DIM = 32, 3
BUNDLE = {"format": "facetrain-bundle", "version": 1, "step": 4,
          "model": {"backbone": "test_efficientnet", "embedding_dim": DIM},
          "preprocess": {"image_size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
          "config": {"data": {"root": "/home/alice/faces/celebs"}, "train": {"output_dir": "runs/x"}}}
FIELDS = {"facetrain_version": "test", "backbone": "test_efficientnet", "embedding_dim": DIM, "input_size": SIZE,
          "input_layout": "images: N x 32 x 32 x 3 uint8", "mean": [0.5] * 3, "std": [0.5] * 3, "flip_test": False,
          "batchnorm_folded": False, "alignment": None, "threshold": 0.5, "threshold_far": 1e-3,
          "threshold_calibration": {"data": "/home/alice/heldout", "eval_dir": "/home/alice/runs/x/eval",
                                    "tar": 0.9}}


def tiny_onnx(path: Path, props: dict[str, str], size: int = SIZE) -> Path:
    """A valid graph with facetrain's input/output names and `props` as its metadata."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
             helper.make_node("LpNormalization", ["m"], ["embeddings"], axis=-1, p=2)]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                                            ["batch", size, size, 3])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
                              initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def good_props() -> dict[str, str]:
    return encode_metadata(dict(BUNDLE), dict(FIELDS))


def test_a_well_formed_file_loads_and_embeds(tmp_path):
    model = OnnxEmbedder.load(tiny_onnx(tmp_path / "ok.onnx", good_props()), num_workers=0)
    emb = model.run(np.full((2, SIZE, SIZE, 3), 7, dtype=np.uint8))
    assert emb.shape == (2, DIM) and np.allclose(np.linalg.norm(emb, axis=1), 1)
    assert model.meta["threshold"] == 0.5 and model.meta["preprocess"]["image_size"] == SIZE


def _with(key: str, value: str | None) -> dict[str, str]:
    props = good_props()
    if value is None:
        del props[key]
    else:
        props[key] = value
    return props


def _bundle_with(**changes) -> str:
    bundle = json.loads(good_props()["facetrain_bundle"])
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = bundle
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return json.dumps(bundle)


# (what a hand edit did to the metadata, the one line that must name it). Each of these was a traceback
# (AttributeError, KeyError, TypeError, an onnxruntime shape error per request) or, for NaN, a silent "different
# people" on today's main.
TAMPERED = {
    "bundle_empty_object": (_with("facetrain_bundle", "{}"), r"facetrain_bundle\.model\.backbone is missing"),
    "bundle_list": (_with("facetrain_bundle", "[]"), r"facetrain_bundle is a JSON list, not an object"),
    "bundle_not_json": (_with("facetrain_bundle", "{model"), r"facetrain_bundle is not valid JSON"),
    "threshold_text": (_with("threshold", '"high"'), r"metadata threshold is \"high\", expected null or a number"),
    "threshold_nan": (_with("threshold", "NaN"), r"metadata threshold is nan, expected null or a number"),
    "threshold_out_of_range": (_with("threshold", "3.5"), r"metadata threshold is 3\.5"),
    "far_zero": (_with("threshold_far", "0"), r"metadata threshold_far is 0, expected null or a number in \(0, 1\]"),
    "calibration_list": (_with("threshold_calibration", "[1]"), r"metadata threshold_calibration is \[1\]"),
    "alignment_text": (_with("alignment", '"mtcnn"'), r"metadata alignment is \"mtcnn\""),
    "flip_text": (_with("flip_test", '"yes"'), r"metadata flip_test is 'yes', expected true or false"),
    "input_size_disagrees": (_with("input_size", "64"),
                             r"metadata input_size is 64 but facetrain_bundle\.preprocess\.image_size is 32"),
    "image_size_disagrees_with_graph": (_with("facetrain_bundle", _bundle_with(preprocess__image_size=64)),
                                        r"graph's input images is tensor\(uint8\) \['batch', 32, 32, 3\], but "
                                        r"the metadata facetrain_bundle\.preprocess\.image_size says N x 64"),
    "image_size_text": (_with("facetrain_bundle", _bundle_with(preprocess__image_size="32")),
                        r"facetrain_bundle\.preprocess\.image_size is \"32\", expected a positive integer"),
    "std_zero": (_with("facetrain_bundle", _bundle_with(preprocess__std=[0, 0, 0])),
                 r"facetrain_bundle\.preprocess\.std is \[0, 0, 0\], expected .* > 0"),
    "preprocess_missing": (_with("facetrain_bundle", _bundle_with(preprocess=None)),
                           r"facetrain_bundle\.preprocess\.image_size is missing"),
    "embedding_dim_disagrees": (_with("facetrain_bundle", _bundle_with(model__embedding_dim=512)),
                                r"graph's output embeddings is \['batch', 3\], but the metadata "
                                r"facetrain_bundle\.model\.embedding_dim says N x 512"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_metadata_is_one_line_naming_the_key(tmp_path, case):
    props, message = TAMPERED[case]
    path = tiny_onnx(tmp_path / f"{case}.onnx", props)
    with pytest.raises(UserError, match=message) as err:
        OnnxEmbedder.load(path, num_workers=0)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "export the bundle again" in text


def test_commands_refuse_a_tampered_file_serve_does_not_start(tmp_path):
    """verify and identify stop with the one line; serve stops before it listens (no healthy-then-500)."""
    from PIL import Image

    from facetrain import identify, serve, verify

    path = tiny_onnx(tmp_path / "nan.onnx", _with("threshold", "NaN"))
    img = tmp_path / "a.png"
    Image.new("RGB", (SIZE, SIZE), (90, 60, 30)).save(img)
    gallery = tmp_path / "gallery" / "someone"
    gallery.mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE), (30, 60, 90)).save(gallery / "g.png")
    for main, argv in ((verify.main, [str(img), str(img)]), (identify.main, ["--gallery", str(gallery.parent),
                                                                             str(img)])):
        with pytest.raises(UserError, match="metadata threshold is nan"):
            main(["--backend", "onnxruntime", "--model", str(path), "--aligned", *argv])
    pytest.importorskip("uvicorn")
    with pytest.raises(UserError, match="metadata threshold is nan"):
        serve.main(["--model", str(path), "--aligned", "--port", "0"])


def test_bundle_metadata_is_checked_too(tmp_path):
    """A facetrain.json edited by hand: the same checks, keys named as the file spells them."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.safetensors").write_bytes(b"")
    (bundle / "facetrain.json").write_text(json.dumps({**BUNDLE, "threshold": float("nan"), "threshold_far": 1e-3}))
    with pytest.raises(UserError, match=r"facetrain\.json: metadata threshold is nan, expected null or a number"):
        read_bundle_meta(bundle)
    (bundle / "facetrain.json").write_text(json.dumps({**BUNDLE, "preprocess": {"image_size": 32}}))
    with pytest.raises(UserError, match=r"facetrain\.json: metadata preprocess\.mean is missing"):
        read_bundle_meta(bundle)


def test_provenance_keeps_names_not_local_paths():
    from facetrain.model.files import without_local_paths

    meta = without_local_paths({**BUNDLE, "threshold_calibration": FIELDS["threshold_calibration"], "path": "/x"})
    assert meta["config"]["data"]["root"] == "celebs" and meta["config"]["train"]["output_dir"] == "x"
    assert meta["threshold_calibration"] == {"data": "heldout", "eval_dir": "eval", "tar": 0.9}
    assert "path" not in meta and "/home/alice" not in json.dumps(meta)
    assert BUNDLE["config"]["data"]["root"] == "/home/alice/faces/celebs"  # the caller's copy is untouched
