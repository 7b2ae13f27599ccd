"""facetrain.verify (1:1) and facetrain.identify (1:N): same embeddings as the evaluator, the bundle's
calibrated threshold, the gallery cache and its invalidation, top-k answers and rank-k identification rates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from facetrain import eval as eval_cli
from facetrain import identify, verify
from facetrain.cli import run_cli
from facetrain.config.schema import DataConfig, ModelConfig
from facetrain.data.synthetic import render
from facetrain.errors import UserError
from facetrain.model.bundle import write_bundle
from facetrain.model.files import read_bundle_meta
from facetrain.model.network import create_model, resolve_preprocess


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process command creates its own Accelerator, as a fresh process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_bundle(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16)
    model = create_model(cfg)
    directory.mkdir(parents=True)
    write_bundle(directory, model, cfg, resolve_preprocess(DataConfig(image_size=32), model), {"step": 1})
    return directory


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """6 synthetic people x 6 images (36 images, 90 genuine / 540 impostor pairs)."""
    root = tmp_path_factory.mktemp("people") / "gallery"
    for ident in range(6):
        (root / f"p{ident}").mkdir(parents=True)
        for index in range(6):
            render(1, ident, index).resize((40, 40)).save(root / f"p{ident}" / f"{index}.png")
    return root


def run_json(main, argv: list, capsys) -> dict:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def eval_embeddings(out: Path) -> dict[str, torch.Tensor]:
    """file -> embedding, from an evaluator run with --save-embeddings."""
    with safe_open(str(out / "embeddings.safetensors"), "pt") as f:
        files = json.loads(f.metadata()["files"])
    emb = load_file(str(out / "embeddings.safetensors"))["embeddings"]
    return dict(zip(files, emb, strict=True))


# ------------------------------------------------------------------------------------------------- verify


def test_verify_uses_the_evaluator_embeddings_and_calibrated_threshold(tmp_path, people, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "eval"
    # calibrate with the flip test: verify must then flip too, by default
    assert eval_cli.main(["--model", str(bundle), "--data", str(people), "--output", str(out), "--num-workers", "0",
                          "--save-embeddings", "--flip", "--no-plots"]) == 0
    by_file = eval_embeddings(out)
    meta = read_bundle_meta(bundle)
    assert meta["threshold_far"] == 1e-2 and meta["threshold_calibration"]["flip"] is True  # 540 impostors

    a, b, c = (str(people / p) for p in ("p2/0.png", "p2/3.png", "p4/1.png"))
    embedder = verify.load_embedder(bundle, flip=True)
    torch.testing.assert_close(verify.embed_pair(embedder, a, c), torch.stack([by_file[a], by_file[c]]),
                               rtol=0, atol=1e-5)

    for first, second in ((a, b), (a, c)):
        result = run_json(verify.main, ["--model", bundle, first, second, "--json"], capsys)
        expected = float(by_file[first].double() @ by_file[second].double())
        assert result["flip"] is True and result["similarity"] == pytest.approx(expected, abs=1e-5)
        assert result["threshold"] == meta["threshold"] and result["threshold_source"] == "bundle"
        assert result["same"] == (result["similarity"] >= meta["threshold"])

    # --threshold overrides the bundle's; the text output states the decision
    capsys.readouterr()
    assert verify.main(["--model", str(bundle), a, c, "--threshold", "-1"]) == 0
    text = capsys.readouterr().out
    assert "SAME person" in text and "threshold   -1.0000" in text
    assert verify.main(["--model", str(bundle), a, c, "--threshold", "1.5"]) == 0
    assert "DIFFERENT people" in capsys.readouterr().out


def test_verify_without_a_threshold_says_so_and_errors_are_one_line(tmp_path, people, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    a, b = str(people / "p0" / "0.png"), str(people / "p1" / "0.png")
    result = run_json(verify.main, ["--model", bundle, a, b, "--json"], capsys)
    assert result["threshold"] is None and result["same"] is None and -1 <= result["similarity"] <= 1
    assert verify.main(["--model", str(bundle), a, b]) == 0
    text = capsys.readouterr().out
    assert "no calibrated threshold" in text and "facetrain.eval" in text and "SAME" not in text

    # an undecodable or missing photo is a failure to acquire: a decision (different people), exit status 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for argv, needle in (([a, str(broken)], f"{broken} (undecodable: corrupt"),
                         ([a, str(tmp_path / "nope.jpg")], f"{tmp_path / 'nope.jpg'} (missing")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(verify.main, ["--model", str(bundle), *argv])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and needle in out and "DIFFERENT people" in out, out


# ----------------------------------------------------------------------------------------------- identify


def test_identify_top_k_and_the_gallery_cache(tmp_path, people, capsys, monkeypatch):
    gallery = tmp_path / "gallery"
    shutil.copytree(people, gallery)
    bundle = make_bundle(tmp_path / "bundle")
    probe = tmp_path / "probe.png"
    shutil.copy(people / "p3" / "4.png", probe)  # an exact copy of a gallery image
    argv = ["--model", bundle, "--gallery", gallery, str(probe), "--top-k", 3, "--num-workers", 0, "--json"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "facetrain"  # the default: outside the gallery

    first = run_json(identify.main, argv, capsys)
    assert first["cache"] == "built" and first["skipped_images"] == []
    assert sorted(p.name for p in gallery.iterdir()) == [f"p{k}" for k in range(6)]  # nothing written into it
    (manifest_file,) = cache.glob("gallery-*.json")
    manifest = json.loads(manifest_file.read_text())
    assert len(manifest["files"]) == 36 and manifest["names"] == [f"p{k}" for k in range(6)]
    cached = load_file(str(manifest_file.with_suffix(".safetensors")))["embeddings"]

    # top-k: identities by their best image's cosine, highest first; the copied image matches itself
    (answer,) = first["probes"]
    rows = answer["matches"]
    assert len(rows) == 3 and rows[0]["identity"] == "p3" and rows[0]["image"].endswith("p3/4.png")
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    files = [str(gallery / f) for f, _, _ in manifest["files"]]
    probe_emb = cached[files.index(str(gallery / "p3" / "4.png"))]
    best = {name: max(float(cached[i] @ probe_emb) for i, f in enumerate(files) if f"/{name}/" in f)
            for name in manifest["names"]}
    ranking = sorted(best, key=best.get, reverse=True)[:3]
    assert [r["identity"] for r in rows] == ranking
    assert [r["score"] for r in rows] == pytest.approx([best[n] for n in ranking], abs=1e-5)
    assert answer["match"] is None  # no calibrated threshold yet

    # unchanged gallery and model (a new mtime alone changes nothing): the cache is used
    assert run_json(identify.main, argv, capsys)["cache"] == "hit"
    os.utime(gallery / "p0" / "1.png", ns=(1, 1))
    assert run_json(identify.main, argv, capsys)["cache"] == "hit"
    # a modified file or an added one: re-enrolled
    shutil.copy(people / "p0" / "2.png", gallery / "p0" / "1.png")
    assert run_json(identify.main, argv, capsys)["cache"].startswith("stale: gallery changed")
    render(1, 0, 9).resize((40, 40)).save(gallery / "p0" / "9.png")
    again = run_json(identify.main, argv, capsys)
    assert again["cache"].startswith("stale: gallery changed (1 new")
    assert len(json.loads(manifest_file.read_text())["files"]) == 37
    # another model: its own cache file, built from scratch
    other = make_bundle(tmp_path / "other", seed=1)
    assert run_json(identify.main, ["--model", other, *argv[2:]], capsys)["cache"] == "built"
    assert len(list(cache.glob("gallery-*.safetensors"))) == 2
    # --cache-dir overrides the default
    moved = run_json(identify.main, [*argv, "--cache-dir", tmp_path / "mine"], capsys)
    assert moved["cache"] == "built" and len(list((tmp_path / "mine").glob("gallery-*.safetensors"))) == 1


def test_identify_evaluate_reports_rank_rates(tmp_path, people, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    gallery = tmp_path / "gallery"
    shutil.copytree(people, gallery)
    result = run_json(identify.main, ["--model", bundle, "--gallery", gallery, "--evaluate", "--num-workers", 0,
                                      "--json", "--cache-dir", tmp_path / "cache"], capsys)
    rates = result["evaluation"]
    assert rates["n_probes"] == 30 and rates["n_enrolled_identities"] == 6

    # brute force from the cached embeddings: image 0 of each person enrolled, images 1-5 probe
    (tensors,) = (tmp_path / "cache").glob("gallery-*.safetensors")
    emb = load_file(str(tensors))["embeddings"].double().reshape(6, 6, -1)
    enrolled, probes = emb[:, 0], emb[:, 1:]
    ranks = []
    for person in range(6):
        for probe in probes[person]:
            scores = enrolled @ probe
            ranks.append(int((scores > scores[person]).sum()) + 1)
    ranks = np.array(ranks)
    assert rates["rank-1"] == pytest.approx(np.mean(ranks <= 1))
    assert rates["rank-5"] == pytest.approx(np.mean(ranks <= 5))
    assert rates["mean_rank"] == pytest.approx(ranks.mean())

    # people with one image only: nothing to probe with, said in one line
    lonely = tmp_path / "lonely"
    for k in range(3):
        (lonely / f"p{k}").mkdir(parents=True)
        Image.new("RGB", (40, 40), (k * 60, 0, 0)).save(lonely / f"p{k}" / "0.png")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(identify.main, ["--model", str(bundle), "--gallery", str(lonely), "--evaluate", "--num-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "no probes" in err[0]


def _gallery_with_bad_files(tmp_path: Path, people: Path) -> tuple[Path, list[str]]:
    gallery = tmp_path / "gallery"
    shutil.copytree(people, gallery)
    bad = [gallery / "p1" / "empty.png", gallery / "p4" / "cut.png"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return gallery, [str(p) for p in bad]


def test_identify_names_every_unusable_gallery_photo_or_skips_them(tmp_path, people, capsys):
    """Issue 26 item 11 (the decode half; faceless photos: test_align_models): all named in one line, or left
    out and counted with --bad-images skip, also in the JSON answer."""
    gallery, bad = _gallery_with_bad_files(tmp_path, people)
    bundle = make_bundle(tmp_path / "bundle")
    argv = ["--model", str(bundle), "--gallery", str(gallery), "--evaluate", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(identify.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "2 image(s) cannot be used" in err[0]
    assert all(p in err[0] for p in bad) and "--bad-images skip" in err[0]
    result = run_json(identify.main, [*argv, "--bad-images", "skip", "--json"], capsys)
    assert sorted(b["path"] for b in result["skipped_images"]) == sorted(bad)
    assert result["evaluation"]["n_probes"] == 30


@pytest.mark.slow
def test_serve_enrols_its_gallery_as_identify_does(tmp_path, people, monkeypatch):
    """Issue 26 item 11: serve had no --bad-images (one bad photo stopped it) and no gallery cache."""
    from facetrain import serve

    gallery, bad = _gallery_with_bad_files(tmp_path, people)
    bundle = make_bundle(tmp_path / "bundle")
    served = {}
    monkeypatch.setattr(serve, "build_app", lambda embedder, gallery, *a: served.setdefault("gallery", gallery))
    monkeypatch.setattr(serve, "listen", lambda host, port: SimpleNamespace(getsockname=lambda: (host, port)))
    monkeypatch.setattr(serve, "serve", lambda app, sock, limits=None: None)
    monkeypatch.setattr(serve, "_describe_threshold", lambda meta: "")
    argv = ["--model", str(bundle), "--gallery", str(gallery), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(UserError, match="2 image\\(s\\) cannot be used"):
        serve.main(argv)
    assert serve.main([*argv, "--bad-images", "skip"]) == 0
    assert sorted(b["path"] for b in served["gallery"].skipped) == sorted(bad)
    assert served["gallery"].cache_status == "built" and len(served["gallery"].paths) == 36


@pytest.mark.slow
def test_verify_and_identify_start_without_sklearn():
    # sklearn (with scipy) takes 1-2 s to import on a small CPU; only the ROC needs it, so the 1:1 and 1:N
    # commands, which compute none, must not pay for it at every start
    code = ("import sys, facetrain.verify, facetrain.identify, facetrain.evaluation.evaluator; "
            "print('sklearn' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def test_evaluator_embeddings_are_the_same_with_batchnorm_folded(tmp_path, people):
    from facetrain.evaluation.embedding import Embedder
    from facetrain.model.network import FOLD_MIN_IMAGES

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16)
    model = create_model(cfg)
    with torch.no_grad():  # trained-looking statistics, so folding them in changes the weights for real
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_bundle(bundle, model, cfg, resolve_preprocess(DataConfig(image_size=32), model), {"step": 1})
    paths = sorted(str(p) for p in people.rglob("*.png"))
    paths = (paths * (FOLD_MIN_IMAGES // len(paths) + 1))[:FOLD_MIN_IMAGES]  # enough images to fold
    embedded = {}
    for fold in (True, False):
        embedder = Embedder.load(bundle, num_workers=0, mixed_precision="no", fold_batchnorm=fold)
        embedded[fold] = embedder.embed(paths)
        assert (embedder._folded is not None) == fold  # the folded copy was used only when asked for
    torch.testing.assert_close(embedded[True], embedded[False], atol=1e-5, rtol=0)
