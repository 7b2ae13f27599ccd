"""The recipes benchmark's wild protocol (bench/recipes.py): the held-out identities are fixed by the seed and
never overlap training, and the table reports the cross-dataset columns. The benchmark's figures themselves
are never asserted (docs/recipes.md has them)."""

from __future__ import annotations

import importlib.util
import sys

from helpers import REPO


def _recipes():
    spec = importlib.util.spec_from_file_location("bench_recipes", REPO / "bench" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _aligned(root, identities=60, images=3):
    for i in range(identities):
        ident = root / f"{7000 + i}"
        ident.mkdir(parents=True)
        for j in range(images):
            (ident / f"{j}.png").write_bytes(b"png")
    (root / ".facetrain-align").mkdir()  # the aligner's journal folder is not an identity
    return root


def test_wild_split_is_seeded_disjoint_and_holds_out_49_identities(tmp_path):
    recipes = _recipes()
    aligned = _aligned(tmp_path / "aligned")
    train, test = recipes.identity_split(aligned, tmp_path / "work", seed=0)
    train_ids, test_ids = {p.name for p in train.iterdir()}, {p.name for p in test.iterdir()}
    assert len(test_ids) == recipes.WILD_TEST_IDENTITIES and len(train_ids) == 60 - recipes.WILD_TEST_IDENTITIES
    assert not train_ids & test_ids and ".facetrain-align" not in train_ids | test_ids
    assert all((train / i).resolve() == (aligned / i).resolve() for i in train_ids)  # links, nothing copied
    again = recipes.identity_split(aligned, tmp_path / "work2", seed=0)
    assert {p.name for p in again[1].iterdir()} == test_ids
    other = recipes.identity_split(aligned, tmp_path / "work3", seed=1)
    assert {p.name for p in other[1].iterdir()} != test_ids
    assert not (train / "facetrain_align.json").exists()  # the bench evaluates the crops as images


def test_table_has_a_cross_dataset_column_per_test_set_with_the_seed_means(tmp_path):
    recipes = _recipes()
    metrics = dict.fromkeys(recipes.METRICS, 0.5)

    def record(seed, auc, cross_auc):
        flip = {**metrics, "auc": auc}
        return {"row": "wild", "seed": seed, "steps": 10, "train_s": 5.0,
                "eval": {"flip": flip, "noflip": metrics,
                         "cross": {"att_faces": {**metrics, "auc": cross_auc}, "yale": metrics}}}

    text = recipes.table([record(0, 0.8, 0.9), record(1, 0.7, 0.7)], ["wild"], [0, 1], ["att_faces", "yale"])
    head, _, seed0, seed1, mean = text.splitlines()
    assert "att_faces AUC / TAR@1e-2" in head and "yale AUC / TAR@1e-2" in head
    assert seed0.count("|") == head.count("|") == mean.count("|")
    assert "0.9000 / 0.5000" in seed0 and "0.7500 (0.1000)" in mean and "0.8000 / 0.5000" in mean


def test_cost_classes_share_a_probe_across_embedding_sizes_but_not_input_sizes(tmp_path):
    """Rows whose steps cost the same compute share one step count: the 512-d embedding is not a class of its
    own (it got 605 steps against the recipe's 508 from its own probe), 224 px and freezing fewer stages are."""
    recipes = _recipes()
    root = str(tmp_path)
    wild = recipes.cost_class(recipes.ROWS["wild"], root)
    assert recipes.cost_class(recipes.ROWS["wild_emb512"], root) == wild
    assert recipes.cost_class(recipes.ROWS["wild_arcface"], root) == wild
    assert recipes.cost_class(recipes.ROWS["wild_224"], root) != wild
    assert recipes.cost_class(recipes.ROWS["wild_freeze6"], root) != wild


def test_distillation_rows_are_a_cost_class_of_their_own(tmp_path):
    """The online teacher is most of a distillation step's cost (bench/distill_step.py: 1.78x): a distillation
    row never shares a probe with a row without a teacher, and turning its terms off makes it one of those."""
    recipes = _recipes()
    if not recipes.SFACE.is_file():  # configs/distill.yaml names it, and a config's teacher must exist
        import pytest

        pytest.skip(f"configs/distill.yaml's teacher, the shared SFace file, not found at {recipes.SFACE}")
    root = str(tmp_path)
    distill = recipes.cost_class(recipes.ROWS["distill"], root)
    assert recipes.cost_class(recipes.ROWS["distill_rel_only"], root) == distill
    plain = recipes.Row("no teacher terms", recipes.DISTILL_YAML,
                        {"distill": {"cosine_weight": 0.0, "relational_weight": 0.0}})
    assert recipes.cost_class(plain, root) != distill


def test_a_second_stage_starts_from_its_first_stages_bundle(tmp_path):
    recipes = _recipes()
    row = recipes.ROWS["distill_ft"]
    assert row.after == "distill" and row.trains
    cmd = recipes.train_cmd(row, tmp_path, tmp_path / "run", 0, 10, 5, init_from=tmp_path / "first" / "bundle")
    assert cmd[cmd.index("--model.init_from") + 1] == str(tmp_path / "first" / "bundle")
    assert "--model.init_from" not in recipes.train_cmd(recipes.ROWS["distill"], tmp_path, tmp_path / "r", 0, 10, 5)


def test_the_teacher_row_is_scored_with_its_input_spec_and_trains_nothing(tmp_path, monkeypatch):
    recipes = _recipes()
    row = recipes.ROWS["teacher_sface"]
    assert not row.trains and row.input_spec == recipes.SFACE_SPEC
    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        out = __import__("pathlib").Path(cmd[cmd.index("--output") + 1])
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(__import__("json").dumps({"metrics": dict.fromkeys(recipes.METRICS, 0.5)}))
        return 0.0

    monkeypatch.setattr(recipes, "run_logged", fake_run)
    proto = recipes.Protocol(tmp_path / "train", {"heldout": tmp_path / "test"}, 0.2)
    record = recipes.run_job(recipes.Job("teacher_sface", row, 0), None, proto, tmp_path / "work", {})
    assert record["steps"] == 0 and record["eval"]["flip"]["auc"] == 0.5
    assert all(c[c.index("--model") + 1] == row.onnx and c[c.index("--input-spec") + 1] == row.input_spec
               and "--aligned" in c
               for c in commands) and len(commands) == 2  # with and without the flip test


def test_a_second_stage_listed_before_its_first_is_refused(capsys):
    recipes = _recipes()
    import pytest

    with pytest.raises(SystemExit):
        recipes.main(["--rows", "distill_ft,distill", "--direction", "yale_domain"])
    assert "list distill before it" in capsys.readouterr().err


def test_a_rows_key_is_its_settings_not_its_comments(tmp_path, monkeypatch):
    """A run is reused while its recipe's settings are unchanged: a config's comments may change (they say what
    was measured), a value may not; fields added later count only when set."""
    import hashlib
    import json

    import yaml

    recipes = _recipes()
    row = recipes.ROWS["wild"]
    blob = json.dumps([yaml.safe_load((recipes.REPO / row.config).read_text()), row.overrides, 0], sort_keys=True)
    assert recipes.recipe_key(row) == hashlib.sha1(blob.encode()).hexdigest()[:8]
    assert recipes.recipe_key(recipes.ROWS["distill_ft"]) != recipes.recipe_key(recipes.ROWS["distill"])
    text = (recipes.REPO / row.config).read_text()
    (tmp_path / "configs").mkdir()
    monkeypatch.setattr(recipes, "REPO", tmp_path)
    (tmp_path / row.config).write_text("# a new comment\n" + text.replace("\n", "  # and another\n", 3))
    assert recipes.recipe_key(row) == hashlib.sha1(blob.encode()).hexdigest()[:8]
    (tmp_path / row.config).write_text(text.replace("lr: 1.0e-3", "lr: 2.0e-3"))
    assert recipes.recipe_key(row) != hashlib.sha1(blob.encode()).hexdigest()[:8]


def test_the_domain_split_holds_out_ten_of_ext_yale_b(tmp_path):
    recipes = _recipes()
    train, test = recipes.identity_split(_aligned(tmp_path / "yale", identities=38), tmp_path / "work", 0,
                                         recipes.DOMAIN_TEST_IDENTITIES)
    assert len(list(test.iterdir())) == 10 and len(list(train.iterdir())) == 28
