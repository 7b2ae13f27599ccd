"""The Checkpointer alone, in-process: save, restore, keep the last k, export the best bundle; checkpoints in the
format of commit 15f7f7c (before the dict of stateful parts and LoopState) load and are written the same way."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from facetrain.config.schema import LossConfig, ModelConfig, OptimConfig
from facetrain.data.images import Preprocess
from facetrain.model.bundle import write_bundle
from facetrain.model.files import read_bundle_meta
from facetrain.model.network import create_model
from facetrain.training import checkpoint as ckpt
from facetrain.training.loop_state import LoopState
from facetrain.training.losses import MetricLoss
from facetrain.training.optim import Schedule, create_optimizer
from facetrain.training.stateful import EmaWeights


def parts(seed: int):
    torch.manual_seed(seed)
    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=8, channels_last=False)
    model = create_model(mcfg)
    loss = MetricLoss(LossConfig(name="arcface", margin=28.6), num_classes=5, embedding_dim=8)
    ocfg = OptimConfig(name="adamw", lr=1e-2, scheduler="cosine")
    opt = create_optimizer(model, loss, ocfg)
    return mcfg, model, loss, opt, Schedule(opt, ocfg, steps_per_epoch=10, max_steps=20, val_metric="auc")


PRE = Preprocess(32, [0.5] * 3, [0.5] * 3)

# The loop state a 15f7f7c run wrote (train_state.pt's state_json, tiny config, step 3 of 4, stopped by
# debug.stop_at_step 3): LoopState must read it and write it back byte for byte.
STATE_JSON_15F7F7C = (
    '{"step": 3, "best_metric": 0.6773282490079364, "best_step": 2, "untrained": {"auc": 0.6492342509920634, '
    '"eer": 0.36309523809523814, "eer_threshold": 0.9996752994401115, "best_accuracy": 0.851063829787234, '
    '"best_threshold": null, "tar@far=1e-01": 0.16666666666666666, "threshold@far=1e-01": 0.9998524785041809, '
    '"tar@far=1e-02": 0.02976190476190476, "threshold@far=1e-02": 0.9999378323554993, "tar@far=1e-03": null, '
    '"threshold@far=1e-03": null, "tar@far=1e-04": null, "threshold@far=1e-04": null, "tar_unavailable": '
    '["tar@far=1e-03: 960 impostor pairs < 1/FAR = 1000: FAR not resolvable", "tar@far=1e-04: 960 impostor pairs '
    '< 1/FAR = 10000: FAR not resolvable"], "n_genuine": 168, "n_impostor": 960, "mode": "exact", "bin_width": '
    '0.0}, "bad_steps": 0}')
# train_state.pt's entries as 15f7f7c wrote them, in its order
TRAIN_STATE_KEYS_15F7F7C = ["optimizer", "scheduler", "loss", "ema", "scaler", "state_json"]


def checkpointer(out, acc, mcfg, model, loss, opt, schedule, ema=None, run_meta=None) -> ckpt.Checkpointer:
    parts = {"model": model, "optimizer": opt, "scheduler": schedule, "loss": loss,
             "ema": EmaWeights(ema, model) if ema is not None else None, "scaler": None}
    return ckpt.Checkpointer(out, parts, accelerator=acc, keep_last=2,
                             bundle=ckpt.BundleInfo(mcfg, PRE, run_meta or {}))


def one_step(model, loss, opt, schedule, step):
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    loss(model(images), labels).backward()
    opt.step()
    opt.zero_grad()
    schedule.after_step(step)


def test_save_restore_keep_last_and_export(tmp_path):
    acc = Accelerator(cpu=True)
    mcfg, model, loss, opt, schedule = parts(0)
    saver = checkpointer(tmp_path, acc, mcfg, model, loss, opt, schedule, run_meta={"config": {"x": 1}})
    for step in range(1, 4):
        one_step(model, loss, opt, schedule, step)
        saver.save(LoopState(step=step, best_metric=0.5))
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_loss = loss.state_dict()["loss.W"].clone()
    lr = opt.param_groups[0]["lr"]

    _, model2, loss2, opt2, schedule2 = parts(1)  # other weights: everything must come from the checkpoint
    other = checkpointer(tmp_path, acc, mcfg, model2, loss2, opt2, schedule2)
    state = other.restore(ckpt.latest_checkpoint(tmp_path))
    assert state == LoopState(step=3, best_metric=0.5)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert torch.equal(loss2.state_dict()["loss.W"], want_loss)
    assert opt2.param_groups[0]["lr"] == lr
    # both continue identically
    torch.manual_seed(7)
    one_step(model, loss, opt, schedule, 4)
    torch.manual_seed(7)
    one_step(model2, loss2, opt2, schedule2, 4)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key

    saver.export_best(model, 4, {"auc": 0.9})
    meta = read_bundle_meta(tmp_path / "bundle")
    assert meta["step"] == 4 and meta["val_metrics"] == {"auc": 0.9} and meta["config"] == {"x": 1}


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    acc = Accelerator(cpu=True)
    mcfg, model, loss, opt, schedule = parts(0)
    saver = checkpointer(tmp_path, acc, mcfg, model, loss, opt, schedule)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.UserError, match="non-finite values in head.weight"):
        saver.save(LoopState(step=1))
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_loop_state_reads_and_writes_the_json_of_15f7f7c():
    state = LoopState.from_json(STATE_JSON_15F7F7C)
    assert (state.step, state.best_step, state.bad_steps) == (3, 2, 0) and state.untrained["n_impostor"] == 960
    assert state.to_json() == STATE_JSON_15F7F7C  # byte for byte: same keys, same order, same numbers
    # a new run's state: 15f7f7c's Trainer started from this dict
    fresh = {"step": 0, "best_metric": None, "best_step": None, "untrained": None, "bad_steps": 0}
    assert LoopState().to_json() == json.dumps(fresh)
    # a key of another version is ignored, a missing one keeps its default
    assert LoopState.from_json('{"step": 5, "future": 1}') == LoopState(step=5)


def write_15f7f7c_checkpoint(directory, mcfg, model, loss, opt, schedule, rank: int = 0) -> None:
    """A checkpoint folder as 15f7f7c's Checkpointer.save wrote it (its code, frozen here: bundle, one
    train_state.pt dict, one RNG file per rank, the COMPLETE marker; a run without EMA and grad scaler)."""
    directory.mkdir(parents=True)
    write_bundle(directory, model, mcfg, PRE, {"step": 3})
    torch.save({"optimizer": opt.state_dict(), "scheduler": schedule.state_dict(), "loss": loss.state_dict(),
                "ema": None, "scaler": None, "state_json": STATE_JSON_15F7F7C}, directory / "train_state.pt")
    torch.save({"cpu": torch.get_rng_state()}, directory / f"rng_{rank}.pt")
    (directory / ckpt.MARKER).write_text("ok\n")


def test_a_checkpoint_of_15f7f7c_restores_and_is_written_back_the_same(tmp_path):
    acc = Accelerator(cpu=True)
    mcfg, model, loss, opt, schedule = parts(0)
    for step in (1, 2, 3):
        one_step(model, loss, opt, schedule, step)
    old = tmp_path / "old" / ckpt.CHECKPOINTS / "step_00000003"
    write_15f7f7c_checkpoint(old, mcfg, model, loss, opt, schedule)
    rng_after = torch.get_rng_state()
    torch.manual_seed(123)

    _, model2, loss2, opt2, schedule2 = parts(1)
    ema = ModelEmaV3(model2, decay=0.9)  # EMA on now: a checkpoint without one starts it at the restored weights
    restored = checkpointer(tmp_path / "new", acc, mcfg, model2, loss2, opt2, schedule2, ema=ema)
    state = restored.restore(old)
    assert state == LoopState.from_json(STATE_JSON_15F7F7C)
    assert torch.equal(torch.get_rng_state(), rng_after)
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value) and torch.equal(ema.module.state_dict()[key], value), key
    assert torch.equal(loss2.state_dict()["loss.W"], loss.state_dict()["loss.W"])
    assert schedule2.state_dict() == schedule.state_dict()

    restored.parts["ema"] = None  # as the 15f7f7c run: no EMA
    written = restored.save(state)
    new, old_state = (torch.load(d / "train_state.pt", weights_only=True) for d in (written, old))
    assert list(new) == TRAIN_STATE_KEYS_15F7F7C == list(old_state)
    assert new["state_json"] == STATE_JSON_15F7F7C
    assert new["ema"] is None and new["scaler"] is None and new["scheduler"] == old_state["scheduler"]
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in old.iterdir())


def test_a_checkpoint_lacking_a_part_does_not_fit(tmp_path):
    acc = Accelerator(cpu=True)
    mcfg, model, loss, opt, schedule = parts(0)
    old = tmp_path / "old"
    write_15f7f7c_checkpoint(old, mcfg, model, loss, opt, schedule)
    saved = torch.load(old / "train_state.pt", weights_only=True)
    del saved["optimizer"]
    torch.save(saved, old / "train_state.pt")
    with pytest.raises(ckpt.UserError, match=r"does not fit this run \('optimizer'\)"):
        checkpointer(tmp_path / "new", acc, mcfg, model, loss, opt, schedule).restore(old)
