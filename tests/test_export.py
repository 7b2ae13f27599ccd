"""ONNX export (facetrain.export) and the onnxruntime backend of eval / verify / identify: the preprocessing
outside the graph equals `data.eval_transform` pixel for pixel, the file carries its metadata and passes
onnx.checker with BatchNorm folded, embeddings equal the PyTorch bundle's (cosine >= 0.9999) for two backbones
at batch sizes 1 and 37 on real faces, verify decides the same on 200 pairs, and the onnxruntime path never
imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FACES, NO_SHARED_REASON, REPO, random_bundle, run_train, subprocess_env, tiny_train_config
from PIL import Image

onnx = pytest.importorskip("onnx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("onnxruntime", reason='needs the serve extra: pip install -e ".[serve]"')

from facetrain import eval as eval_cli  # noqa: E402
from facetrain import export as export_cli  # noqa: E402
from facetrain import identify, verify  # noqa: E402
from facetrain.data.images import Preprocess, load_image  # noqa: E402
from facetrain.data.transforms import eval_transform  # noqa: E402
from facetrain.deploy.export import export as export_bundle  # noqa: E402
from facetrain.deploy.onnx_embedder import OnnxEmbedder, to_input_array  # noqa: E402
from facetrain.errors import UserError  # noqa: E402
from facetrain.evaluation.embedding import load_embedder  # noqa: E402
from facetrain.model.files import read_bundle_meta, update_bundle_meta  # noqa: E402

pytestmark = [pytest.mark.faces, pytest.mark.skipif(not FACES.is_dir(), reason=NO_SHARED_REASON)]
ATT = FACES / "att_faces"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process command creates its own Accelerator, as a fresh process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def att_paths(n: int | None = None, seed: int = 0) -> list[str]:
    paths = sorted(str(p) for p in ATT.glob("*/*.png"))
    if n is None:
        return paths
    return [paths[i] for i in np.random.default_rng(seed).choice(len(paths), n, replace=False)]


_BUILT: dict[str, Path] = {}  # once per session; pytest would run a fixture imported into test_serve twice


def trained_bundle(tmp_path_factory) -> Path:
    """test_efficientnet (BatchNorm) trained 4 steps on the AT&T faces at 32 px, its threshold calibrated on them
    with the flip test (so the export puts the flip test in the graph). Built once: test_serve serves it."""
    if "bundle" in _BUILT:
        return _BUILT["bundle"]
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_train_config(tmp, {"data": {"source": "folder", "root": str(ATT), "val_identities": 6},
                                  "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "val_every": 4,
                                            "ckpt_every": 4}})
    run_train(["--config", cfg])
    bundle = tmp / "run" / "bundle"
    assert eval_cli.main(["--model", str(bundle), "--data", str(ATT), "--output", str(tmp / "eval"), "--flip",
                          "--num-workers", "0", "--no-plots", "--mixed-precision", "no"]) == 0
    meta = read_bundle_meta(bundle)
    assert meta["threshold"] is not None and meta["threshold_calibration"]["flip"] is True
    _BUILT["bundle"] = bundle
    return bundle


def trained_export(tmp_path_factory) -> Path:
    if "onnx" not in _BUILT:
        _BUILT["onnx"] = export(trained_bundle(tmp_path_factory))[0]
    return _BUILT["onnx"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    return trained_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    """timm's test_vit (LayerNorm and attention, no BatchNorm), random weights, at its 160 px."""
    return random_bundle(tmp_path_factory.mktemp("vit") / "bundle", "test_vit", 24, 160)


def export(bundle: Path, name: str = "model.onnx", **kw) -> tuple[Path, dict]:
    """facetrain.export in-process (the command line itself runs in test_export_command_line_options)."""
    out = bundle.parent / name
    return out, export_bundle(bundle, out, **kw)


@pytest.fixture(scope="session")
def trained_onnx(tmp_path_factory) -> Path:
    return trained_export(tmp_path_factory)


# ----------------------------------------------------------------------------------------------- preprocessing


def test_resize_outside_the_graph_equals_eval_transform(tmp_path):
    """Real gray faces, RGB and RGBA images, shrinking and enlarging, square and odd sizes: identical pixels."""
    rng = np.random.default_rng(0)
    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(rng.integers(0, 256, (131, 97, 3), dtype=np.uint8)).save(rgb, quality=90)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (40, 61, 4), dtype=np.uint8), "RGBA").save(rgba)
    sources = att_paths(4) + sorted(str(p) for p in (FACES / "yalefaces").glob("*/*.png"))[:2] + [str(rgb), str(rgba)]
    for path in sources:
        img = load_image(path, keep_gray=True)
        for size in (32, 57, 112, 160):
            want = eval_transform(Preprocess(size, [0.5] * 3, [0.5] * 3))(img)  # (1 or 3, H, W) uint8
            want = want.expand(3, -1, -1).permute(1, 2, 0).numpy()
            got = to_input_array(img, size)
            assert got.dtype == np.uint8 and got.shape == (size, size, 3)
            assert np.array_equal(got, want), (path, size, int(np.abs(got.astype(int) - want).max()))


# --------------------------------------------------------------------------------------------------- export


def test_export_metadata_checker_and_folded_batchnorm(trained, trained_onnx):
    meta = read_bundle_meta(trained)
    proto = onnx.load(str(trained_onnx))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["backbone"] == "test_efficientnet" and props["embedding_dim"] == 32 and props["input_size"] == 32
    assert props["mean"] == meta["preprocess"]["mean"] and props["std"] == meta["preprocess"]["std"]
    assert props["threshold"] == meta["threshold"] and props["threshold_far"] == meta["threshold_far"]
    assert props["flip_test"] is True and props["batchnorm_folded"] is True and props["alignment"] is None
    assert props["facetrain_version"] and props["facetrain_bundle"]["model"] == meta["model"]
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops, ops
    (inp,) = proto.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in proto.graph.output] == ["embeddings"]


def test_export_keeps_provenance_without_local_paths(trained, trained_onnx, tmp_path):
    """The bundle's training config and calibration name local folders; the shipped file keeps their names
    only (issue 26, item 7), unless --keep-paths."""
    meta = read_bundle_meta(trained)
    local = (str(ATT), str(trained.parent))
    assert all(path in json.dumps(meta) for path in local)
    props = {p.key: p.value for p in onnx.load(str(trained_onnx)).metadata_props}
    assert not [path for path in local if path in json.dumps(props)]
    bundle = json.loads(props["facetrain_bundle"])
    assert bundle["config"]["data"]["root"] == ATT.name and bundle["config"]["train"]["output_dir"] == "run"
    calibration = json.loads(props["threshold_calibration"])
    assert calibration["data"] == ATT.name and calibration["tar"] == meta["threshold_calibration"]["tar"]
    kept = tmp_path / "kept.onnx"
    assert export_cli.main(["--model", str(trained), "--output", str(kept), "--keep-paths"]) == 0
    props = {p.key: p.value for p in onnx.load(str(kept)).metadata_props}
    assert json.loads(props["facetrain_bundle"])["config"]["data"]["root"] == str(ATT)


def test_export_command_line_options_and_errors(trained, tmp_path, capsys):
    out = tmp_path / "no_flip.onnx"
    capsys.readouterr()
    assert export_cli.main(["--model", str(trained), "--output", str(out), "--no-flip", "--opset", "18",
                            "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == str(out) and summary["opset"] == 18 and summary["flip_test"] is False
    assert summary["self_check_min_cosine"] >= 0.9999
    assert OnnxEmbedder.load(out).flip is False
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {18}
    with pytest.raises(UserError, match=r"--output: .* must end in \.onnx"):
        export_cli.main(["--model", str(trained), "--output", str(tmp_path / "model.bin")])
    with pytest.raises(UserError, match="not a facetrain bundle"):
        export_cli.main(["--model", str(tmp_path)])
    # an opset the exporter cannot convert this graph to is refused, not silently replaced by its own
    with pytest.raises(UserError, match=r"--opset 11: .* could not convert .* use an --opset from 18 to \d+"):
        export_cli.main(["--model", str(trained), "--output", str(tmp_path / "old.onnx"), "--opset", "11"])
    assert not (tmp_path / "old.onnx").exists()


# ---------------------------------------------------------------------------------------------------- parity


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("which", ["trained", "vit"])
def test_onnxruntime_embeddings_equal_pytorch(which, request):
    bundle = request.getfixturevalue(which)
    onnx_file = export(bundle)[0] if which == "vit" else request.getfixturevalue("trained_onnx")
    paths = att_paths(37, seed=1)
    torch_emb = load_embedder("torch", bundle, batch_size=64, num_workers=0, flip=None,
                              mixed_precision="no").embed(paths).numpy()
    for batch_size in (1, 37):
        emb = OnnxEmbedder.load(onnx_file, batch_size=batch_size, num_workers=1).embed(paths)
        assert emb.shape == torch_emb.shape and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        cos = _cosines(emb, torch_emb)
        assert cos.min() >= 0.9999, (which, batch_size, cos.min())
    # the same images in another order give the same rows: nothing depends on the batch's neighbours
    again = OnnxEmbedder.load(onnx_file, batch_size=37).embed(paths[::-1])[::-1]
    assert _cosines(again, torch_emb).min() >= 0.9999


def test_verify_decides_identically_on_200_pairs(trained, trained_onnx):
    """100 genuine + 100 impostor pairs of real faces, embedded through the factory verify uses, decided at the
    bundle's calibrated threshold; then verify itself on a few pairs with both backends."""
    paths = att_paths()
    person = np.array([Path(p).parent.name for p in paths])
    rng = np.random.default_rng(7)
    pairs = []
    for genuine in [True] * 100 + [False] * 100:
        i = int(rng.integers(len(paths)))
        partners = np.flatnonzero((person == person[i]) if genuine else (person != person[i]))
        j = int(rng.choice(partners[partners != i]))
        pairs.append((i, j, genuine))
    used = sorted({k for i, j, _ in pairs for k in (i, j)})
    files = [paths[k] for k in used]
    row = {k: r for r, k in enumerate(used)}
    a = load_embedder("torch", trained, num_workers=0, flip=None, mixed_precision="no").embed(files).numpy()
    b = load_embedder("onnxruntime", trained_onnx, num_workers=0).embed(files).numpy()
    threshold = read_bundle_meta(trained)["threshold"]
    sim_a = np.array([a[row[i]] @ a[row[j]] for i, j, _ in pairs])
    sim_b = np.array([b[row[i]] @ b[row[j]] for i, j, _ in pairs])
    assert np.abs(sim_a - sim_b).max() < 1e-4
    decide_a, decide_b = sim_a >= threshold, sim_b >= threshold
    assert np.array_equal(decide_a, decide_b)
    assert 0 < decide_a.sum() < len(pairs)  # both decisions occur: the comparison can see a difference
    for i, j, _ in (pairs[0], pairs[-1]):  # one genuine, one impostor
        ta = verify.verify(str(trained), paths[i], paths[j], mixed_precision="no")
        oa = verify.verify(str(trained_onnx), paths[i], paths[j], backend="onnxruntime")
        assert ta["same"] == oa["same"] and abs(ta["similarity"] - oa["similarity"]) < 1e-4
        assert oa["threshold"] == ta["threshold"] and oa["threshold_far"] == ta["threshold_far"]
        assert oa["flip"] is True and oa["model"] == str(trained_onnx)


# ------------------------------------------------------------------------------------- eval / identify CLIs


def test_eval_and_identify_with_onnxruntime_match_pytorch(trained, trained_onnx, tmp_path, capsys):
    people = tmp_path / "people"  # 12 of the 40 AT&T identities, linked (120 images, 6,600 impostor pairs)
    people.mkdir()
    for person in sorted(p for p in ATT.iterdir() if p.is_dir())[:12]:
        (people / person.name).symlink_to(person, target_is_directory=True)
    common = ["--data", str(people), "--num-workers", "0", "--no-plots"]
    assert eval_cli.main(["--model", str(trained), "--output", str(tmp_path / "t"), "--flip", "--no-calibrate",
                          "--mixed-precision", "no", *common]) == 0
    onnx_copy = tmp_path / "copy.onnx"
    onnx_copy.write_bytes(trained_onnx.read_bytes())
    assert eval_cli.main(["--model", str(onnx_copy), "--backend", "onnxruntime", "--output", str(tmp_path / "o"),
                          "--target-far", "1e-2", *common]) == 0
    t = json.loads((tmp_path / "t" / "metrics.json").read_text())
    o = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert o["flip"] is True and o["model"] == str(onnx_copy) and o["calibration"]["written_to_bundle"]
    for key in ("auc", "eer", "tar@far=1e-02", "threshold@far=1e-02"):
        assert abs(t["metrics"][key] - o["metrics"][key]) < 1e-4, key
    # calibration went into the exported file's metadata, and verify / the service read it from there
    meta = OnnxEmbedder.load(onnx_copy).meta
    assert meta["threshold_far"] == 1e-2 and meta["threshold"] == o["calibration"]["threshold"]
    assert meta["threshold_calibration"]["flip"] is True

    probes = att_paths(3, seed=3)
    args = ["--gallery", str(people), "--no-cache", "--top-k", "3", "--json", "--num-workers", "0", *probes]
    capsys.readouterr()
    assert identify.main(["--model", str(trained), "--mixed-precision", "no", *args]) == 0
    by_torch = json.loads(capsys.readouterr().out)
    assert identify.main(["--model", str(trained_onnx), "--backend", "onnxruntime", *args]) == 0
    by_onnx = json.loads(capsys.readouterr().out)
    for pt, po in zip(by_torch["probes"], by_onnx["probes"], strict=True):
        assert [m["identity"] for m in pt["matches"]] == [m["identity"] for m in po["matches"]]
        assert np.allclose([m["score"] for m in pt["matches"]], [m["score"] for m in po["matches"]], atol=1e-4)
        assert pt["match"] == po["match"]


def test_backend_mistakes_are_one_line_errors(trained, trained_onnx, tmp_path):
    a, b = att_paths(2)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("facetrain.json", "model.safetensors"):
        (bare / name).write_bytes((trained / name).read_bytes())
    with pytest.raises(UserError, match=r"not an ONNX file.*facetrain\.export"):
        verify.main(["--model", str(bare), "--backend", "onnxruntime", a, b])
    with pytest.raises(UserError, match="pass --backend onnxruntime"):
        verify.main(["--model", str(trained_onnx), a, b])
    with pytest.raises(UserError, match="exported with the flip test"):
        verify.main(["--model", str(trained_onnx), "--backend", "onnxruntime", "--no-flip", a, b])
    with pytest.raises(UserError, match="fp32 graph"):
        verify.main(["--model", str(trained_onnx), "--backend", "onnxruntime", "--mixed-precision", "bf16", a, b])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        verify.main(["--model", str(foreign), "--backend", "onnxruntime", a, b])


# --------------------------------------------------------------------------------------------- no torch


def test_onnxruntime_path_never_imports_torch(trained_onnx):
    """A deployment embeds (and builds the service) with onnxruntime, numpy and PIL only."""
    code = f"""
import json, sys
from facetrain.deploy.onnx_embedder import OnnxEmbedder
from facetrain import serve
from facetrain.data.faceset import scan_identity_folder
from facetrain.deploy.app import build_app
from facetrain.deploy.gallery import enrol
embedder = OnnxEmbedder.load({str(trained_onnx)!r}, num_workers=2)
emb = embedder.embed({att_paths(5)!r})
build_app(embedder, enrol(embedder, {str(ATT)!r}, scan_identity_folder({str(ATT)!r}, "--gallery")))
print(json.dumps({{"shape": list(emb.shape), "torch": sorted(m for m in sys.modules if m.split('.')[0] == 'torch')}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [5, 32] and out["torch"] == []


# ---------------------------------------------------------------------------------------------- alignment


def test_recorded_alignment_is_applied_as_by_pytorch(trained, tmp_path):
    """A bundle with an alignment recipe: the export records it, and the onnxruntime path aligns raw photos
    exactly as the PyTorch path does (and skips it with aligned=True)."""
    pytest.importorskip("facenet_pytorch", reason='needs the align extra: pip install -e ".[align]"')
    from facetrain.alignment.recipe import AlignmentRecipe

    bundle = tmp_path / "aligned_bundle"
    bundle.mkdir()
    for name in ("facetrain.json", "model.safetensors"):
        (bundle / name).write_bytes((trained / name).read_bytes())
    recipe = AlignmentRecipe().to_dict()
    update_bundle_meta(bundle, alignment=recipe)
    out, summary = export(bundle, "aligned.onnx")
    assert summary["alignment"] is True
    photos = sorted(str(p) for p in (FACES / "yalefaces").glob("subject0[12]/*.png"))[:4]
    embedder = OnnxEmbedder.load(out)
    assert embedder.alignment == recipe and embedder.meta["alignment"] == recipe
    by_torch = load_embedder("torch", bundle, num_workers=0, flip=None, mixed_precision="no").embed(photos).numpy()
    assert _cosines(embedder.embed(photos), by_torch).min() >= 0.9999
    unaligned = OnnxEmbedder.load(out, aligned=True).embed(photos)
    assert _cosines(unaligned, by_torch).max() < 0.9999  # the recipe made a difference the test can see
