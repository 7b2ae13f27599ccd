"""The Checkpointer alone, in-process: save, restore, keep the last k, export the best bundle."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from facetrain.config.schema import LossConfig, ModelConfig, OptimConfig
from facetrain.data.dataset import Preprocess
from facetrain.model.files import read_bundle_meta
from facetrain.model.network import create_model
from facetrain.training import checkpoint as ckpt
from facetrain.training.losses import MetricLoss
from facetrain.training.optim import Schedule, create_optimizer


def parts(seed: int):
    torch.manual_seed(seed)
    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=8, channels_last=False)
    model = create_model(mcfg)
    loss = MetricLoss(LossConfig(name="arcface", margin=28.6), num_classes=5, embedding_dim=8)
    ocfg = OptimConfig(name="adamw", lr=1e-2, scheduler="cosine")
    opt = create_optimizer(model, loss, ocfg)
    return mcfg, model, loss, opt, Schedule(opt, ocfg, steps_per_epoch=10, max_steps=20, val_metric="auc")


def one_step(model, loss, opt, schedule, step):
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    loss(model(images), labels).backward()
    opt.step()
    opt.zero_grad()
    schedule.after_step(step)


def test_save_restore_keep_last_and_export(tmp_path):
    acc = Accelerator(cpu=True)
    mcfg, model, loss, opt, schedule = parts(0)
    pre = Preprocess(32, [0.5] * 3, [0.5] * 3)
    saver = ckpt.Checkpointer(tmp_path, acc, model, opt, schedule, loss, None, mcfg, pre, {"config": {"x": 1}},
                              keep_last=2)
    for step in range(1, 4):
        one_step(model, loss, opt, schedule, step)
        saver.save({"step": step, "best_metric": 0.5})
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_loss = loss.state_dict()["loss.W"].clone()
    lr = opt.param_groups[0]["lr"]

    _, model2, loss2, opt2, schedule2 = parts(1)  # other weights: everything must come from the checkpoint
    other = ckpt.Checkpointer(tmp_path, acc, model2, opt2, schedule2, loss2, None, mcfg, pre, {}, keep_last=2)
    state = other.restore(ckpt.latest_checkpoint(tmp_path))
    assert state == {"step": 3, "best_metric": 0.5}
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
    saver = ckpt.Checkpointer(tmp_path, acc, model, opt, schedule, loss, None, mcfg,
                              Preprocess(32, [0.5] * 3, [0.5] * 3), {}, keep_last=2)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.UserError, match="non-finite values in head.weight"):
        saver.save({"step": 1})
    assert ckpt.latest_checkpoint(tmp_path) is None
