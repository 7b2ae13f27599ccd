"""Teachers (facetrain.deploy.teacher): any face-embedding model in a file embeds the student's images, and a
third-party ONNX model is evaluated by facetrain.eval as a baseline.

Tiny third-party graphs are written here with onnx.helper (milliseconds, no torch): each reproduces one quirk of
downloaded files (declared but unused inputs, initializers listed as inputs, a fixed batch of 1, a graph that only
runs batch 1) or one mistake (two real inputs, a non-embedding output, a spec that does not fit). Their embedding
is the mean of each channel over 4 x 4 tiles (N x 48), so the expected values are computed in numpy. The real
SFace file is used when the shared weights are present."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import FACES, SHARED, random_bundle
from PIL import Image

onnx = pytest.importorskip("onnx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("onnxruntime", reason='needs the serve extra: pip install -e ".[serve]"')

from onnx import TensorProto, helper  # noqa: E402

from facetrain import eval as eval_cli  # noqa: E402
from facetrain.deploy.input_spec import InputSpec, parse_input_spec  # noqa: E402
from facetrain.deploy.teacher import TeacherEmbedder, describe, load_teacher, onnx_providers  # noqa: E402
from facetrain.errors import UserError  # noqa: E402

SIZE = 32  # px, the tiny graphs' input side
TILES = 4
DIM = TILES * TILES * 3
SFACE = SHARED / "weights" / "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SPEC = "size=112,order=rgb,range=0-255"


def tiny_graph(path: Path, batch: int | str = "N", unused: int = 0, const_inputs: bool = False,
               batch_one_only: bool = False, rank4_output: bool = False, second_input: bool = False,
               channels: int = 3) -> Path:
    """A third-party-like NCHW float graph: output = tile means of the input (N x 48), not normalised."""
    tile = SIZE // TILES
    nodes = [helper.make_node("Reshape", ["data", "tiles"], ["t"]),  # N, C, 4, 8, 4, 8
             helper.make_node("ReduceMean", ["t", "axes"], ["m"], keepdims=0)]  # N, C, 4, 4
    out_shape = [batch, channels, TILES, TILES] if rank4_output else [batch, DIM]
    if rank4_output:
        nodes.append(helper.make_node("Identity", ["m"], ["emb"]))
    else:  # batch_one_only: a Reshape to a literal 1 x D, as some converters write
        nodes.append(helper.make_node("Reshape", ["m", "flat1" if batch_one_only else "flat"], ["emb"]))
    inits = [helper.make_tensor("tiles", TensorProto.INT64, [6], [-1, channels, TILES, tile, TILES, tile]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [3, 5]),
             helper.make_tensor("flat", TensorProto.INT64, [2], [-1, DIM]),
             helper.make_tensor("flat1", TensorProto.INT64, [2], [1, DIM])]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, channels, SIZE, SIZE])]
    inputs += [helper.make_tensor_value_info(f"conv_{k}_weight", TensorProto.FLOAT, [8, 3, 3, 3])
               for k in range(unused)]
    if const_inputs:  # initializers also declared as inputs (old exporters): constants onnxruntime cannot fold
        inputs += [helper.make_tensor_value_info(name, TensorProto.INT64, [len(v)])
                   for name, v in (("tiles", [0] * 6), ("axes", [0] * 2))]
    if second_input:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
        nodes[0] = helper.make_node("Mul", ["data", "scale"], ["scaled"])
        nodes.insert(1, helper.make_node("Reshape", ["scaled", "tiles"], ["t"]))
    graph = helper.make_graph(nodes, "third_party", inputs,
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def tile_means(x: np.ndarray) -> np.ndarray:
    n, c = x.shape[:2]
    t = x.reshape(n, c, TILES, SIZE // TILES, TILES, SIZE // TILES).mean(axis=(3, 5)).reshape(n, -1)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def images(n: int = 5, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """RGB in [0, 1] on the 8-bit grid (so an 8-bit model input loses nothing)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size)).astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------------------ input spec


def test_input_spec_parses_both_forms_and_maps_values():
    spec = parse_input_spec("size=112, order=BGR, range=0-255")
    assert spec == InputSpec(112, "bgr", (0.0, 255.0))
    x = np.zeros((1, 3, 2, 2), np.float32)
    x[:, 0] = 1.0  # red
    assert spec.apply(x)[0, :, 0, 0].tolist() == [0.0, 0.0, 255.0]  # red is the last channel in BGR
    norm = parse_input_spec("size=96,mean=0.5,std=0.5:0.25:0.5,range=-1-1")
    assert norm.value_range == (-1.0, 1.0) and norm.std == (0.5, 0.25, 0.5)
    assert np.allclose(norm.apply(np.ones((1, 3, 1, 1), np.float32))[0, :, 0, 0], [1.0, 2.0, 1.0])
    assert parse_input_spec(norm.describe()) == norm


@pytest.mark.parametrize("text,match", [
    ("order=rgb", "gives no size"), ("size=0", "positive whole number"), ("size=112,order=rbg", "rgb or bgr"),
    ("size=112,range=255", "LOW-HIGH"), ("size=112,range=255-0", "HIGH must be above"),
    ("size=112,mean=1:2", "one number or 3"), ("size=112,std=0", "all > 0"), ("size=112,gamma=2", "KEY=VALUE"),
    ("size=112,mean=a", "not a number")])
def test_malformed_input_spec_is_one_line(text, match):
    with pytest.raises(UserError, match=match) as err:
        parse_input_spec(text)
    assert "\n" not in str(err.value) and "--input-spec" in str(err.value)


# ------------------------------------------------------------------------------------------------ third-party ONNX


def test_third_party_quirks_are_handled_and_embeddings_agree(tmp_path):
    x = images()
    want = tile_means(x * 255.0)
    plain = load_teacher(tiny_graph(tmp_path / "plain.onnx"), f"size={SIZE},range=0-255")
    quirky = load_teacher(tiny_graph(tmp_path / "quirky.onnx", batch=1, unused=3, const_inputs=True),
                          f"size={SIZE},range=0-255")
    looped = load_teacher(tiny_graph(tmp_path / "looped.onnx", batch=1, batch_one_only=True),
                          f"size={SIZE},range=0-255")
    assert plain.notes == [] and plain.batched
    assert quirky.batched and any("3 declared but unused inputs" in n for n in quirky.notes)
    assert any("2 initializers listed as inputs" in n for n in quirky.notes)
    assert "fixed batch of 1 made dynamic" in quirky.notes
    assert not looped.batched and any("batches are looped" in n for n in looped.notes)
    assert "batches are looped" in describe(looped)
    for teacher in (plain, quirky, looped):
        emb = teacher.embed(x)
        assert emb.dtype == np.float32 and emb.shape == (5, DIM) and teacher.dim == DIM
        np.testing.assert_allclose(emb, want, atol=1e-5)


def test_the_teacher_follows_the_student_to_its_gpu_when_onnxruntime_can():
    """On a GPU the ONNX teacher gets onnxruntime's CUDA provider (the rank's device), else the CPU with a
    note saying why and what to install; on the CPU nothing is said."""
    cpu_only, with_cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cpu", with_cuda) == (["CPUExecutionProvider"], "")
    providers, note = onnx_providers("cuda:1", with_cuda)
    assert providers == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert note == "on cuda:1 (onnxruntime CUDA)"
    assert onnx_providers("cuda", with_cuda)[0][0] == ("CUDAExecutionProvider", {"device_id": 0})
    providers, note = onnx_providers("cuda:0", cpu_only)
    assert providers == ["CPUExecutionProvider"] and "pip uninstall onnxruntime && pip install onnxruntime-gpu" in note
    providers, note = onnx_providers("mps", with_cuda)  # no onnxruntime provider for it here: said, not silent
    assert providers == ["CPUExecutionProvider"] and note.startswith("on the CPU, not mps: ")


@pytest.mark.parametrize("kind", ["onnx", "facetrain-onnx"])
def test_a_gpu_run_whose_onnxruntime_has_no_cuda_gets_a_cpu_teacher_and_a_warning(tmp_path, kind, monkeypatch):
    """An onnxruntime without the CUDA provider (the CPU wheel): a student on cuda:0 still gets a working
    teacher, and the run's teacher line is a warning naming the fix (a CPU teacher costs many times a GPU step)."""
    import onnxruntime

    from facetrain.training.distill import teacher_line

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    if kind == "onnx":
        path, spec = tiny_graph(tmp_path / "plain.onnx"), f"size={SIZE},range=0-255"
    else:
        from tiny_onnx import write_tiny_onnx

        path, spec = write_tiny_onnx(tmp_path / "exported.onnx"), None
    on_cpu, on_gpu = load_teacher(path, spec), load_teacher(path, spec, device="cuda:0")
    x = images(3)
    np.testing.assert_allclose(on_gpu.embed(x), on_cpu.embed(x), atol=1e-6)
    assert not any(n.startswith("on ") for n in on_cpu.notes)
    assert on_gpu.notes[-1].startswith("on the CPU, not cuda:0: this onnxruntime has no CUDA provider")
    assert teacher_line(on_gpu, "cuda:0").startswith("[yellow]warning:[/] teacher: ")
    assert teacher_line(on_cpu, "cpu").startswith("teacher: ") and "pip install" in teacher_line(on_gpu, "cuda:0")


def test_a_cuda_provider_onnxruntime_could_not_start_is_said():
    """onnxruntime drops a provider it cannot start with only a log line: the session's own list decides."""
    from facetrain.deploy.teacher import _placed

    class Session:
        def __init__(self, providers):
            self.providers = providers

        def get_providers(self):
            return self.providers

    wanted = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert _placed(Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), "cuda:0", wanted, "on cuda:0") == [
        "on cuda:0"]
    assert "could not start its CUDA provider" in _placed(Session(["CPUExecutionProvider"]), "cuda:0", wanted,
                                                          "on cuda:0")[0]
    assert _placed(Session(["CPUExecutionProvider"]), "cpu", ["CPUExecutionProvider"], "") == []


def test_embed_resizes_takes_tensors_and_respects_channel_order(tmp_path):
    import torch

    path = tiny_graph(tmp_path / "t.onnx")
    rgb = load_teacher(path, f"size={SIZE}")
    bgr = load_teacher(path, f"size={SIZE},order=bgr")
    x = images()
    np.testing.assert_allclose(bgr.embed(x), rgb.embed(x[:, ::-1].copy()), atol=1e-6)
    big = images(2, size=2 * SIZE)  # the student's view at another size: resized inside
    out = rgb.embed(torch.from_numpy(big))
    assert isinstance(out, torch.Tensor) and out.shape == (2, DIM) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert rgb.embed(np.zeros((0, 3, SIZE, SIZE), np.float32)).shape == (0, DIM)


def test_a_spec_stored_in_the_files_metadata_is_used(tmp_path):
    from facetrain.deploy.teacher import INPUT_SPEC_KEY

    path = tiny_graph(tmp_path / "with_spec.onnx")
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=INPUT_SPEC_KEY, value=f"size={SIZE},order=bgr,range=0-255")
    onnx.save(proto, str(path))
    teacher = load_teacher(path)
    assert teacher.spec == InputSpec(SIZE, "bgr", (0.0, 255.0))
    x = images(2)
    np.testing.assert_allclose(teacher.embed(x), tile_means(x[:, ::-1] * 255.0), atol=1e-5)


@pytest.mark.parametrize("build,spec,match", [
    (lambda p: tiny_graph(p, second_input=True), f"size={SIZE}", "one image input, this graph needs 2"),
    (lambda p: tiny_graph(p, rank4_output=True), f"size={SIZE}", r"not an \(N, D\) embedding"),
    (lambda p: tiny_graph(p), "size=112", f"input data is \\['N', 3, {SIZE}, {SIZE}\\].*N x 3 x 112 x 112"),
    (lambda p: tiny_graph(p, channels=1), f"size={SIZE}", "N x 3 x"),
    (lambda p: tiny_graph(p), "", "needs its input spec"),
    (lambda p: p.write_bytes(b"\x08\x07 not a protobuf \xff" * 10) and p, f"size={SIZE}", "not an ONNX model"),
    (lambda p: p, f"size={SIZE}", "not found"),
])
def test_bad_teacher_files_are_one_line(tmp_path, build, spec, match):
    path = build(tmp_path / "bad.onnx")
    with pytest.raises(UserError, match=match) as err:
        load_teacher(path, spec or None)
    assert "\n" not in str(err.value) and str(tmp_path / "bad.onnx") in str(err.value)


# ------------------------------------------------------------------------------------------------ facetrain files


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """timm's test_efficientnet with random weights at 32 px (written in a fraction of a second)."""
    return random_bundle(tmp_path_factory.mktemp("teacher") / "bundle", "test_efficientnet", 16, SIZE)


def test_bundle_teacher_is_the_bundles_model(tiny_bundle):
    import torch

    from facetrain.model.bundle import load_bundle

    teacher = load_teacher(tiny_bundle)
    model, pre, _ = load_bundle(tiny_bundle)
    x = images(4)
    with torch.no_grad():
        mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
        want = torch.nn.functional.normalize(model.eval()((torch.from_numpy(x) - mean) / std), dim=1).numpy()
    emb = teacher.embed(x)
    assert emb.dtype == np.float32 and teacher.dim == 16 and teacher.image_size == SIZE
    np.testing.assert_allclose(emb, want, atol=1e-5)
    assert teacher.embed(torch.from_numpy(images(2, size=48))).shape == (2, 16)  # resized inside
    with pytest.raises(UserError, match="drop the input spec"):
        load_teacher(tiny_bundle, "size=32")


def test_facetrain_export_teacher_reads_its_metadata(tmp_path):
    from tiny_onnx import SIZE as TINY_SIZE
    from tiny_onnx import write_tiny_onnx

    path = write_tiny_onnx(tmp_path / "exported.onnx")
    teacher = load_teacher(path)
    x = images(3, size=TINY_SIZE)
    tiles = (np.rint(x * 255)).transpose(0, 2, 3, 1).reshape(3, TILES, TINY_SIZE // TILES, TILES,
                                                               TINY_SIZE // TILES, 3).mean(axis=(2, 4)).reshape(3, -1)
    centred = tiles - tiles.mean(axis=1, keepdims=True) + np.linspace(1e-3, 2e-3, DIM)  # tiny_onnx's graph
    np.testing.assert_allclose(teacher.embed(x), centred / np.linalg.norm(centred, axis=1, keepdims=True),
                               atol=1e-5)
    with pytest.raises(UserError, match="drop the input spec"):
        load_teacher(path, "size=32")


@pytest.mark.slow  # torch.onnx.export of the tiny network: ~15 s idle, a minute on a loaded 2-core machine
def test_bundle_and_its_export_embed_alike(tiny_bundle):
    from facetrain.deploy.export import export

    exported = tiny_bundle.parent / "model.onnx"
    export(tiny_bundle, exported, flip=False)
    from_bundle, from_onnx = load_teacher(tiny_bundle), load_teacher(exported)
    assert from_bundle.dim == from_onnx.dim == 16 and from_bundle.image_size == from_onnx.image_size == SIZE
    x = images(6)
    a, b = from_bundle.embed(x), from_onnx.embed(x)
    assert a.shape == b.shape == (6, 16) and a.dtype == b.dtype == np.float32
    assert (a * b).sum(axis=1).min() > 0.9999  # the same model: the export's fold and fp32 rounding only


# ------------------------------------------------------------------------------------------------ as a baseline


def write_crops(root: Path, people: int = 4, per_person: int = 4) -> Path:
    """Aligned-crop stand-ins: each person a colour layout, each image that layout plus noise."""
    rng = np.random.default_rng(1)
    for p in range(people):
        base = rng.integers(0, 256, (TILES, TILES, 3))
        for k in range(per_person):
            img = np.kron(base, np.ones((SIZE // TILES, SIZE // TILES, 1))) + rng.normal(0, 20, (SIZE, SIZE, 3))
            (root / f"p{p}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"p{p}" / f"{k}.png")
    return root


def test_eval_scores_a_third_party_model_and_never_writes_it(tmp_path, capsys):
    model = tiny_graph(tmp_path / "download.onnx", batch=1, unused=2)
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    data = write_crops(tmp_path / "crops")
    args = ["--model", str(model), "--data", str(data), "--num-workers", "0", "--no-plots"]
    spec = ["--input-spec", f"size={SIZE},order=rgb,range=0-255"]
    assert eval_cli.main([*args, *spec, "--aligned", "--flip", "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["auc"] > 0.99 and report["flip"] is True
    assert report["model_input_spec"] == f"size={SIZE},order=rgb,range=0-255"
    assert report["calibration"]["written_to_bundle"] is False
    assert "metrics.json only" in report["calibration"]["note"]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    for extra, match in ((["--aligned"], "--input-spec size=112"),  # no spec: refused by the default torch backend
                         (["--aligned", "--backend", "onnxruntime"], "--input-spec size=112"),  # and by onnxruntime
                         ([*spec], "not a facetrain.align folder"),  # raw photos: refused
                         (["--input-spec", "size=32,range=x", "--aligned"], "range=x")):
        with pytest.raises(UserError, match=match) as err:
            eval_cli.main([*args, *extra, "--output", str(tmp_path / "refused")])
        assert "\n" not in str(err.value)


def test_teacher_embedder_flip_is_the_mirrored_images_added(tmp_path):
    model = tiny_graph(tmp_path / "m.onnx")
    plain = TeacherEmbedder.from_file(model, f"size={SIZE}", num_workers=0, aligned=True)
    flip = TeacherEmbedder.from_file(model, f"size={SIZE}", num_workers=0, flip=True, aligned=True)
    pixels = (images(3) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    a, m = plain.run(pixels), plain.run(np.ascontiguousarray(pixels[:, :, ::-1]))
    want = (a + m) / np.linalg.norm(a + m, axis=1, keepdims=True)
    np.testing.assert_allclose(flip.run(pixels), want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the real file


@pytest.mark.skipif(not SFACE.is_file() or not FACES.is_dir(),
                    reason=f"the shared SFace weights or faces are not at {SFACE} / {FACES} (only inside the "
                    "facetrain workplace)")
def test_sface_separates_att_faces():
    teacher = load_teacher(SFACE, SFACE_SPEC, threads=1)
    assert teacher.dim == 128 and teacher.batched and any("29 declared but unused" in n for n in teacher.notes)
    people, per_person = 4, 3
    files = [FACES / "att_faces" / f"s{p}" / f"{k}.png" for p in range(1, people + 1)
             for k in range(1, per_person + 1)]
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0 for f in files])
    emb = teacher.embed(x)  # 92 x 112 px crops, resized to 112 inside
    labels = np.repeat(np.arange(people), per_person)
    scores = emb @ emb.T
    upper = np.triu(np.ones_like(scores, bool), 1)
    genuine = scores[upper & (labels[:, None] == labels[None, :])]
    impostor = scores[upper & (labels[:, None] != labels[None, :])]
    auc = (genuine[:, None] > impostor[None, :]).mean()
    assert auc > 0.95, auc
    per_run = load_teacher(SFACE, SFACE_SPEC, threads=1, fold_quantized=False).embed(x[:2])
    assert (per_run * emb[:2]).sum(axis=1).min() > 0.9999  # weights folded at load: the same embeddings


def test_teacher_cost_bench_runs_at_smoke_size(tmp_path, monkeypatch):
    import importlib.util

    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as `python bench/teacher_cost.py` finds results_md
    spec = importlib.util.spec_from_file_location("teacher_cost", REPO / "bench" / "teacher_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    bench.main(["--model", str(tiny_graph(tmp_path / "t.onnx", batch=1)), "--input-spec", f"size={SIZE}",
                "--batches", "1,3", "--threads", "1", "--smoke", "--no-write", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["fold_quantized"], r["batch"]) for r in rows} == {(f, b) for f in (True, False) for b in (1, 3)}
    assert all(len(r["wall_ms"]) == 1 and r["wall_ms"][0] > 0 for r in rows)
