"""Config: precedence (defaults < YAML < CLI), and every rejection happens before any heavy work."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_module, run_train, subprocess_env, tiny_train_config

from facetrain.config.load import config_from_dict, load_config, save_config, to_dict
from facetrain.config.schema import Config
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


# ----------------------------------------------------------------------------------------------------------
# train.val_metric: the spellings users write become the key validation reports; anything else is refused


@pytest.mark.parametrize("written, canonical", [
    ("tar@far=1e-2", "tar@far=1e-02"), ("tar@far=0.01", "tar@far=1e-02"), ("TAR@FAR=1e-3", "tar@far=1e-03"),
    ("tar@far=1%", "tar@far=1e-02"), ("tar@far=0.0001", "tar@far=1e-04"), ("tar@far=1e-01", "tar@far=1e-01"),
    ("AUC", "auc"), ("eer", "eer"), ("best_accuracy", "best_accuracy"),
])
def test_val_metric_spellings_become_the_reported_key(tmp_path, written, canonical):
    cfg = load_config(None, ["--train.val_metric", written])
    assert cfg.train.val_metric == canonical
    save_config(cfg, tmp_path / "config.yaml")  # the run directory records the key that was used
    assert load_config(tmp_path / "config.yaml").train.val_metric == canonical


@pytest.mark.parametrize("written", ["tar@far=banana", "tar@far=5e-3", "tar@far=", "f1", "tar@far=2"])
def test_val_metric_unknown_names_list_the_valid_ones(written):
    with pytest.raises(UserError) as err:
        load_config(None, ["--train.val_metric", written])
    message = str(err.value)
    assert message.startswith("train.val_metric: ") and "\n" not in message
    for name in ("auc", "eer", "best_accuracy", "tar@far=1e-01", "tar@far=1e-02", "tar@far=1e-03", "tar@far=1e-04"):
        assert name in message


def test_val_metric_names_are_keys_that_validation_reports():
    """config.checks.VAL_METRICS (kept free of torch) against what validation computes:
    metrics.verification_metrics at its default FARs, on enough pairs to resolve every FAR (a name missing there
    would be -inf forever)."""
    import numpy as np
    import torch

    from facetrain.config.checks import VAL_METRICS
    from facetrain.evaluation.metrics import verification_metrics
    from facetrain.evaluation.scoring import all_pairs_roc

    labels = np.repeat(np.arange(50), 4)  # 200 images: 19,600 impostor pairs >= 1/1e-4
    emb = torch.nn.functional.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    metrics = verification_metrics(all_pairs_roc(emb, torch.as_tensor(labels)))
    for name in VAL_METRICS:
        assert isinstance(metrics[name], float), name


def test_val_metric_far_the_validation_set_cannot_resolve_stops_before_training(tmp_path):
    """The tiny run holds out 6 identities x 8 images: 960 impostor pairs, enough for FAR 1e-2 (100) but not
    for 1e-3 (1,000). Asking for tar@far=0.001 stops with one line naming both counts; nothing is trained."""
    cfg = tiny_train_config(tmp_path)
    proc = run_train(["--config", cfg, "--train.val_metric", "tar@far=0.001", "--train.output_dir",
                      tmp_path / "run"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("facetrain: error: train.val_metric: tar@far=1e-03 needs >= 1,000 impostor pairs"), last
    assert "6 validation identities (48 images) give 960" in last and "tar@far=1e-02" in last, last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "done.json").exists()


# ----------------------------------------------------------------------------------------------------------
# --help: every key, from the dataclasses


def _field_docs_from_source() -> dict[str, str]:
    """{ClassName.field: first docstring line}, read straight from config/schema.py (the test's own reading)."""
    import ast

    import facetrain.config.schema as config_module

    tree = ast.parse(Path(config_module.__file__).read_text())
    docs = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for stmt, after in zip(node.body, node.body[1:], strict=False):
                if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(
                        getattr(after, "value", None), ast.Constant):
                    docs[f"{node.name}.{stmt.target.id}"] = after.value.value.strip().splitlines()[0].strip()
    return docs


def _keys(cls, prefix):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", cls, f, default


def test_help_lists_every_key_with_type_default_and_docstring():
    proc = run_module("facetrain.train", ["--help"], timeout=120)
    out = proc.stdout
    docs = _field_docs_from_source()
    keys = list(_keys(Config, ""))
    assert len(keys) > 80
    for key, cls, f, default in keys:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"--{key}: ")), None)
        assert line is not None, f"--help does not list {key}"
        assert f": {f.type} = " in line, line
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert f" = {default}" in line, line
        assert docs[f"{cls.__name__}.{f.name}"] in out, f"{key}: docstring missing from --help"
    # grouped by section, each under its header, with the valid range and the choices
    assert out.index("\ndata: ") < out.index("--data.source") < out.index("\ndata.augment: ") < out.index(
        "--data.augment.hflip") < out.index("\nmodel: ") < out.index("\ntrain: ") < out.index("--train.seed")
    assert "--data.augment.hflip: float = 0.5  (in [0, 1]; a probability)" in out
    assert "--data.source: str = synthetic  (one of synthetic | folder | hf" in out
    assert "tar@far=1e-02" in next(ln for ln in out.splitlines() if "--train.val_metric:" in ln)


def test_help_does_not_import_torch():
    code = ("import io, sys, contextlib\nfrom facetrain.train import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    assert main(['--config', 'x.yaml', '--help']) == 0\n"
            "assert '--optim.lr' in buf.getvalue()\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------------------
# Names: one torch-free table each (facetrain/config/names.py), checked when the config loads, listed by --help


_UNKNOWN_NAMES = [  # (what is loaded, key, bad value, the table that lists the valid names)
    ("config", "loss.name", "hinge", "LOSS_NAMES"),
    ("config", "loss.miner", "hardest", "MINER_NAMES"),
    ("config", "optim.name", "lion", "OPTIMIZER_NAMES"),
    ("config", "optim.scheduler", "onecycle", "SCHEDULER_NAMES"),
    ("config", "optim.preset", "fast", "PRESETS"),
    ("recipe", "alignment.detector", "haar", "DETECTOR_NAMES"),
]
_LOAD_IN_A_FRESH_PROCESS = """
import json, sys
from facetrain.alignment.recipe import AlignmentRecipe
from facetrain.config import names
from facetrain.config.load import load_config
from facetrain.errors import UserError
out = []
for what, key, value, table in json.loads(sys.argv[1]):
    try:
        load_config(None, [f"--{key}", value]) if what == "config" else AlignmentRecipe.from_dict({"detector": value})
        out.append([key, None, []])
    except UserError as err:
        out.append([key, str(err), list(getattr(names, table))])
print(json.dumps({"results": out, "torch": "torch" in sys.modules}))
"""


def test_unknown_names_are_rejected_at_load_without_torch():
    """Each name key: one line naming the key, the bad value and every valid name, before torch is imported (a
    fresh process, so nothing else has loaded torch; AlignmentRecipe.from_dict is how a bundle's recipe loads)."""
    import json

    proc = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, json.dumps(_UNKNOWN_NAMES)],
                          capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["torch"] is False
    for (_, key, value, _), (_, message, valid) in zip(_UNKNOWN_NAMES, report["results"], strict=True):
        assert message is not None, f"{key} {value!r} was accepted"
        assert message.startswith(f"{key}: unknown ") and repr(value) in message and "\n" not in message, message
        assert valid and all(name in message for name in valid), message


def test_preset_is_applied_at_load_and_beats_name_and_scheduler():
    from facetrain.config.names import PRESETS

    for preset, (name, scheduler) in PRESETS.items():
        cfg = load_config(None, ["--optim.preset", preset, "--optim.name", "sgd", "--optim.scheduler", "step"])
        assert (cfg.optim.name, cfg.optim.scheduler) == (name, scheduler), preset


def test_help_lists_the_names_of_the_tables():
    from facetrain.config import names
    from facetrain.config.help import describe_keys

    text = describe_keys()
    for key, table in (("loss.name", names.LOSS_NAMES), ("loss.miner", names.MINER_NAMES),
                       ("optim.name", names.OPTIMIZER_NAMES), ("optim.scheduler", names.SCHEDULER_NAMES),
                       ("optim.preset", tuple(names.PRESETS))):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"--{key}: "))
        assert line.endswith("(one of " + " | ".join(("''",) * (key == "optim.preset") + tuple(table)) + ")"), line


def test_torch_registries_are_keyed_by_the_name_tables():
    """One definition of each name: the registries that build the pieces have exactly the tables' keys (checked
    when their modules import, `names.keyed_by`; this test names the pairs)."""
    from facetrain.alignment.detectors import DETECTORS
    from facetrain.config import names
    from facetrain.training.losses import LOSSES, MINERS
    from facetrain.training.optim import OPTIMIZERS, SCHEDULERS

    assert tuple(LOSSES) == names.LOSS_NAMES and tuple(MINERS) == names.MINER_NAMES
    assert tuple(OPTIMIZERS) == names.OPTIMIZER_NAMES and tuple(SCHEDULERS) == names.SCHEDULER_NAMES
    assert tuple(DETECTORS) == names.DETECTOR_NAMES
    assert set(names.PRESETS.values()) <= {(o, s) for o in OPTIMIZERS for s in SCHEDULERS}
    with pytest.raises(RuntimeError, match="differ from the name table"):
        names.keyed_by(("a", "b"), {"a": 1})
