"""train.log_with: accelerate's trackers by name, checked when the config loads; a real run logging to MLflow's
local file store (needs the `track` extra's mlflow: skipped without it) next to TensorBoard."""

from __future__ import annotations

import pytest
from helpers import run_train, tb_scalars, tiny_train_config

from facetrain.config.load import load_config
from facetrain.config.names import ALL_TRACKERS, TRACKERS
from facetrain.config.schema import TrainConfig
from facetrain.errors import UserError


def test_tracker_table_is_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) | {ALL_TRACKERS} == {t.value for t in LoggerType}


@pytest.mark.parametrize("value, expected", [
    ("mlflow", ["mlflow"]), ("mlflow,tensorboard", ["mlflow", "tensorboard"]), ("all", ["all"]), ("", []),
])
def test_log_with_accepts_a_name_a_list_all_or_nothing(value, expected):
    assert load_config(None, ["--train.log_with", value]).train.log_with == expected


def test_unknown_tracker_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"train.log_with: unknown tracker 'mlflw' \(choose one of: tensorboard, "):
        load_config(None, ["--train.log_with", "tensorboard,mlflw"])


def test_missing_package_and_all_and_the_tensorboard_switch(monkeypatch):
    from accelerate.utils import LoggerType

    from facetrain.training import trackers

    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [LoggerType.TENSORBOARD, LoggerType.AIM])
    with pytest.raises(UserError, match=r"train.log_with: tracker 'wandb' is not installed: pip install wandb"):
        trackers.tracker_names(TrainConfig(log_with=["tensorboard", "wandb"]))
    assert trackers.tracker_names(TrainConfig(log_with=["all"])) == ["tensorboard", "aim"]
    assert trackers.tracker_names(TrainConfig(log_with=["all"], tensorboard=False)) == ["aim"]
    assert trackers.tracker_names(TrainConfig(log_with=[])) == []


def test_training_logs_to_mlflow_file_store_and_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 deprecates the file store; 2.x ignores this
    out = tmp_path / "run"
    cfg = tiny_train_config(tmp_path, {"train": {"max_steps": 2, "val_every": 2, "log_every": 1,
                                                 "log_with": ["mlflow", "tensorboard"], "tensorboard": True}})
    run_train(["--config", cfg, "--train.output_dir", out])

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("facetrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2]
    assert set(tb_scalars(out, "train/loss")) == {1, 2}
    # validation's metric names with '@' and '=' (which MLflow refuses) arrive renamed
    assert client.get_metric_history(run.info.run_id, "val/tar_at_far_1e-01")
    assert run.data.params["train.max_steps"] == "2"
    # the final validation (step 2): errors.png, and its 48 embeddings (6 identities x 8) in the projector
    assert (out / "validation" / "errors.png").is_file()
    assert '"validation:00002"' in (out / "tb" / "projector_config.pbtxt").read_text()
    files = out / "tb" / "00002" / "validation"
    assert len((files / "tensors.tsv").read_text().splitlines()) == 48
    assert len((files / "metadata.tsv").read_text().splitlines()) == 1 + 48
    assert (files / "sprite.png").is_file()
