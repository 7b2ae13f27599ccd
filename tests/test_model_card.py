"""The model card (facetrain/model/card.py): built from a bundle's metadata, written as MODEL_CARD.md and
`model_card` in facetrain.json by training, updated by facetrain.eval with each calibrating evaluation (bundle or
exported file), carried into an exported file's metadata; bundles from before cards get one when evaluated or
exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import FACES, NO_SHARED_REASON, REPO, run_in_process

from facetrain.model.card import CARD_FILE, CARD_KEY, LEFT_OUT_SHOWN, build_card, data_summary, evaluation_entry
from facetrain.model.card import render_markdown as render

LEGACY = REPO / "tests" / "data" / "legacy"

# A bundle's metadata as training writes it, cut to what a card reads.
META = {
    "model": {"backbone": "resnet18", "embedding_dim": 128, "pretrained": True},
    "preprocess": {"image_size": 112},
    "step": 900,
    "config": {"loss": {"name": "arcface", "margin": 28.6, "distance": "cosine", "miner": "none", "scale": 30.0},
               "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "scheduler": "cosine"},
               "data": {"source": "folder", "root": "/data/private/celeb_aligned"}},
    "data_summary": data_summary("folder", "/data/private/celeb_aligned", (900, 27000), (100, 3000),
                                 [f"/data/private/celeb_aligned/p{i}/bad.jpg" for i in range(7)]),
    "alignment": {"detector": "mtcnn", "template": "arcface_112", "size": 112},
    "val_metrics": {"auc": 0.981, "eer": 0.06, "tar@far=1e-02": 0.8, "tar@far=1e-03": None, "n_genuine": 13500,
                    "n_impostor": 4485000},
    "threshold": None, "threshold_far": None,
}

REPORT = {"protocol": "all_pairs", "data": "/data/private/heldout", "pairs_file": None, "n_images": 500,
          "n_identities": 50, "flip": True,
          "metrics": {"auc": 0.97, "eer": 0.08, "tar@far=1e-03": 0.6, "n_genuine": 2250, "n_impostor": 122500},
          "calibration": {"threshold": 0.4321, "far": 1e-3},
          "intervals": {"level": 0.95, "auc": [0.96, 0.98], "tar_at_far": {"1e-03": [0.55, 0.65]},
                        "delivered_far": [0.0008, 0.0012]},
          "failures_to_acquire": {"rate": 0.012, "count": 6}}


def test_card_of_a_training_bundle_names_data_loss_and_limits():
    card = build_card(META)
    text = render(card)
    assert card["data"]["preflight_left_out"] == {"count": 7, "first": [f"p{i}/bad.jpg" for i in range(LEFT_OUT_SHOWN)]}
    assert "| train | 900 | 27,000 |" in text and "| validation | 100 | 3,000 |" in text
    assert "7 file(s) (first: `p0/bad.jpg`" in text and "/data/private" not in json.dumps(card)
    assert "loss: arcface (margin 28.6" in text and "optimizer: sgd, lr 0.1" in text
    assert "timm's pretrained resnet18 (its licence applies" in text and "teacher: none" in text
    assert "| AUC | 0.9810 | n/a |" in text and "1e-03" not in card["validation"]["tar_at_far"]
    assert "synthetic" not in text  # real data: no synthetic warning
    limits = "\n".join(card["limits"])
    assert "not evaluated with facetrain.eval yet" in limits and "no threshold calibrated yet" in limits
    assert "trained on 900 identities (27,000 images) from celeb_aligned" in limits


def test_evaluation_threshold_intervals_and_teacher_are_rendered():
    teacher = {"file": "/weights/big_teacher.safetensors", "sha256": "ab" * 32, "licence": "MIT (insightface)"}
    first = build_card({**META, "teacher": teacher})
    meta = {**META, "teacher": teacher, CARD_KEY: first, "threshold": 0.4321, "threshold_far": 1e-3,
            "threshold_calibration": {"tar": 0.6, "protocol": "all_pairs", "data": "/data/private/heldout",
                                      "n_impostor": 122500, "n_genuine": 2250, "flip": True, "date": "2026-12-07"}}
    card = build_card(meta, evaluation_entry(REPORT, "2026-12-07T10:00:00"))
    again = build_card({**meta, CARD_KEY: card}, evaluation_entry({**REPORT, "intervals": None}, "2026-12-08"))
    text = render(again)
    assert len(again["evaluations"]) == 2  # every calibrating evaluation is kept, in order
    assert "`big_teacher.safetensors` (sha256 abab" in text and "MIT (insightface)" in text
    assert "| AUC | 0.9700 | [0.9600, 0.9800] |" in text and "| TAR at FAR 1e-03 | 0.6000 | [0.5500, 0.6500] |" in text
    assert "| delivered FAR at the threshold | | [0.0008, 0.0012] |" in text
    assert "Failures to acquire: 1.20% (6 images)." in text
    assert "| AUC | 0.9700 | n/a |" in text  # the second report had no intervals
    assert "cosine similarity >= 0.432100. Target FAR 0.001" in text and "heldout" in text
    assert "last evaluated on 50 held-out people (heldout, 122,500 impostor pairs)" in "\n".join(again["limits"])
    assert "/data/private" not in json.dumps(again)


def test_card_of_a_bundle_without_counts_or_teacher_licence():
    meta = json.loads((LEGACY / "bundle" / "facetrain.json").read_text())  # written before model cards
    card = build_card({**meta, "teacher": {"file": "t.onnx", "sha256": "00"}})
    text = render(card)
    assert "Identity and image counts: not recorded" in text and card["data"]["source"] == "synthetic"
    assert "synthetic training data (drawn cartoon faces): not a face model" in card["limits"][0]
    assert "threshold calibrated on 240 impostor pairs" in "\n".join(card["limits"])
    assert "licence / source: not recorded" in text
    assert "teacher whose licence is not recorded" in "\n".join(card["limits"])


# ------------------------------------------------------------------------------------- commands, legacy files


def _eval(model: Path, data: Path, out: Path, *extra) -> None:
    proc = run_in_process("facetrain.eval", ["--model", model, "--data", data, "--output", out, "--num-workers", "0",
                                             "--no-plots", "--target-far", "0.1", "--mixed-precision", "no", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def legacy(tmp_path) -> Path:
    """The files of tests/data/legacy (written before model cards), copied: eval writes into them."""
    for name in ("bundle", "gallery"):
        shutil.copytree(LEGACY / name, tmp_path / name)
    shutil.copy(LEGACY / "model.onnx", tmp_path / "model.onnx")
    return tmp_path


def _onnx_props(path: Path) -> dict[str, str]:
    onnx = pytest.importorskip("onnx", reason='needs the serve extra: pip install -e ".[serve]"')
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_legacy_bundle_and_onnx_gain_a_card_from_eval(legacy):
    """eval writes MODEL_CARD.md with the evaluation into a bundle from before cards, and a card into an old
    exported file's metadata; --no-calibrate leaves the model (and its card) untouched."""
    bundle, gallery = legacy / "bundle", legacy / "gallery"
    _eval(bundle, gallery, legacy / "ev0", "--no-calibrate")
    assert not (bundle / CARD_FILE).exists()
    _eval(bundle, gallery, legacy / "ev1")
    meta = json.loads((bundle / "facetrain.json").read_text())
    (entry,) = meta[CARD_KEY]["evaluations"]
    assert entry["data"] == "gallery" and entry["n_impostor"] == 240 and entry["auc"] == pytest.approx(0.6975, 5e-3)
    text = (bundle / CARD_FILE).read_text()
    assert text == render(meta[CARD_KEY]) and f"cosine similarity >= {meta['threshold']:.6f}" in text

    old = legacy / "model.onnx"
    assert CARD_KEY not in _onnx_props(old)
    _eval(old, gallery, legacy / "ev2", "--backend", "onnxruntime")
    props = _onnx_props(old)
    card = json.loads(props[CARD_KEY])
    assert len(card["evaluations"]) == 1 and card["threshold"]["far"] == 0.1
    assert "counts: not recorded" in json.loads(props["model_card_markdown"])


@pytest.mark.slow
def test_legacy_bundle_exports_with_a_card(legacy):
    """An export (torch's exporter: ~5 s on an idle 2-core CPU) of a bundle from before cards carries one."""
    pytest.importorskip("onnxruntime", reason='needs the serve extra: pip install -e ".[serve]"')
    from facetrain.deploy.export import export

    export(legacy / "bundle", legacy / "new.onnx")
    props = _onnx_props(legacy / "new.onnx")
    card = json.loads(props[CARD_KEY])
    assert card["threshold"]["value"] == pytest.approx(0.841525) and card["evaluations"] == []
    assert "no facetrain.eval figures on this card" in json.loads(props["model_card_markdown"])


@pytest.mark.faces
@pytest.mark.skipif(not FACES.is_dir(), reason=NO_SHARED_REASON)
def test_trained_bundle_checkpoint_and_export_carry_the_card(tmp_path_factory):
    """The shared trained fixture (test_export: 4 steps on the AT&T faces, 6 validation people, then
    facetrain.eval with the flip test): its checkpoint's card is training's own, its bundle's shows the eval."""
    pytest.importorskip("onnx", reason='needs the serve extra: pip install -e ".[serve]"')
    import onnx
    from test_export import trained_bundle, trained_export

    bundle = trained_bundle(tmp_path_factory)
    checkpoint = bundle.parent / "checkpoints" / "step_00000004"
    text = (checkpoint / CARD_FILE).read_text()  # before facetrain.eval
    assert "| train | 34 | 340 |" in text and "| validation | 6 | 60 |" in text
    assert "Source: folder `att_faces`." in text and "loss: triplet" in text and "No validation figures" in text
    assert "no threshold calibrated yet" in text

    meta = json.loads((bundle / "facetrain.json").read_text())
    text = (bundle / CARD_FILE).read_text()
    assert text == render(meta[CARD_KEY]) and "### 1. att_faces" in text and "flip test on" in text
    assert "## Validation during training" in text and "| AUC |" in text
    assert f"cosine similarity >= {meta['threshold']:.6f}" in text

    props = {p.key: p.value for p in onnx.load(str(trained_export(tmp_path_factory))).metadata_props}
    assert json.loads(props[CARD_KEY]) == meta[CARD_KEY]
