"""End-to-end training: real processes, real DDP over gloo, resume, bf16, face folders, HF datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    EXACT,
    FACES,
    NO_SHARED_REASON,
    WEIGHTS,
    assert_same_logged_loss,
    load_weights,
    run_train,
    tiny_train_config,
    train_one_and_many_runs,
)

from facetrain.data.synthetic import render

DDP_MODELS = {
    "groupnorm": {"backbone": "test_efficientnet_gn"},  # GroupNorm: per-sample statistics, nothing to synchronise
    "batchnorm_sync_bn": {"backbone": "test_efficientnet", "sync_bn": True},  # BatchNorm over the global batch
}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Each model of DDP_MODELS trained on 1 process and on 2 (the 2-process runs in one launch)."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfgs = {name: tiny_train_config(tmp, {**EXACT, "model": model}, f"{name}.yaml")
            for name, model in DDP_MODELS.items()}
    return train_one_and_many_runs(cfgs, tmp, 16, 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(DDP_MODELS))
def test_two_process_ddp_equals_one_process_on_the_same_global_batches(two_process_runs, model):
    # both ranks trained, on different images, and together on exactly the 1-process global batches
    one, two = two_process_runs[model]

    w1, w2 = load_weights(one / "bundle"), load_weights(two / "bundle")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    assert_same_logged_loss(one, two, 4)
    d1, d2 = (json.loads((d / "done.json").read_text()) for d in (one, two))
    assert d2["final"]["auc"] == pytest.approx(d1["final"]["auc"], abs=1e-4)


@pytest.mark.slow
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    # augmentation and dropout on: their randomness must also resume exactly
    cfg = tiny_train_config(tmp_path, {"model": {"drop_rate": 0.2},
                                       "train": {"max_steps": 8, "val_every": 4, "ckpt_every": 100}})
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(["--config", cfg, "--train.output_dir", full])
    proc = run_train(["--config", cfg, "--train.output_dir", part, "--debug.stop_at_step", "5"])
    assert "stop requested" in proc.stdout and not (part / "done.json").exists()
    assert (part / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    refused = run_train(["--config", cfg, "--train.output_dir", part], check=False)
    assert refused.returncode == 2 and "--train.resume auto" in refused.stderr
    proc = run_train(["--config", cfg, "--train.output_dir", part, "--train.resume", "auto"])
    assert "resumed from" in proc.stdout and "at step 5" in proc.stdout
    assert json.loads((part / "done.json").read_text())["step"] == 8
    a = load_weights(full / "checkpoints" / "step_00000008")
    b = load_weights(part / "checkpoints" / "step_00000008")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # the saved config and every checkpoint carry the resolved settings
    meta = json.loads((part / "checkpoints" / "step_00000008" / "facetrain.json").read_text())
    assert meta["config"]["model"]["drop_rate"] == 0.2 and meta["config"]["data"]["mean"] is not None
    assert (part / "config.yaml").is_file()


def test_bf16_run_trains_and_exports(tmp_path):
    cfg = tiny_train_config(tmp_path, {"train": {"mixed_precision": "bf16", "max_steps": 4, "val_every": 4}})
    proc = run_train(["--config", cfg, "--train.output_dir", tmp_path / "bf16"])
    assert "bf16 precision" in proc.stdout
    done = json.loads((tmp_path / "bf16" / "done.json").read_text())
    assert np.isfinite(done["final"]["auc"])
    weights = load_weights(tmp_path / "bf16" / "bundle")
    floats = [w for w in weights.values() if w.is_floating_point()]
    assert floats and all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in floats)


def test_grad_accumulation_and_other_losses_run(tmp_path):
    for loss, miner, preset in (("contrastive", "triplet_semihard", "adam_cosine"),
                                ("multi_similarity", "multi_similarity", "ranger_exponential"),
                                ("arcface", "none", "schedulefree_adamw"),
                                ("bce_pair", "triplet_all", "sgd_step")):
        out = tmp_path / loss
        cfg = tiny_train_config(tmp_path, {"loss": {"name": loss, "miner": miner}, "optim": {"preset": preset},
                                           "train": {"max_steps": 2, "val_every": 2, "grad_accum_steps": 2}})
        run_train(["--config", cfg, "--train.output_dir", out])
        done = json.loads((out / "done.json").read_text())
        assert done["step"] == 2 and np.isfinite(done["final"]["auc"]), loss


def write_faces(root: Path, identities: int, per_identity: int, size: int = 48) -> None:
    for k in range(identities):
        folder = root / f"person_{k:03d}"
        folder.mkdir(parents=True)
        for i in range(per_identity):
            render(7, k, i, size).convert("L").save(folder / f"{i:04d}.png")  # gray: must become RGB


def test_hf_imagefolder_source(tmp_path):
    write_faces(tmp_path / "faces", 12, 6)
    cfg = tiny_train_config(tmp_path, {"data": {"source": "hf", "root": str(tmp_path / "faces"),
                                                "val_identities": 4},
                                       "train": {"batch_size": 8, "max_steps": 2, "val_every": 2}})
    proc = run_train(["--config", cfg, "--train.output_dir", tmp_path / "hf"])
    assert "8 train / 4 val identities, 48 / 24 images" in proc.stdout


def test_pretrained_weights_from_local_file(tmp_path):
    if not WEIGHTS.is_file():
        pytest.skip(NO_SHARED_REASON)
    from safetensors.torch import load_file

    from facetrain.config.schema import ModelConfig
    from facetrain.errors import UserError
    from facetrain.model.network import create_model

    model = create_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained_file=str(WEIGHTS), pretrained=True,
                                     channels_last=False))
    ref = load_file(str(WEIGHTS))
    torch.testing.assert_close(model.backbone.conv_stem.weight, ref["conv_stem.weight"])
    assert model.backbone.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # its own normalisation, not ImageNet's
    with pytest.raises(UserError, match="does not fit backbone 'resnet18'"):
        create_model(ModelConfig(backbone="resnet18", pretrained_file=str(WEIGHTS), pretrained=True))


@pytest.mark.slow
@pytest.mark.skipif(not (FACES / "att_faces").is_dir(), reason=NO_SHARED_REASON)
def test_att_faces_training_beats_untrained_model(tmp_path):
    cfg = tiny_train_config(tmp_path, {
        "data": {"source": "folder", "root": str(FACES / "att_faces"), "image_size": 48, "val_identities": 10},
        "model": {"backbone": "test_resnet", "embedding_dim": 64},
        "loss": {"name": "multi_similarity", "miner": "multi_similarity"},
        "optim": {"lr": 5e-3},
        "train": {"batch_size": 32, "max_steps": 60, "val_every": 30, "ckpt_every": 60}})
    run_train(["--config", cfg, "--train.output_dir", tmp_path / "att"])
    done = json.loads((tmp_path / "att" / "done.json").read_text())
    print("att_faces val AUC untrained", done["untrained"]["auc"], "trained", done["final"]["auc"])
    # raw pixels already separate ORL faces well (untrained ~0.93): training must still clearly add to it
    assert done["final"]["auc"] > done["untrained"]["auc"] + 0.02
    assert done["final"]["eer"] < done["untrained"]["eer"] * 0.75


def check_validation_pictures(run: Path) -> None:
    """<run>/validation/errors.png is the grid of worst_pairs.json's pairs, which are validation pairs of the
    right kind, worst first."""
    from PIL import Image

    from facetrain.evaluation.pictures import WORST_PAIRS, grid_size

    worst = json.loads((run / "validation" / "worst_pairs.json").read_text())
    assert len(worst["genuine"]) == len(worst["impostor"]) == WORST_PAIRS and worst["far"] == 1e-2  # 960 impostor pairs
    for kind, same, sign in (("genuine", True, 1), ("impostor", False, -1)):
        scores = [sign * p["score"] for p in worst[kind]]
        assert scores == sorted(scores)
        for p in worst[kind]:  # synthetic keys: synthetic:<identity>/<image>
            assert (p["a"].split("/")[0] == p["b"].split("/")[0]) == same, p
    with Image.open(run / "validation" / "errors.png") as im:
        assert im.format == "PNG" and im.size == grid_size(WORST_PAIRS, WORST_PAIRS)


def test_resuming_a_finished_run_changes_nothing_and_another_split_is_refused(tmp_path):
    cfg = tiny_train_config(tmp_path, {"train": {"max_steps": 3, "val_every": 3, "ckpt_every": 3}})
    run = tmp_path / "run"
    first = run_train(["--config", cfg, "--train.output_dir", run])
    # no TensorBoard in this run: the final validation's errors.png is written, the projector skipped with a note
    assert "no TensorBoard projector" in first.stdout and not (run / "tb").exists()
    check_validation_pictures(run)
    files = [run / "done.json", run / "config.yaml", run / "bundle" / "model.safetensors",
             run / "bundle" / "facetrain.json"]
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    proc = run_train(["--config", cfg, "--train.output_dir", run, "--train.resume", "auto"])
    assert "is complete (step 3 of 3); nothing to do" in " ".join(proc.stdout.split())  # rich wraps lines
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
    # a different identity split would put trained people into validation
    for key, value in (("data.split_seed", "7"), ("data.val_identities", "8"), ("data.synthetic_seed", "1")):
        refused = run_train(["--config", cfg, "--train.output_dir", run, "--train.resume", "auto",
                             "--train.max_steps", "6", f"--{key}", value], check=False)
        assert refused.returncode == 2, refused.stdout[-2000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert "another identity split" in line and key in line, line
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
