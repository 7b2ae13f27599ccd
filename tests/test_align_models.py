"""Alignment in the bundle: train on a facetrain.align folder, then eval / verify / identify on raw photos cut
exactly as the training crops were; raw photos vs aligned inputs on Yale; a missing detector is one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import FACES, REPO, SHARED, WEIGHTS, run_module, run_train, tiny_train_config
from PIL import Image

from facetrain.alignment.recipe import AlignmentRecipe, recipe_of_folder
from facetrain.evaluation import pictures

YALE = FACES / "yalefaces"
DOGS = SHARED / "data" / "photos" / "dlib_faces" / "dogs.jpg"


def _has_align_extra() -> bool:
    try:
        import facenet_pytorch  # noqa: F401
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not _has_align_extra(), reason='pip install -e ".[align]" not done'),
    pytest.mark.skipif(not (YALE.is_dir() and DOGS.is_file()), reason=f"shared face data not found at {YALE}"),
]


def _embeddings(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(folder / "embeddings.safetensors"), "np") as f:
        files = json.loads(f.metadata()["files"])
        emb = f.get_tensor("embeddings")
    return {Path(p).parent.name + "/" + Path(p).stem: row for p, row in zip(files, emb, strict=True)}


@pytest.mark.slow
def test_train_on_aligned_folder_then_eval_verify_identify_raw_photos(tmp_path):
    """One recipe from end to end: facetrain.align -> training records the recipe -> raw photos through eval,
    verify and identify give the embeddings of the training crops (to 1e-5); a photo without a face is listed
    by eval (a failure to acquire) and a failure to acquire in verify ("different people")."""
    raw = tmp_path / "raw"
    for subject in sorted(YALE.glob("subject*"))[:6]:
        (raw / subject.name).mkdir(parents=True)
        for f in sorted(subject.iterdir())[:4]:
            shutil.copy(f, raw / subject.name / f.name)
    Image.open(DOGS).convert("RGB").resize((320, 240)).save(raw / "subject01" / "zz_dogs.png")
    aligned = tmp_path / "aligned"
    run_module("facetrain.align", ["--input", raw, "--output", aligned, "--workers", "1"])
    recipe = recipe_of_folder(aligned)
    assert recipe == AlignmentRecipe().to_dict()

    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(aligned), "image_size": 32,
                                                "val_identities": 2}})
    run_train(["--config", cfg, "--train.output_dir", tmp_path / "run"])
    bundle = tmp_path / "run" / "bundle"
    assert json.loads((bundle / "facetrain.json").read_text())["alignment"] == recipe

    common = ["--model", bundle, "--no-calibrate", "--save-embeddings", "--batch-size", "8"]
    proc = run_module("facetrain.eval", [*common, "--data", raw, "--output", tmp_path / "ev_raw"])
    report = json.loads((tmp_path / "ev_raw" / "metrics.json").read_text())
    assert report["alignment"]["inputs"] == "raw photos, aligned with the bundle's recipe"
    # errors.png shows the raw photos' faces as the model saw them: facetrain.align's crops
    assert (tmp_path / "ev_raw" / "errors.png").is_file()
    worst = report["worst_pairs"]["genuine"][0]["a"]
    shown = pictures.file_thumb([worst], recipe)(0)
    crop = next((aligned / Path(worst).parent.name).glob(Path(worst).stem + ".*"))
    diff = np.asarray(shown.convert("RGB"), dtype=float) - np.asarray(Image.open(crop).convert("RGB"), dtype=float)
    assert shown.size == Image.open(crop).size and np.abs(diff).mean() < 1.0  # gray levels: the same crop
    common.append("--no-plots")
    assert [f["path"] for f in report["alignment"]["without_face"]] == [str(raw / "subject01" / "zz_dogs.png")]
    assert "zz_dogs.png" in proc.stdout and report["n_images"] == 24
    assert report["failures_to_acquire"]["by_problem"]["no_face"] == 1
    run_module("facetrain.eval", [*common, "--data", aligned, "--output", tmp_path / "ev_al"])
    report = json.loads((tmp_path / "ev_al" / "metrics.json").read_text())
    assert report["alignment"]["inputs"] == "crops of facetrain.align (same recipe)"
    from_raw, from_crops = _embeddings(tmp_path / "ev_raw"), _embeddings(tmp_path / "ev_al")
    assert sorted(from_raw) == sorted(from_crops) and len(from_raw) == 24
    for key, row in from_raw.items():
        np.testing.assert_allclose(row, from_crops[key], atol=1e-5, err_msg=key)

    a, b = sorted((raw / "subject02").iterdir())[:2]
    proc = run_module("facetrain.verify", ["--model", bundle, a, b, "--json"])
    result = json.loads(proc.stdout)
    expected = float(from_crops[f"subject02/{a.stem}"] @ from_crops[f"subject02/{b.stem}"])
    assert result["similarity"] == pytest.approx(expected, abs=1e-5)
    assert result["alignment"] == recipe

    # a photo without a face is a failure to acquire: a decision (different people), exit status 0
    proc = run_module("facetrain.verify", ["--model", bundle, a, raw / "subject01" / "zz_dogs.png", "--json"])
    result = json.loads(proc.stdout)
    assert result["same"] is False and result["similarity"] is None
    assert [(Path(r["path"]).name, r["problem"]) for r in result["failure_to_acquire"]] == [("zz_dogs.png", "no_face")]

    # identify: an aligned gallery (recognised by its marker) and a raw probe whose crop is in it
    proc = run_module("facetrain.identify", ["--model", bundle, "--gallery", aligned, a, "--json", "--no-cache"])
    top = json.loads(proc.stdout)["probes"][0]["matches"][0]
    assert top["identity"] == "subject02" and Path(top["image"]).stem == a.stem
    assert top["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"pretrained weights not found at {WEIGHTS}")
def test_yalefaces_verify_better_through_the_bundles_alignment(tmp_path):
    """Issue 14 acceptance: the same model (ImageNet features of tf_efficientnet_lite0, identity head, 112 px,
    flip test) on the raw 320x243 Yale frames verifies better through its alignment recipe than on the frames
    resized, in AUC and in TAR@FAR=1e-2 (measured 0.911 vs 0.832 and 0.454 vs 0.439)."""
    import torch

    from facetrain.config.schema import DataConfig, ModelConfig
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import EmbeddingModel, create_backbone, resolve_preprocess

    mcfg = ModelConfig(backbone="tf_efficientnet_lite0", pretrained=True, pretrained_file=str(WEIGHTS),
                       channels_last=False)
    backbone = create_backbone(mcfg)
    model = EmbeddingModel(backbone, backbone.num_features)
    with torch.no_grad():  # the embedding is the pooled ImageNet features themselves
        model.head.weight.copy_(torch.eye(backbone.num_features))
        model.head.bias.zero_()
    pre = resolve_preprocess(DataConfig(image_size=112), model)
    mcfg.embedding_dim, mcfg.pretrained, mcfg.pretrained_file = backbone.num_features, False, ""
    metrics = {}
    for name, extra in (("resized", {}), ("aligned", {"alignment": AlignmentRecipe().to_dict()})):
        (tmp_path / name).mkdir()
        write_bundle(tmp_path / name, model, mcfg, pre, extra)
        run_module("facetrain.eval", ["--model", tmp_path / name, "--data", YALE, "--flip", "--no-calibrate",
                                      "--no-plots", "--mixed-precision", "no", "--output", tmp_path / f"ev_{name}"])
        metrics[name] = json.loads((tmp_path / f"ev_{name}" / "metrics.json").read_text())["metrics"]
    print({n: (round(m["auc"], 4), round(m["tar@far=1e-02"], 4)) for n, m in metrics.items()})
    assert metrics["aligned"]["auc"] > metrics["resized"]["auc"]
    assert metrics["aligned"]["tar@far=1e-02"] > metrics["resized"]["tar@far=1e-02"]


@pytest.mark.slow
def test_bundle_with_recipe_and_no_detector_says_what_to_do(tmp_path):
    """facenet-pytorch hidden: raw photos are refused in one line (install the extra, or --aligned); with
    --aligned the crops are embedded as they are."""
    import torch

    from facetrain.config.schema import ModelConfig
    from facetrain.data.images import Preprocess
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import create_model

    torch.manual_seed(0)
    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_bundle(bundle, create_model(mcfg).eval(), mcfg, Preprocess(32, [0.5] * 3, [0.5] * 3),
                 {"alignment": AlignmentRecipe().to_dict()})
    shim = tmp_path / "shim" / "facenet_pytorch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'facenet_pytorch'\")\n")
    env = {"PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    a, b = sorted((YALE / "subject01").iterdir())[:2]
    proc = run_module("facetrain.verify", ["--model", bundle, a, b], check=False, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[align]"' in lines[0] and "--aligned" in lines[0]
    proc = run_module("facetrain.verify", ["--model", bundle, a, b, "--aligned", "--json"], env=env)
    assert json.loads(proc.stdout)["alignment"] is None


# ------------------------------------------------------------------------------- issue 26: galleries and faces


def _bundle_with_recipe(directory: Path) -> Path:
    """timm's test_efficientnet (random weights, 32 px) with the default alignment recipe: raw photos are
    aligned, and a photo without a face is noticed, as with a trained model."""
    import torch

    from facetrain.config.schema import ModelConfig
    from facetrain.data.images import Preprocess
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import create_model

    torch.manual_seed(0)
    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False)
    directory.mkdir(parents=True)
    write_bundle(directory, create_model(mcfg).eval(), mcfg, Preprocess(32, [0.5] * 3, [0.5] * 3),
                 {"alignment": AlignmentRecipe().to_dict()})
    return directory


def _two_faces(path: Path) -> Path:
    """Two Yale people side by side, the one on the right smaller: a photo with several faces."""
    left = Image.open(sorted((YALE / "subject03").iterdir())[0]).convert("RGB")
    right = Image.open(sorted((YALE / "subject04").iterdir())[0]).convert("RGB").resize((224, 170))
    canvas = Image.new("RGB", (640, 243))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (400, 40))
    canvas.save(path)
    return path


def test_faceless_gallery_photos_are_all_named_or_skipped(tmp_path):
    """Issue 26 item 11: one photo without a face stopped identify (even with --bad-images skip), naming only
    the first; now every one is named in one line, or left out and counted."""
    raw = tmp_path / "raw"
    for subject in ("subject01", "subject02"):
        (raw / subject).mkdir(parents=True)
        for f in sorted((YALE / subject).iterdir())[:2]:
            shutil.copy(f, raw / subject / f.name)
    dogs = Image.open(DOGS).convert("RGB").resize((320, 240))
    faceless = [raw / "subject01" / "zz_dogs.png", raw / "subject02" / "zz_dogs.png"]
    for f in faceless:
        dogs.save(f)
    bundle = _bundle_with_recipe(tmp_path / "bundle")
    probe = sorted((YALE / "subject02").iterdir())[0]
    argv = ["--model", bundle, "--gallery", raw, probe, "--json", "--cache-dir", tmp_path / "cache"]
    proc = run_module("facetrain.identify", argv, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert all(f"{f} (no_face)" in err[0] for f in faceless) and "--bad-images skip" in err[0]
    result = json.loads(run_module("facetrain.identify", [*argv, "--bad-images", "skip"]).stdout)
    assert [(b["path"], b["problem"]) for b in result["skipped_images"]] == [(str(f), "no_face") for f in faceless]
    assert result["probes"][0]["matches"][0]["identity"] == "subject02" and result["probes"][0]["faces"] == {"faces": 1}


def test_verify_and_eval_say_which_face_they_used(tmp_path):
    """Issue 26 items 13/14: a photo with several faces was verified on one of them with nothing saying so."""
    bundle = _bundle_with_recipe(tmp_path / "bundle")
    data = tmp_path / "data"
    for subject in ("subject03", "subject04"):
        (data / subject).mkdir(parents=True)
        for f in sorted((YALE / subject).iterdir())[1:3]:
            shutil.copy(f, data / subject / f.name)
    group = _two_faces(data / "subject03" / "zz_group.png")
    single = data / "subject03" / sorted(p.name for p in (data / "subject03").iterdir())[0]
    result = json.loads(run_module("facetrain.verify", ["--model", bundle, group, single, "--json"]).stdout)
    first, second = result["faces"]
    assert first["faces"] == 2 and len(first["box"]) == 4 and first["choice"] and second == {"faces": 1}
    assert first["box"][2] <= 330  # the face kept is the large one on the left (largest and size_centre agree)
    text = run_module("facetrain.verify", ["--model", bundle, group, single]).stdout
    assert f"{group}: 2 faces; used the one at {first['box']}" in text
    run_module("facetrain.eval", ["--model", bundle, "--data", data, "--no-calibrate", "--no-plots",
                                  "--output", tmp_path / "ev"])
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())["alignment"]
    assert report["n_several_faces"] == 1 and report["several_faces"][0]["path"] == str(group)
    assert report["several_faces"][0]["box"] == first["box"]
    found = json.loads(run_module("facetrain.identify", ["--model", bundle, "--gallery", data, group, "--json",
                                                         "--no-cache"]).stdout)["probes"][0]
    assert found["faces"] == first and found["matches"][0]["identity"] == "subject03"


def test_a_half_aligned_folder_is_said_by_train_pack_and_eval(tmp_path):
    """Issue 26 item 13: align's "complete": false marker was never read."""
    from facetrain.data.synthetic import render

    crops = tmp_path / "crops"
    for ident in range(8):
        (crops / f"p{ident}").mkdir(parents=True)
        for index in range(4):
            render(2, ident, index).resize((32, 32)).save(crops / f"p{ident}" / f"{index}.png")
    marker = {"format": "facetrain-align", "version": 1, "recipe": AlignmentRecipe(size=32).to_dict(),
              "input": str(tmp_path / "raw"), "complete": False}
    (crops / "facetrain_align.json").write_text(json.dumps(marker))
    said = f"{crops} is only partly aligned"
    finish = f"re-run python -m facetrain.align --input {tmp_path / 'raw'} --output {crops}"

    def one_line(proc) -> str:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if said in line]
        assert len(lines) == 1 and finish in lines[0], proc.stdout + proc.stderr
        return lines[0]

    one_line(run_module("facetrain.pack", ["--input", crops, "--output", tmp_path / "c.ftpack", "--size", 32,
                                           "--no-progress"]))
    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(crops), "val_identities": 2},
                                       "train": {"max_steps": 1, "val_every": 1, "ckpt_every": 1}})
    one_line(run_train(["--config", cfg, "--train.output_dir", tmp_path / "run"]))
    one_line(run_module("facetrain.eval", ["--model", tmp_path / "run" / "bundle", "--data", crops, "--aligned",
                                           "--no-calibrate", "--no-plots", "--output", tmp_path / "ev"]))
    marker["complete"] = True  # a finished folder: not a word
    (crops / "facetrain_align.json").write_text(json.dumps(marker))
    proc = run_module("facetrain.pack", ["--input", crops, "--output", tmp_path / "d.ftpack", "--size", 32,
                                         "--no-progress"])
    assert "partly aligned" not in proc.stdout + proc.stderr


def test_size_centre_is_the_default_and_an_old_folder_keeps_its_choice(tmp_path):
    """Issue 26 item 14: the default face choice, measured in docs/align.md (bench/face_choice.py)."""
    from argparse import Namespace

    from facetrain.align import build_parser, build_recipe
    from facetrain.alignment.detectors import Face
    from facetrain.alignment.recipe import FACE_CHOICES, MARKER_FILE

    def face(x0, y0, w):
        return Face(np.array([x0, y0, x0 + w, y0 + w], dtype=float), np.zeros((5, 2)), 0.99)

    rule = FACE_CHOICES[AlignmentRecipe().face_choice]
    assert AlignmentRecipe().face_choice == "size_centre"
    # a web photo: the subject in the middle, a larger neighbour at the edge -> the subject (largest: the edge)
    assert rule([face(0, 60, 130), face(140, 100, 100)], 380, 300)[0] == 1
    # a portrait: a big face off-centre, a small one in the middle of the background -> the big one
    assert rule([face(20, 40, 160), face(185, 140, 20)], 400, 300)[0] == 0
    args: Namespace = build_parser().parse_args(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])
    assert build_recipe(args)["face_choice"] == "size_centre"
    (tmp_path / "out").mkdir()
    old = {**AlignmentRecipe().to_dict(), "face_choice": "largest"}  # aligned with the earlier default
    (tmp_path / "out" / MARKER_FILE).write_text(json.dumps({"format": "facetrain-align", "recipe": old}))
    assert build_recipe(args)["face_choice"] == "largest"  # a re-run resumes instead of asking for --redo


def test_identify_answers_the_other_probes_when_one_has_no_face(tmp_path):
    """A faceless or undecodable probe stopped identify with nothing said about the other probes; now it is a
    failure to acquire (no match, named), as in verify, and every other probe is answered."""
    gallery = tmp_path / "gallery"
    for subject in ("subject01", "subject02"):
        (gallery / subject).mkdir(parents=True)
        for f in sorted((YALE / subject).iterdir())[:2]:
            shutil.copy(f, gallery / subject / f.name)
    dogs = tmp_path / "dogs.png"
    Image.open(DOGS).convert("RGB").resize((320, 240)).save(dogs)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    probe = sorted((YALE / "subject02").iterdir())[3]
    bundle = _bundle_with_recipe(tmp_path / "bundle")
    argv = ["--model", bundle, "--gallery", gallery, dogs, probe, broken, "--no-cache"]
    result = json.loads(run_module("facetrain.identify", [*argv, "--json"]).stdout)
    dog, person, bad = result["probes"]
    assert [p["probe"] for p in result["probes"]] == [str(dogs), str(probe), str(broken)]
    assert dog["matches"] == [] and dog["match"] is False and dog["failure_to_acquire"][0]["problem"] == "no_face"
    assert bad["matches"] == [] and bad["failure_to_acquire"][0]["problem"] == "undecodable"
    assert person["failure_to_acquire"] == [] and person["faces"] == {"faces": 1}
    assert {m["identity"] for m in person["matches"]} == {"subject01", "subject02"}
    text = run_module("facetrain.identify", argv).stdout
    assert f"{dogs}: failure to acquire (no_face" in text and f"{broken}: failure to acquire (undecodable" in text
    assert "subject02" in text
