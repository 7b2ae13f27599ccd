"""Learning-rate schedules of the article's presets, measured on real runs long enough for their curves to show."""

from __future__ import annotations

import json

import pytest
from helpers import run_train, tb_scalars, tiny_train_config

from facetrain.config.names import PRESETS
from facetrain.config.schema import OptimConfig
from facetrain.training.optim import create_scheduler, schedule_notes

STEPS = 200
LR = 3e-3
FLOOR = 0.01  # every preset stays at >= 1% of optim.lr until the last tenth of the run (README)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_keeps_learning_until_the_last_tenth_and_beats_the_untrained_model(tmp_path, preset):
    cfg = tiny_train_config(tmp_path, {"optim": {"preset": preset, "lr": LR, "warmup_steps": 10},
                                       "train": {"max_steps": STEPS, "batch_size": 8, "log_every": 1,
                                                 "val_every": STEPS, "ckpt_every": STEPS, "tensorboard": True}})
    run = tmp_path / "run"
    run_train(["--config", cfg, "--train.output_dir", run], timeout=600)
    lr = tb_scalars(run, "train/lr")
    assert sorted(lr) == list(range(1, STEPS + 1))
    early = {step: value for step, value in lr.items() if step <= 0.9 * STEPS}
    low = min(early, key=early.get)
    assert early[low] >= FLOOR * LR * (1 - 1e-6), f"{preset}: lr {early[low]:.3g} at step {low} < {FLOOR} x {LR}"
    done = json.loads((run / "done.json").read_text())
    assert done["final"]["auc"] > done["untrained"]["auc"] + 0.02, (preset, done["untrained"], done["final"])


def lr_curve(cfg: OptimConfig, total: int) -> list[float]:
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = create_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("scheduler", ["cosine", "cosine_warmup"])
def test_t_max_means_the_same_in_both_cosines_and_never_climbs_back(scheduler):
    # the article: T_max 50 over 100 epochs; torch's CosineAnnealingLR would climb back to lr by epoch 99
    cfg = OptimConfig(scheduler=scheduler, lr=1e-4, eta_min=1e-6, t_max=50, warmup_steps=0)
    curve = lr_curve(cfg, 100)
    assert curve[0] == pytest.approx(1e-4)
    assert curve[50] == pytest.approx(1e-6) and max(curve[50:]) == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(curve, curve[1:], strict=False))  # never rises
    notes = schedule_notes(cfg, 100)
    assert len(notes) == 1 and "optim.t_max 50" in notes[0] and "stays there for the last 50" in notes[0]
    assert schedule_notes(OptimConfig(scheduler=scheduler, t_max=0), 100) == []


def test_step_and_exponential_follow_the_run_length_by_default():
    step = lr_curve(OptimConfig(scheduler="step", lr=1.0), 300)
    assert step[0] == 1.0 and step[99] == 1.0 and step[100] == pytest.approx(0.1) and step[299] == pytest.approx(0.01)
    expo = lr_curve(OptimConfig(scheduler="exponential", lr=1.0, eta_min=1e-6), 300)
    assert expo[299] == pytest.approx(0.01 ** (299 / 300), rel=1e-6)
    assert all(a > b for a, b in zip(expo, expo[1:], strict=False))
    # an explicit gamma is used as given, never below eta_min
    fast = lr_curve(OptimConfig(scheduler="exponential", lr=1.0, gamma=0.5, eta_min=1e-3), 30)
    assert fast[1] == pytest.approx(0.5) and min(fast) == pytest.approx(1e-3)


def _schedule(**optim):
    import torch

    from facetrain.training.optim import Schedule

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    val_metric = optim.pop("val_metric", "auc")
    return Schedule(opt, OptimConfig(lr=1.0, **optim), steps_per_epoch=10, max_steps=100, val_metric=val_metric), opt


def test_schedule_steps_per_epoch_only_at_epoch_ends():
    schedule, opt = _schedule(scheduler="step", scheduler_interval="epoch", step_size=1, gamma=0.5)
    assert schedule.intervals == 10
    for step in range(1, 10):
        schedule.after_step(step)
    assert opt.param_groups[0]["lr"] == 1.0
    schedule.after_step(10)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("metric, better, worse", [("auc", 0.9, 0.8), ("eer", 0.1, 0.2)])
def test_plateau_follows_the_direction_of_the_validation_metric(metric, better, worse):
    schedule, opt = _schedule(scheduler="plateau", plateau_patience=0, plateau_factor=0.5, val_metric=metric)
    schedule.after_step(1)  # steps never move a plateau schedule
    schedule.after_validation(worse)
    schedule.after_validation(better)  # an improvement: kept
    assert opt.param_groups[0]["lr"] == 1.0
    schedule.after_validation(worse)  # worse than the best: cut
    assert opt.param_groups[0]["lr"] == 0.5
