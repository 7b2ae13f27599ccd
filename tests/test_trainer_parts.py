"""The training loop's parts, called alone in-process on a tiny model: seconds, no subprocess."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import tiny_train_config

from facetrain.config.load import load_config
from facetrain.evaluation.metrics import count_pairs
from facetrain.model.files import read_bundle_meta
from facetrain.training.trainer import Trainer


@pytest.fixture
def trainer(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps a process-wide singleton
    cfg = load_config(str(tiny_train_config(tmp_path)), ["--train.output_dir", str(tmp_path / "run")])
    made = Trainer(cfg)
    made.out.mkdir(parents=True)
    made.setup_data()
    made.setup()
    made.sampler.set_epoch(0)
    yield made
    made.accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_step_updates_the_weights_and_counts_the_step(trainer):
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    loss = trainer.train_step(iter(trainer.loader))
    assert trainer.state.step == 1 and torch.isfinite(loss) and loss.item() > 0
    changed = [k for k, v in trainer.net.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "head.weight" in changed and any(k.startswith("backbone.") for k in changed)
    assert trainer.optimizer.param_groups[0]["lr"] < trainer.cfg.optim.lr  # the schedule advanced


def test_a_nonfinite_step_is_skipped(trainer):
    trainer.cfg.debug.inject_nan_at = 0
    before = {k: v.clone() for k, v in trainer.net.named_parameters()}
    trainer.train_step(iter(trainer.loader))
    trainer.guard.check()
    assert trainer.guard.bad_steps == 1 and trainer.state.step == 1
    for key, value in trainer.net.named_parameters():  # (BatchNorm statistics move in any forward pass)
        assert torch.equal(value, before[key]), key


def test_validate_scores_every_pair_of_the_validation_identities(trainer):
    metrics = trainer.validate()
    genuine, impostor = count_pairs(trainer.val_labels)
    assert (metrics["n_genuine"], metrics["n_impostor"]) == (genuine, impostor)
    assert 0.0 <= metrics["auc"] <= 1.0 and not trainer.model.training  # left in eval mode for the export


@pytest.mark.parametrize("metric, first, worse, better", [("auc", 0.6, 0.5, 0.7), ("eer", 0.4, 0.5, 0.3)])
def test_after_validation_exports_only_what_is_better(trainer, metric, first, worse, better):
    trainer.t.val_metric = metric
    trainer.schedule.decreasing = metric == "eer"
    other = {"auc": 0.5, "eer": 0.5}
    for step, value, exported in ((1, first, True), (2, worse, False), (3, better, True)):
        trainer.state.step = step
        assert trainer.after_validation({**other, metric: value}) is exported
        assert read_bundle_meta(trainer.out / "bundle")["step"] == (step if exported else 1)
    assert trainer.state.best_metric == better and trainer.state.best_step == 3


def test_the_checkpoint_holds_the_parts_15f7f7c_saved_in_its_order(trainer):
    # train_state.pt's entries (model.safetensors holds "model"): other names would not resume older checkpoints
    assert list(trainer.stateful_parts()) == ["model", "optimizer", "scheduler", "loss", "ema", "scaler"]


def test_training_messages_to_a_file_are_never_wrapped(capsys):
    """A log file or pipe (Slurm's, a test's) gets each message on one line however long its path: rich would
    otherwise wrap it at 120 columns, splitting e.g. "resumed from <long path> at step 5" across lines."""
    from facetrain.training.progress import TrainProgress

    path = "/tmp/" + "deep/" * 40 + "checkpoints/step_00000005"
    TrainProgress(enabled=False).print(f"resumed from {path} at step 5")
    assert f"resumed from {path} at step 5\n" in capsys.readouterr().out
