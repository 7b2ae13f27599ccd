"""Every config shipped in configs/ loads, validates and names registered pieces; the in-the-wild recipe trains
end to end with the settings it documents (multi-similarity + miner over frozen BatchNorm statistics)."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, WEIGHTS, run_train

from facetrain.config.load import load_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_names_registered_pieces(path, tmp_path):
    if "../shared/weights" in path.read_text() and not WEIGHTS.is_file():
        pytest.skip(f"{path.name} names the shared weights file, not found at {WEIGHTS}")
    load_config(str(path), ["--data.root", str(tmp_path)])  # names are checked against config/names.py here


def test_wild_recipe_is_what_docs_recipes_md_measured():
    cfg = load_config(str(REPO / "configs" / "wild.yaml"), ["--data.root", "x", "--model.pretrained_file", ""])
    assert (cfg.loss.name, cfg.loss.miner) == ("multi_similarity", "multi_similarity")
    assert cfg.model.freeze_bn and cfg.model.freeze_stages == 3 and cfg.data.image_size == 112
    assert cfg.data.augment.grayscale == 0.2 and cfg.data.augment.saturation > 0  # colour kept
    assert cfg.data.augment.crop_scale_min == 0.4 and cfg.model.embedding_dim == 256  # the second benchmark's
    assert (cfg.optim.lr, cfg.optim.backbone_lr_mult) == (1e-3, 0.3)


def test_wild_recipe_trains_end_to_end(tmp_path):
    """A few real steps of configs/wild.yaml as shipped (random init instead of the weights file, synthetic
    colour faces); the resolved config saved with the run is the recipe's."""
    out = tmp_path / "run"
    run_train(["--config", REPO / "configs" / "wild.yaml", "--data.source", "synthetic",
               "--data.synthetic_identities", "12", "--data.synthetic_images_per_identity", "5",
               "--data.val_identities", "4", "--model.pretrained", "false", "--model.pretrained_file", "",
               "--train.max_steps", "3", "--train.val_every", "3", "--train.num_workers", "0",
               "--train.progress", "false", "--train.tensorboard", "false", "--train.output_dir", out])
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == 3
    resolved = (out / "config.yaml").read_text()
    assert "multi_similarity" in resolved and "freeze_bn: true" in resolved
