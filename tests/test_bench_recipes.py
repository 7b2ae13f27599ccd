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
