"""model.init_from: a run starts from a facetrain model's whole network (the distilled student that is then
fine-tuned on labelled people, issue 25), whatever stages it freezes; a model that does not fit is one line
before any data is read."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import load_weights, random_bundle, run_train, tiny_train_config

from facetrain.config.load import load_config
from facetrain.errors import UserError
from facetrain.model.files import check_init_from, without_local_paths
from facetrain.training.trainer import Trainer


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A random tiny bundle of TINY's backbone and size (test_efficientnet, 32-d, 32 px)."""
    return random_bundle(tmp_path_factory.mktemp("init") / "bundle", "test_efficientnet", 32, 32)


def _set_up(cfg_path, overrides: list[str]) -> Trainer:
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = Trainer(load_config(str(cfg_path), overrides))
    trainer.out.mkdir(parents=True)
    trainer.setup_data()
    trainer.setup_model()
    return trainer


@pytest.mark.parametrize("freeze_stages", [0, 2])
def test_the_run_starts_from_the_models_weights(tmp_path, start, freeze_stages):
    cfg = tiny_train_config(tmp_path)
    trainer = _set_up(cfg, ["--train.output_dir", str(tmp_path / "run"), "--model.init_from", str(start),
                            "--model.freeze_stages", str(freeze_stages)])
    try:
        ours, theirs = trainer.net.state_dict(), load_weights(start)
        compared = [k for k in theirs if not k.endswith("num_batches_tracked")]
        assert len(compared) > 50 and any(k.startswith("head.") for k in compared)
        for key in compared:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
        start_pre = __import__("json").loads((start / "facetrain.json").read_text())["preprocess"]
        assert (trainer.pre.mean, trainer.pre.std) == (start_pre["mean"], start_pre["std"])
    finally:
        trainer.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_run_without_it_starts_elsewhere(tmp_path, start):
    """The control: the same config without model.init_from does not hold the bundle's head."""
    trainer = _set_up(tiny_train_config(tmp_path), ["--train.output_dir", str(tmp_path / "run"),
                                                    "--train.seed", "5"])
    try:
        assert not torch.equal(trainer.net.state_dict()["head.weight"], load_weights(start)["head.weight"])
    finally:
        trainer.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("overrides, message", [
    (["--model.init_from", "/nonexistent/bundle"], "model.init_from: not found: /nonexistent/bundle"),
    (["--model.embedding_dim", "16"], "has model.embedding_dim 32, this config 16; set model.embedding_dim 32"),
    (["--model.backbone", "test_resnet"], "has model.backbone 'test_efficientnet', this config 'test_resnet'"),
])
def test_a_model_that_does_not_fit_is_one_line(tmp_path, start, overrides, message):
    args = ["--model.init_from", str(start), *overrides]
    with pytest.raises(UserError) as err:
        check_init_from(load_config(str(tiny_train_config(tmp_path)), args).model)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_directory_that_is_no_model_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_config(str(tiny_train_config(tmp_path)), ["--model.init_from", str(tmp_path / "empty")])
    with pytest.raises(UserError, match=r"^model.init_from: .*empty is not a facetrain bundle"):
        check_init_from(cfg.model)


def test_an_onnx_file_is_one_line_asking_for_its_bundle(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    cfg = load_config(str(tiny_train_config(tmp_path)), ["--model.init_from", str(tmp_path / "model.onnx")])
    with pytest.raises(UserError, match=r"^model.init_from: .*model.onnx is an ONNX file; give the facetrain bundle"):
        check_init_from(cfg.model)


@pytest.mark.slow
def test_fine_tuning_runs_and_its_card_names_the_start(tmp_path, start):
    """Through the command line: the error comes before training, and a run's bundle says what it started from
    (its last path component only, as every local path of a shipped bundle)."""
    cfg = tiny_train_config(tmp_path)
    bad = run_train(["--config", cfg, "--model.init_from", str(start), "--model.embedding_dim", "8"], check=False)
    assert bad.returncode != 0 and "model.init_from:" in bad.stderr + bad.stdout
    run = tmp_path / "run"
    run_train(["--config", cfg, "--model.init_from", str(start), "--train.max_steps", "2", "--train.output_dir", run])
    meta = __import__("json").loads((run / "bundle" / "facetrain.json").read_text())
    assert "fine-tuned" in meta["model_card"]["model"]["pretrained"]
    assert without_local_paths(meta)["config"]["model"]["init_from"] == "bundle"
