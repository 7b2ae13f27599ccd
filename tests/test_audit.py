"""The teacher audits the data (issue 25 item 7): the statistics on hand-made embeddings, the command on a tiny
folder with the tiny exported teacher (tests/data/legacy/model.onnx), and data.exclude leaving files out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_in_process

from facetrain.config.exclusions import read_exclusions
from facetrain.config.load import load_config
from facetrain.config.schema import DataConfig
from facetrain.data.audit import AuditThresholds, audit, checked_folder, exclusions, identity_scores
from facetrain.data.faceset import folder_faceset
from facetrain.data.preflight import apply_preflight
from facetrain.errors import UserError
from facetrain.model.card import build_card, data_summary, render_markdown

LEGACY = Path(__file__).parent / "data" / "legacy"
DIM = 32


def _people(n_ids: int, per_id: int, noise: float = 0.3, seed: int = 0):
    """Embeddings of n_ids well-separated people (random directions plus noise), L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, DIM))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = centres[labels] / np.sqrt(DIM) + noise * rng.standard_normal((len(labels), DIM)) / np.sqrt(DIM)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"id{k}" for k in range(n_ids)]
    paths = [f"/d/id{c}/{i}.png" for i, c in enumerate(labels)]
    return emb, labels, names, paths, centres


def test_clean_set_reports_nothing():
    emb, labels, names, paths, _ = _people(8, 6)
    found = audit(emb, labels, names, paths)
    assert found["mislabels"] == [] and found["duplicates"] == []


def test_planted_mislabel_found_and_its_true_identity_named():
    emb, labels, names, paths, centres = _people(8, 6)
    planted = 2 * 6 + 1  # an image of id2 ...
    emb[planted] = centres[5] / np.linalg.norm(centres[5])  # ... that shows id5
    found = audit(emb, labels, names, paths)
    assert [f["path"] for f in found["mislabels"]] == [paths[planted]]
    assert found["mislabels"][0]["likely_label"] == "id5" and found["mislabels"][0]["identity"] == "id2"
    assert exclusions(found, labels, names, paths, "/d") == [f"id2/{planted}.png"]


def test_one_bad_image_does_not_drag_the_centroid():
    """The leave-one-out core centroid: a planted image does not lower its identity-mates' scores."""
    emb, labels, *_ = _people(1, 6)
    clean, _ = identity_scores(emb, 0.5)
    emb[0] = -emb[1]
    dirty, _ = identity_scores(emb, 0.5)
    assert dirty[0] < -0.5 and np.allclose(dirty[2:], clean[2:], atol=0.15)


def test_planted_duplicate_pair_found_and_the_smaller_left_out():
    emb, labels, names, paths, centres = _people(6, 6)
    emb = np.concatenate([emb, emb[labels == 3][:4] + 0.01])  # id3 again, 4 images, under the name id6
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.concatenate([labels, np.full(4, 6)])
    names, paths = names + ["id6"], paths + [f"/d/id6/x{i}.png" for i in range(4)]
    found = audit(emb, labels, names, paths)
    assert [p["identities"] for p in found["duplicates"]] == [["id3", "id6"]]
    assert found["duplicates"][0]["left_out"] == "id6" and found["mislabels"] == []
    assert exclusions(found, labels, names, paths, "/d") == [f"id6/x{i}.png" for i in range(4)]


def test_bad_thresholds_and_exclusion_files_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--core-fraction"):
        AuditThresholds(core_fraction=0).check()
    (tmp_path / "bad.json").write_text('{"exclude": ["a.png"]}')
    (tmp_path / "broken.json").write_text('{"format": ')
    for name, match in (("missing.json", "not found"), ("bad.json", "not a facetrain audit"),
                        ("broken.json", "not valid JSON")):
        with pytest.raises(UserError, match=f"data.exclude: .*{match}") as err:
            load_config(None, ["--data.source", "folder", "--data.root", str(tmp_path),
                               "--data.exclude", str(tmp_path / name)])
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="data.exclude: .*data.source"):
        load_config(None, ["--data.exclude", str(tmp_path / "bad.json")])
    (tmp_path / "list.txt").write_text("# left out\na/1.png\n\n/abs/b.png\n")
    assert read_exclusions(tmp_path / "list.txt", "/r") == {"/r/a/1.png", "/abs/b.png"}


@pytest.fixture(scope="module")
def planted_audit(tmp_path_factory):
    """The legacy gallery with person_04's first image copied into person_00, audited by the tiny teacher
    (16-d, weak: the cuts are set for it)."""
    base = tmp_path_factory.mktemp("audit")
    root = base / "faces"
    shutil.copytree(LEGACY / "gallery", root)
    shutil.copy(root / "person_04" / "img_0.png", root / "person_00" / "planted.png")
    out = base / "out"
    proc = run_in_process("facetrain.audit", ["--teacher", str(LEGACY / "model.onnx"), "--data", str(root),
                                              "--output", str(out), "--max-cosine", "0.5", "--margin", "0.2",
                                              "--duplicate-cosine", "0.99", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, out, proc


def test_command_flags_the_planted_image(planted_audit):
    root, out, proc = planted_audit
    saved = json.loads((out / "audit.json").read_text())
    assert [f["path"] for f in saved["mislabels"]] == ["person_00/planted.png"]
    assert saved["mislabels"][0]["likely_label"] in ("person_03", "person_04")  # the tiny teacher mixes them up
    assert saved["exclude"] == ["person_00/planted.png"] and saved["duplicates"] == []
    assert len(saved["teacher"]["sha256"]) == 64 and saved["thresholds"]["max_cosine"] == 0.5
    assert "person_00/planted.png" in proc.stdout and "planted.png" in (out / "audit.txt").read_text()


def test_training_data_leaves_the_excluded_file_out(planted_audit, tmp_path):
    """What the trainer does with data.exclude (training/trainer.py setup_data): the pre-flight drops the file,
    names it in preflight.txt/json, and the model card's data summary counts it."""
    root, out, _ = planted_audit
    cfg = DataConfig(source="folder", root=str(root), exclude=str(out / "audit.json"))
    full = folder_faceset(str(root))
    kept = apply_preflight(full, cfg, tmp_path)
    planted = str(root / "person_00" / "planted.png")
    assert planted in full.paths and planted not in kept.paths and len(kept) == len(full) - 1
    assert kept.excluded == [planted] and kept.skipped == []
    pre = json.loads((tmp_path / "preflight.json").read_text())
    assert pre["counts"]["excluded"] == 1 and "planted.png" in (tmp_path / "preflight.txt").read_text()
    summary = data_summary("folder", str(root), (5, 20), (1, 4), kept.skipped, kept.excluded)
    assert summary["excluded"] == {"count": 1, "first": ["person_00/planted.png"]}
    card = render_markdown(build_card({"data_summary": summary, "config": {}}))
    assert "Left out by data.exclude" in card and "`person_00/planted.png`" in card


def test_refused_files_stop_the_audit_or_are_left_out(planted_audit, tmp_path):
    root = tmp_path / "faces"
    shutil.copytree(planted_audit[0], root)
    (root / "person_01" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="--bad-images"):
        checked_folder(str(root), 10**8, "error", progress=False)
    paths, labels, names, refused = checked_folder(str(root), 10**8, "skip", progress=False)
    assert [r["path"] for r in refused] == [str(root / "person_01" / "broken.png")]
    assert len(paths) == len(labels) == 25 and names[1] == "person_01"
