"""Config: precedence (defaults < YAML < CLI), and every rejection happens before any heavy work."""

from __future__ import annotations

import pytest
from helpers import run_train

from facetrain.config import Config, config_from_dict, load_config, save_config, to_dict
from facetrain.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 64\n  m: 8\noptim:\n  lr: 1e-4\n")
    cfg = load_config(path, ["--train.m", "4", "--optim.weight_decay=0.01"])
    assert cfg.train.batch_size == 64          # YAML beats default (32)
    assert cfg.train.m == 4                    # CLI beats YAML (8)
    assert cfg.optim.lr == pytest.approx(1e-4)  # `1e-4` (a string to PyYAML) read as a float
    assert cfg.optim.weight_decay == pytest.approx(0.01)
    assert cfg.model.backbone == Config().model.backbone  # untouched default


def test_nested_and_list_overrides(tmp_path):
    cfg = load_config(None, ["--data.augment.hflip", "0", "--data.mean", "0.5,0.5,0.5", "--data.std", "[0.5,0.5,0.5]"])
    assert cfg.data.augment.hflip == 0.0
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.std == [0.5, 0.5, 0.5]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.batch_size", "48", "--train.m", "6"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(config_from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("yaml_text, overrides, needle", [
    ("train:\n  batchsize: 8\n", [], "unknown key 'train.batchsize'"),
    ("", ["--model.backbon", "x"], "unknown key 'model.backbon'"),
    ("trainer:\n  m: 4\n", [], "unknown key 'trainer'"),
    ("train:\n  batch_size: many\n", [], "train.batch_size: expected an integer"),
    ("", ["--train.m", "2.5"], "train.m: expected an integer"),
    ("", ["--optim.lr", "fast"], "optim.lr: expected a number"),
    ("", ["--optim.lr", "nan"], "optim.lr: must be a finite number"),
    ("", ["--model.channels_last", "maybe"], "model.channels_last: expected true or false"),
    ("train: 5\n", [], "'train' is a section"),
    ("", ["--train.batch_size", "30", "--train.m", "4"], "train.batch_size (30) must be a multiple of train.m (4)"),
    ("", ["--train.batch_size", "4", "--train.m", "4"], "must be >= 2 identities per batch"),
    ("", ["--train.m", "1", "--train.batch_size", "8"], "train.m: must be >= 2"),
    ("", ["--data.source", "s3"], "data.source: unknown value 's3'"),
    ("", ["--data.source", "folder"], "data.root: required"),
    ("", ["--train.mixed_precision", "fp8"], "train.mixed_precision: unknown value"),
    ("", ["--data.mean", "0.5,0.5"], "data.mean: give 3 values"),
    ("", ["--model.pretrained_file", "/nonexistent/w.safetensors"], "model.pretrained_file: file not found"),
    ("", ["--train.resume", "/nonexistent/ckpt"], "train.resume"),
    ("", ["--train.max_steps", "0", "--train.epochs", "0"], "train.max_steps or train.epochs"),
    ("", ["--train.val_metric", "f1"], "train.val_metric"),
])
def test_rejections_name_the_key(tmp_path, yaml_text, overrides, needle):
    path = write(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(UserError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"exp.yaml line \d+: not valid YAML"):
        load_config(write(tmp_path, "train:\n  m: [4\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_errors_are_one_line_and_fast(tmp_path):
    """Through the real entry point: exit code 2, one line on stderr, no traceback, nothing trained."""
    cases = [
        (["--data.source", "folder", "--data.root", str(tmp_path / "missing")], "data.root: folder not found"),
        (["--model.backbone", "resnet_does_not_exist"], "model.backbone: unknown timm model"),
        (["--loss.name", "hinge"], "loss.name: unknown loss 'hinge'"),
        (["--train.batch_size", "10", "--train.m", "4"], "train.batch_size (10) must be a multiple"),
        # 10 synthetic people, 2 held out: 8 left, but batch 40 / m 4 needs 10 distinct identities
        (["--data.synthetic_identities", "10", "--data.val_identities", "2", "--train.batch_size", "40"],
         "a global batch needs 10 distinct identities"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--data.source", "folder", "--data.root", str(empty)], "no identity folders with images"))
    for args, needle in cases:
        proc = run_train(args + ["--train.output_dir", str(tmp_path / "run")], check=False, timeout=300)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
        assert lines[-1].startswith("facetrain: error: ") and needle in lines[-1], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "run" / "checkpoints").exists()
