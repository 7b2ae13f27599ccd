"""Levers of the small-data recipe (configs/small_data.yaml, docs/recipes.md): frozen backbone stages
(model.freeze_stages), frozen BatchNorm statistics (model.freeze_bn) and weight EMA (train.ema_decay).

    pytest tests/test_recipes_levers.py
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FACES, NO_SHARED_REASON, REPO, WEIGHTS, load_weights, run_train, tiny_train_config

from facetrain.config.load import load_config
from facetrain.config.schema import ModelConfig
from facetrain.errors import UserError
from facetrain.model.bundle import load_bundle
from facetrain.model.network import create_model
from facetrain.training.optim import param_groups


def _frozen_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_stages_freezes_stem_and_first_stages_only():
    model = create_model(ModelConfig(backbone="test_efficientnet", embedding_dim=8, channels_last=False,
                                     freeze_stages=2))
    frozen = _frozen_names(model)
    assert frozen, "nothing was frozen"
    assert all(n.startswith(("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0.")) for n in frozen)
    assert any(n.startswith("backbone.conv_stem") for n in frozen)
    assert any(n.startswith("backbone.blocks.0.") for n in frozen)
    assert not any(n.startswith("backbone.blocks.1.") for n in frozen)
    assert all(p.requires_grad for p in model.head.parameters())
    # the frozen stages' BatchNorm keeps its pretrained statistics in train mode too
    before = model.backbone.bn1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.backbone.bn1.running_mean, before)


def test_freeze_bn_keeps_pretrained_statistics_but_trains_the_weights():
    model = create_model(ModelConfig(backbone="test_efficientnet", embedding_dim=8, channels_last=False,
                                     freeze_bn=True))
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    model.train()
    assert model.training and not model.backbone.bn1.training
    model(torch.randn(4, 3, 32, 32) * 5 + 3).sum().backward()
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if "running" in n)
    assert model.backbone.bn1.weight.grad is not None  # scale/shift still learn
    model.eval()
    model.train()  # switching back to training keeps them frozen
    assert not model.backbone.bn1.training


def test_freeze_whole_backbone_leaves_only_the_head_to_the_optimizer():
    cfg = load_config(overrides=["--model.backbone", "test_efficientnet", "--model.freeze_stages", "-1"])
    model = create_model(cfg.model)
    groups = param_groups(model, None, cfg.optim)
    assert [g["name"] for g in groups] == ["head"]
    assert _frozen_names(model) == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}


def test_freeze_stages_bad_values_are_one_line_errors():
    with pytest.raises(UserError, match="model.freeze_stages"):
        load_config(overrides=["--model.freeze_stages", "-2"])
    with pytest.raises(UserError, match="model.freeze_stages: 99"):
        create_model(ModelConfig(backbone="test_efficientnet", freeze_stages=99))


def test_training_with_frozen_stages_keeps_them_and_exports_a_loadable_bundle(tmp_path):
    """A user freezing the stem + first stage gets those weights back unchanged in the bundle, the rest
    trained, and the bundle loads for eval/verify (same module types as during training)."""
    cfg = tiny_train_config(tmp_path, {"model": {"freeze_stages": 2}, "train": {"max_steps": 4, "val_every": 2}})
    out = tmp_path / "run"
    run_train(["--config", cfg, "--train.output_dir", out])
    assert json.loads((out / "done.json").read_text())["step"] == 4

    from accelerate.utils import set_seed

    set_seed(0)  # the trainer's seed before it builds the model: the same initial weights
    initial = create_model(load_config(str(cfg)).model).state_dict()
    trained = load_weights(out / "checkpoints" / "step_00000004")
    for name in ("backbone.conv_stem.weight", "backbone.bn1.running_mean", "backbone.blocks.0.0.conv.weight",
                 "backbone.blocks.0.0.bn1.running_var"):
        assert torch.equal(trained[name], initial[name].contiguous()), f"{name} changed although frozen"
    assert not torch.equal(trained["backbone.blocks.1.0.conv_exp.weight"],
                           initial["backbone.blocks.1.0.conv_exp.weight"].contiguous())
    model, _, meta = load_bundle(out / "bundle")
    assert meta["model"]["freeze_stages"] == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def _train_state(checkpoint):
    return torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=True)


def test_weight_ema_is_what_validation_exports_and_survives_resume(tmp_path):
    """With train.ema_decay the best bundle holds the averaged weights (not the last step's), the checkpoint
    keeps both, and a stopped-and-resumed run exports the same averaged model as an uninterrupted one."""
    cfg = tiny_train_config(tmp_path, {"train": {"ema_decay": 0.9, "max_steps": 4, "val_every": 4,
                                                 "ckpt_every": 2}})
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_train(["--config", cfg, "--train.output_dir", full])
    last = full / "checkpoints" / "step_00000004"
    bundle, raw, ema = load_weights(full / "bundle"), load_weights(last), _train_state(last)["ema"]
    name = "head.weight"
    assert torch.equal(bundle[name], ema[name])
    assert not torch.equal(bundle[name], raw[name])

    run_train(["--config", cfg, "--train.output_dir", parts, "--debug.stop_at_step", "2"])
    run_train(["--config", cfg, "--train.output_dir", parts, "--train.resume", "auto"])
    resumed = load_weights(parts / "bundle")
    assert all(torch.equal(resumed[k], bundle[k]) for k in bundle)


def _hub_cache(root, weights) -> None:
    """An HF hub cache holding `timm/tf_efficientnet_lite0.in1k` as a download would leave it (refs/main ->
    snapshot -> model.safetensors), made from the local weights file: timm's own pretrained path, offline."""
    repo = root / "models--timm--tf_efficientnet_lite0.in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").symlink_to(weights)


@pytest.mark.slow
def test_small_data_recipe_trains_from_timm_hub_weights_with_the_same_key(tmp_path):
    """configs/small_data.yaml with `--model.pretrained_file ""` takes timm's own pretrained weights (from the HF
    hub cache, which is what a machine with internet downloads into) through the same model.pretrained key; with
    no weights reachable the run stops with one line naming the key and the way out."""
    if not WEIGHTS.is_file() or not (FACES / "att_faces").is_dir():
        pytest.skip(NO_SHARED_REASON)
    hub = tmp_path / "hub"
    _hub_cache(hub, WEIGHTS)
    out = tmp_path / "run"
    args = ["--config", REPO / "configs" / "small_data.yaml", "--model.pretrained_file", "",
            "--data.root", FACES / "att_faces", "--data.image_size", "64", "--data.val_identities", "4",
            "--train.batch_size", "16", "--train.max_steps", "2", "--train.val_every", "2", "--train.ckpt_every", "2",
            "--train.num_workers", "0", "--train.progress", "false", "--train.output_dir", out]
    run_train(args, env={"HF_HUB_CACHE": str(hub)})
    from safetensors.torch import load_file

    trained = load_weights(out / "bundle")
    # the stem is frozen by the recipe: it must still be exactly the hub file's ImageNet weights
    assert torch.equal(trained["backbone.conv_stem.weight"], load_file(str(WEIGHTS))["conv_stem.weight"])
    meta = json.loads((out / "bundle" / "facetrain.json").read_text())
    assert meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # the weights' own normalisation, from timm's config

    (tmp_path / "empty").mkdir()
    proc = run_train(args[:-1] + [tmp_path / "run2"], env={"HF_HUB_CACHE": str(tmp_path / "empty")}, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.pretrained: cannot get timm's pretrained weights for 'tf_efficientnet_lite0'" in last, last
    assert "model.pretrained_file" in last
