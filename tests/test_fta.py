"""Failures to acquire (issue 27, deliverable 1): a missing, undecodable or faceless image never stops an evaluation;
its pairs are non-matches (rejected at every threshold) by default, or left out with --fta exclude; verify and the
service answer "not the same person" for it. Metrics are checked against figures worked out by hand, the
end-to-end run against figures computed here from its saved embeddings. In-process, tiny random-weight bundle."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_in_process
from PIL import Image

from facetrain.config.schema import DataConfig, ModelConfig
from facetrain.data.faceset import FaceSet
from facetrain.data.synthetic import render
from facetrain.errors import UserError
from facetrain.evaluation.metrics import (
    ScoreHistogram,
    kfold_accuracy,
    roc_exact,
    verification_metrics,
    with_rejected_pairs,
)
from facetrain.evaluation.options import EvalOptions
from facetrain.model.bundle import write_bundle
from facetrain.model.files import update_bundle_meta
from facetrain.model.network import create_model, resolve_preprocess
from facetrain.training.validation import rejected_pairs, skipped_val_labels

# ------------------------------------------------------------------------------------------ metrics by hand

# 3 scored genuine and 4 scored impostor pairs, plus 1 genuine and 2 impostor pairs that failed to acquire
GENUINE = [0.9, 0.6, 0.3]
IMPOSTOR = [0.5, 0.1, -0.2, -0.4]
REJECTED = (1, 2)


def _scored(mode: str):
    scores = np.array(GENUINE + IMPOSTOR)
    genuine = np.array([True] * len(GENUINE) + [False] * len(IMPOSTOR))
    if mode == "exact":
        return roc_exact(scores, genuine)
    hist = ScoreHistogram()
    hist.add(scores, genuine)
    return hist.roc()


@pytest.mark.parametrize("mode", ["exact", "histogram"])
def test_rejected_pairs_stay_in_the_denominators(mode):
    """nonmatch: 4 genuine / 6 impostor pairs. Thresholds 0.9 0.6 0.5 0.3 0.1 -0.2 -0.4 accept (genuine, impostor)
    (1,0) (2,0) (2,1) (3,1) (3,2) (3,3) (3,4): never a rejected pair.
    best accuracy: (2 + 6) / 10 at 0.6 (tied with 0.3; the higher threshold is reported).
    EER: FAR - FRR is 1/6 - 1/4 at 0.3 and 2/6 - 1/4 at 0.1: halfway, FAR = 1/4 at threshold 0.2.
    AUC: 1/6*1/2 + 3*(1/6*3/4) + 1/3*(3/4+1)/2 = 0.75 (the rejected pairs as if scored below everything).
    TAR @ FAR <= 0.2: FAR 1/6 at 0.3 accepts 3 of 4 genuine: 0.75."""
    m = verification_metrics(with_rejected_pairs(_scored(mode), *REJECTED), target_far=0.2)
    assert (m["n_genuine"], m["n_impostor"]) == (4, 6)
    assert m["best_accuracy"] == pytest.approx(0.8) and m["auc"] == pytest.approx(0.75)
    assert m["eer"] == pytest.approx(0.25) and m["tar_at_target_far"] == pytest.approx(0.75)
    if mode == "exact":
        assert m["best_threshold"] == pytest.approx(0.6) and m["eer_threshold"] == pytest.approx(0.2)
        assert m["threshold_at_target_far"] == pytest.approx(0.3)


@pytest.mark.parametrize("mode", ["exact", "histogram"])
def test_excluded_pairs_leave_the_denominators(mode):
    """exclude: 3 genuine / 4 impostor. best accuracy (2 + 4) / 7 at 0.6; FAR - FRR is 1/4 - 1/3 at 0.5 and
    1/4 - 0 at 0.3, a quarter of the way: EER 1/4 at 0.45; AUC = 1/4*2/3 + 3/4*1 = 11/12;
    TAR @ FAR <= 0.25: 3 of 3 at 0.3."""
    m = verification_metrics(_scored(mode), target_far=0.25)
    assert (m["n_genuine"], m["n_impostor"]) == (3, 4)
    assert m["best_accuracy"] == pytest.approx(6 / 7) and m["auc"] == pytest.approx(11 / 12)
    assert m["eer"] == pytest.approx(0.25) and m["tar_at_target_far"] == pytest.approx(1.0)
    if mode == "exact":
        assert m["eer_threshold"] == pytest.approx(0.45)


def test_rejected_pairs_rank_below_every_score():
    """The same curve as scoring the failed pairs below any cosine (-2), but for the last point's threshold."""
    scores = np.array(GENUINE + IMPOSTOR + [-2.0] * 3)
    genuine = np.array([True] * 3 + [False] * 4 + [True, False, False])
    sentinel, ours = roc_exact(scores, genuine), with_rejected_pairs(_scored("exact"), *REJECTED)
    np.testing.assert_allclose(ours.far, sentinel.far)
    np.testing.assert_allclose(ours.tar, sentinel.tar)
    np.testing.assert_allclose(ours.thresholds[:-1], sentinel.thresholds[:-1])
    assert ours.thresholds[-1] == -np.inf and with_rejected_pairs(sentinel, 0, 0) is sentinel


def test_plots_draw_only_the_scored_pairs():
    """The rejected pairs have no score: the score histogram draws the fractions of the 7 scored pairs (the
    closing point's -inf threshold made its bin edges NaN and stopped the evaluation)."""
    import matplotlib.pyplot as plt

    from facetrain.evaluation.figures import make_figures

    roc = with_rejected_pairs(_scored("exact"), *REJECTED)
    figures = make_figures(roc, verification_metrics(roc), 0.3, 0.2)
    drawn = sorted(float(step.get_data().values.sum()) for step in figures["scores.png"].axes[0].patches)
    assert drawn == pytest.approx([4 / 6, 3 / 4])  # scored impostors of 6, scored genuine of 4
    for fig in figures.values():
        plt.close(fig)


def test_kfold_accuracy_counts_rejected_pairs_in_their_fold():
    """Fold 0: genuine 0.9 0.4, impostor 0.5 0.1, a rejected genuine; fold 1: genuine 0.8 0.75, impostor 0.6 0.2,
    a rejected impostor. Fold 1's pairs put the threshold at (0.75 + 0.6) / 2 = 0.675: fold 0 gets 0.9, 0.5,
    0.1 right, 0.4 and the rejected genuine wrong: 3/5 (3/4 excluded). Fold 0's put it at (0.9 + 0.5) / 2 = 0.7:
    fold 1 gets all 5 right (4/4)."""
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.0, 0.8, 0.75, 0.6, 0.2, 0.0])
    genuine = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    folds = np.array([0] * 5 + [1] * 5)
    rejected = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    got = kfold_accuracy(scores, genuine, folds, rejected)
    assert got["fold_accuracies"] == pytest.approx([0.6, 1.0]) and got["accuracy_mean"] == pytest.approx(0.8)
    assert got["fold_thresholds"] == pytest.approx([0.675, 0.7])
    kept = ~rejected
    excluded = kfold_accuracy(scores[kept], genuine[kept], folds[kept])
    assert excluded["fold_accuracies"] == pytest.approx([0.75, 1.0])


def test_fta_option_and_the_former_bad_images():
    def resolved(**kw) -> str:
        opts = EvalOptions(model="m", data="d", **kw)
        opts.check()
        return opts.fta

    assert resolved() == "nonmatch" and resolved(fta="exclude") == "exclude"
    assert resolved(bad_images="skip") == "exclude" and resolved(bad_images="error") == "error"
    assert resolved(bad_images="skip", fta="exclude") == "exclude"
    with pytest.raises(UserError, match="--bad-images skip means --fta exclude"):
        resolved(bad_images="skip", fta="nonmatch")


def test_validation_counts_preflight_skips_of_validation_identities():
    """data.bad_images skip: a skipped file of a validation identity is a failure to acquire there."""
    names = ["ann", "bob", "cy"]
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    paths = [f"/d/{names[k]}/{i}.png" for i, k in enumerate(labels)]
    faceset = FaceSet(labels, names, paths, loader=None, paths=paths,
                      skipped=["/d/bob/9.png", "/d/ann/8.png", "/d/gone/1.png"])
    val_idx = np.array([2, 3, 4, 5, 6])  # bob and cy are the validation identities: labels 0 and 1
    fta = skipped_val_labels(faceset, val_idx, np.array([0, 0, 0, 1, 1]))
    assert fta.tolist() == [0]  # bob's; ann is a training identity, "gone" in no split
    # bob 3 + 1 images, cy 2: genuine 6 + 1 = 7 (3 more), impostor 4*2 = 8 (2 more) against 3 and 6 acquired
    assert rejected_pairs(np.array([0, 0, 0, 1, 1]), fta) == (3, 2)


# ------------------------------------------------------------------------------------------ end to end

SIZE = 40  # side of the test photos, pixels
PEOPLE = ["ann", "bob", "cy", "dee"]
# 2 folds x 3 pairs per class; ann_0003 is undecodable, bob_0003 missing, cy_0003 shows no face
PAIRS = """2 3
ann 1 2
bob 1 2
cy 1 3
ann 1 bob 1
cy 2 dee 1
dee 2 ann 3
ann 2 3
bob 1 3
dee 1 2
ann 2 cy 1
bob 2 dee 3
cy 3 dee 2
"""
FAILED = {"ann/ann_0003.png": ("undecodable", "not_an_image"), "bob/bob_0003.png": ("missing", "missing"),
          "cy/cy_0003.png": ("no_face", "no_face")}


class _TemplateDetector:
    """Stands in for MTCNN: a face with the template's landmarks in any photo but a plain black one."""

    def __init__(self, min_face_px: int = 0):
        pass

    def detect(self, rgb: np.ndarray):
        from facetrain.alignment.detectors import Face
        from facetrain.alignment.recipe import template_points

        if not rgb.any():
            return []
        h, w = rgb.shape[:2]
        points = template_points("arcface_112", 112, 0.0) * np.array([w / 112, h / 112])
        return [Face(np.array([0.0, 0.0, w, h]), points, 0.99)]


@pytest.fixture(scope="module")
def lfw(tmp_path_factory) -> tuple[Path, Path]:
    """An LFW-layout folder with the three kinds of failure, its pairs file, and a bundle that aligns raw photos."""
    root = tmp_path_factory.mktemp("fta")
    data = root / "lfw"
    for k, name in enumerate(PEOPLE):
        (data / name).mkdir(parents=True)
        for i in (1, 2, 3):
            render(0, k, i).resize((SIZE, SIZE)).save(data / name / f"{name}_{i:04d}.png")
    (data / "ann" / "ann_0003.png").write_bytes(b"not a png at all")
    (data / "bob" / "bob_0003.png").unlink()
    Image.new("RGB", (SIZE, SIZE)).save(data / "cy" / "cy_0003.png")
    (root / "pairs.txt").write_text(PAIRS)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16)
    model = create_model(cfg)
    bundle = root / "bundle"
    bundle.mkdir()
    write_bundle(bundle, model, cfg, resolve_preprocess(DataConfig(image_size=32), model), {"step": 1})
    from facetrain.alignment.recipe import AlignmentRecipe

    update_bundle_meta(bundle, alignment=AlignmentRecipe().to_dict())
    return data, bundle


@pytest.fixture
def template_detector(monkeypatch):
    import facetrain.alignment.detectors as detectors

    monkeypatch.setattr(detectors, "get_detector", lambda name, min_face_px: _TemplateDetector())


def _pairs(data: Path) -> list[tuple[Path, Path, bool, int]]:
    rows = []
    for k, line in enumerate(PAIRS.splitlines()[1:]):
        p = line.split()
        a, b = (p[0], int(p[1])), (p[0], int(p[2])) if len(p) == 3 else (p[2], int(p[3]))
        rows.append((data / a[0] / f"{a[0]}_{a[1]:04d}.png", data / b[0] / f"{b[0]}_{b[1]:04d}.png", len(p) == 3,
                     k // 6))
    return rows


def _by_hand(data: Path, out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(score, genuine, fold, rejected) per listed pair, from the run's saved embeddings; a pair with a failed
    image gets score -inf (rejected)."""
    from safetensors import safe_open

    with safe_open(str(out / "embeddings.safetensors"), "pt") as f:
        files = json.loads(f.metadata()["files"])
        emb = dict(zip(files, f.get_tensor("embeddings").double().numpy(), strict=True))
    failed = {Path(rel).stem for rel in FAILED}
    rows = [(-np.inf if {a.stem, b.stem} & failed else float(emb[str(a)] @ emb[str(b)]), g, fold)
            for a, b, g, fold in _pairs(data)]
    score, genuine, fold = (np.array(c) for c in zip(*rows, strict=True))
    return score, genuine.astype(bool), fold, np.isinf(score)


def _mann_whitney_auc(score: np.ndarray, genuine: np.ndarray) -> float:
    """P(genuine score > impostor score), ties counting half: the area under the trapezoid ROC."""
    g, i = score[genuine][:, None], score[~genuine][None, :]
    return float(np.mean((g > i) + 0.5 * (g == i)))


def _best_accuracy(score: np.ndarray, genuine: np.ndarray) -> float:
    cuts = [np.inf, *score[np.isfinite(score)]]
    return max(float(np.mean((score >= t) == genuine)) for t in cuts)


def test_pairs_eval_with_failures_to_acquire_runs_to_the_end(lfw, template_detector, tmp_path):
    data, bundle = lfw
    common = ["--model", bundle, "--data", data, "--pairs", data.parent / "pairs.txt", "--no-plots",
              "--num-workers", 0, "--no-calibrate", "--save-embeddings"]
    done = run_in_process("facetrain.eval", [*common, "--output", tmp_path / "nonmatch"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failures to acquire: 3 of 12 images (rate 25.0000%" in done.stdout, done.stdout
    report = json.loads((tmp_path / "nonmatch" / "metrics.json").read_text())
    fta = report["failures_to_acquire"]
    assert {k: fta[k] for k in ("policy", "attempted_images", "count", "rate")} == {
        "policy": "nonmatch", "attempted_images": 12, "count": 3, "rate": 0.25}
    assert fta["by_problem"] == {"missing": 1, "undecodable": 1, "no_face": 1}
    # (the missing file is named where the first image extension would put it)
    assert {(Path(r["path"]).stem, r["problem"], r["reason"]) for r in fta["files"]} == {
        (Path(rel).stem, problem, reason) for rel, (problem, reason) in FAILED.items()}
    # pairs with a failed image: cy 1 3, ann 2 3, bob 1 3 (genuine); dee 2 ann 3, cy 3 dee 2 (impostor)
    assert (fta["genuine_pairs"], fta["impostor_pairs"]) == (3, 2) and report["metrics"]["fta_rate"] == 0.25

    score, genuine, fold, rejected = _by_hand(data, tmp_path / "nonmatch")
    m = report["metrics"]
    assert (m["n_genuine"], m["n_impostor"]) == (6, 6)  # every listed pair stays in
    assert m["auc"] == pytest.approx(_mann_whitney_auc(score, genuine))
    assert m["best_accuracy"] == pytest.approx(_best_accuracy(score, genuine))
    expected_kfold = kfold_accuracy(np.where(rejected, 0.0, score), genuine, fold, rejected)
    assert report["kfold"]["accuracy_mean"] == pytest.approx(expected_kfold["accuracy_mean"])

    done = run_in_process("facetrain.eval", [*common, "--output", tmp_path / "exclude", "--fta", "exclude"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "exclude" / "metrics.json").read_text())
    m, kept = report["metrics"], ~rejected
    assert report["failures_to_acquire"]["policy"] == "exclude" and (m["n_genuine"], m["n_impostor"]) == (3, 4)
    assert m["auc"] == pytest.approx(_mann_whitney_auc(score[kept], genuine[kept]))
    assert m["best_accuracy"] == pytest.approx(_best_accuracy(score[kept], genuine[kept]))
    # the rejected pairs can only lower the figures
    assert m["best_accuracy"] >= json.loads((tmp_path / "nonmatch" / "metrics.json").read_text())["metrics"][
        "best_accuracy"]

    stopped = run_in_process("facetrain.eval", [*common, "--output", tmp_path / "error", "--fta", "error"])
    assert stopped.returncode == 2 and "2 image(s) cannot be used (failures to acquire)" in stopped.stderr
    assert "bob_0003" in stopped.stderr and "(missing)" in stopped.stderr
    assert "ann_0003.png (not_an_image)" in stopped.stderr


def test_verify_answers_a_failure_to_acquire(lfw, template_detector, capsys):
    from facetrain import verify

    data, bundle = lfw
    good = data / "dee" / "dee_0001.png"
    for rel, (problem, _) in FAILED.items():
        assert verify.main(["--model", str(bundle), str(good), str(data / rel), "--json", "--threshold", "0.1"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["same"] is False and result["similarity"] is None, result
        assert [(r["path"], r["problem"]) for r in result["failure_to_acquire"]] == [(str(data / rel), problem)]
    assert verify.main(["--model", str(bundle), str(data / "cy" / "cy_0003.png"), str(good)]) == 0
    text = capsys.readouterr().out
    assert "failure to acquire" in text and "cy_0003.png (no_face" in text and "DIFFERENT people" in text


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_service_answers_a_faceless_photo_and_refuses_garbage():
    pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
    pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
    from fastapi.testclient import TestClient
    from test_serve_inputs import FACELESS_WIDTH, StandIn

    from facetrain.deploy.gallery import Gallery

    face, faceless = _b64(render(0, 1, 1).resize((16, 16))), _b64(Image.new("RGB", (FACELESS_WIDTH, 16)))
    gallery = Gallery("/g", ["/g/a/1.png"], np.array([0]), ["a"], np.ones((1, StandIn.embedding_dim), np.float32))
    with TestClient(build_app_for(StandIn(), gallery)) as client:
        got = client.post("/verify", json={"image_a": face, "image_b": faceless})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["same"] is False and body["similarity"] is None
        assert [(r["image"], r["problem"]) for r in body["failure_to_acquire"]] == [("image_b", "no_face")]
        got = client.post("/identify", json={"image": faceless})
        assert got.status_code == 200 and got.json()["matches"] == [] and got.json()["match"] is False, got.text
        assert client.post("/verify", json={"image_a": face, "image_b": face}).json()["failure_to_acquire"] == []
        assert client.post("/embed", json={"image": faceless}).status_code == 422  # no embedding to give
        garbage = base64.b64encode(b"not an image at all").decode()
        assert client.post("/verify", json={"image_a": face, "image_b": garbage}).status_code == 415


def build_app_for(embedder, gallery):
    from facetrain.deploy.app import build_app

    return build_app(embedder, gallery)


def test_benchmark_set_with_an_undecodable_image(tmp_path):
    """--benchmarks: an image of a .bin set that does not decode is a failure to acquire there too."""
    from test_benchmarks import tiny_set

    from facetrain.evaluation.benchmarks import write_bin

    images, issame = tiny_set(20)
    images[5] = b"not an image"  # pair 2 is images 4 and 5
    (tmp_path / "bins").mkdir()
    write_bin(tmp_path / "bins" / "lfw.bin", images, issame)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16)
    model = create_model(cfg)
    (tmp_path / "bundle").mkdir()
    write_bundle(tmp_path / "bundle", model, cfg, resolve_preprocess(DataConfig(image_size=32), model))
    common = ["--model", tmp_path / "bundle", "--benchmarks", tmp_path / "bins", "--num-workers", 0]
    figures = {}
    for policy in ("nonmatch", "exclude"):
        done = run_in_process("facetrain.eval", [*common, "--output", tmp_path / policy, "--fta", policy])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "LFW: failures to acquire: 1 of 40 images" in done.stdout, done.stdout
        figures[policy] = json.loads((tmp_path / policy / "metrics.json").read_text())["sets"]["LFW"]
    fta = figures["nonmatch"]["failures_to_acquire"]
    assert (fta["count"], fta["files"][0]["path"]) == (1, "lfw.bin[5]")
    genuine = bool(issame[2])
    assert (fta["genuine_pairs"], fta["impostor_pairs"]) == ((1, 0) if genuine else (0, 1))
    m = figures["nonmatch"]["metrics"]
    assert m["n_genuine"] + m["n_impostor"] == 20
    m = figures["exclude"]["metrics"]
    assert m["n_genuine"] + m["n_impostor"] == 19
    # 2 pairs per fold: pair 2 is fold 1's first; nonmatch scores it (rejected), exclude leaves 1 pair there
    nonmatch, exclude = (figures[p]["kfold"]["fold_accuracies"][1] for p in ("nonmatch", "exclude"))
    assert nonmatch in (0.0, 0.5, 1.0) and exclude in (0.0, 1.0)


def test_all_pairs_eval_rejects_the_pairs_of_failed_images(lfw, template_detector, tmp_path):
    """All pairs of a folder, 3 people x 3 photos, one undecodable and one faceless: 9 genuine and 27 impostor
    pairs in both ROC modes; the 2 failed photos' pairs are rejected: 2 + 2 genuine, 6 + 6 - 1 impostor (the
    pair of the two counted once)."""
    data, bundle = lfw
    folder = tmp_path / "heldout"
    for k in range(3):
        (folder / f"p{k}").mkdir(parents=True)
        for i in range(3):
            render(0, k, i).resize((SIZE, SIZE)).save(folder / f"p{k}" / f"{i}.png")
    (folder / "p1" / "0.png").write_bytes(b"")
    Image.new("RGB", (SIZE, SIZE)).save(folder / "p2" / "2.png")
    common = ["--model", bundle, "--data", folder, "--no-plots", "--num-workers", 0, "--no-calibrate"]
    for mode in ("exact", "histogram"):
        out = tmp_path / mode
        done = run_in_process("facetrain.eval", [*common, "--output", out, "--roc-mode", mode, "--save-embeddings"])
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "metrics.json").read_text())
        fta, m = report["failures_to_acquire"], report["metrics"]
        assert (fta["attempted_images"], fta["count"], fta["genuine_pairs"], fta["impostor_pairs"]) == (9, 2, 4, 11)
        assert fta["by_problem"] == {"missing": 0, "undecodable": 1, "no_face": 1}
        assert (m["n_genuine"], m["n_impostor"], m["mode"]) == (9, 27, mode)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exact" / "embeddings.safetensors"), "pt") as f:
        emb, labels = f.get_tensor("embeddings").double().numpy(), f.get_tensor("labels").numpy()
    upper = np.triu_indices(len(labels), 1)
    score = (emb @ emb.T)[upper]
    genuine = (labels[:, None] == labels[None, :])[upper]
    score = np.concatenate([score, [-np.inf] * 15])  # the 4 genuine and 11 impostor pairs of the failed photos
    genuine = np.concatenate([genuine, [True] * 4 + [False] * 11])
    exact = json.loads((tmp_path / "exact" / "metrics.json").read_text())["metrics"]
    assert exact["auc"] == pytest.approx(_mann_whitney_auc(score, genuine))
    assert exact["best_accuracy"] == pytest.approx(_best_accuracy(score, genuine))
