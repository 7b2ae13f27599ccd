"""Every numeric config key has a valid range (config.ranges.RANGES), checked before any data is read, one line each;
plus the cross-field checks (eta_min vs lr, t_max vs warm-up, a loss.distance the loss ignores, ...)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from helpers import run_train, tiny_train_config

from facetrain.config.load import load_config
from facetrain.config.ranges import RANGES
from facetrain.config.schema import Config
from facetrain.errors import UserError


def _numeric_fields(cls, prefix=""):
    """(key, kind) for every int / float / list-of-float field, however nested; bools are not numbers here."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]  # unwrap `X | None`
        for arg in args:
            inner = typing.get_args(arg)[0] if typing.get_origin(arg) is list else arg
            if inner in (int, float):
                yield f"{prefix}{f.name}", inner, typing.get_origin(arg) is list
                break


NUMERIC = list(_numeric_fields(Config))


def test_every_numeric_field_has_a_range():
    """A new numeric key must get its range in config.ranges.RANGES: this fails until it has one."""
    assert len(NUMERIC) > 50
    missing = [key for key, _, _ in NUMERIC if key not in RANGES]
    assert not missing, f"numeric config keys without an entry in config.ranges.RANGES: {missing}"
    stale = sorted(set(RANGES) - {key for key, _, _ in NUMERIC})
    assert not stale, f"config.ranges.RANGES names keys that are not numeric fields: {stale}"


def test_defaults_are_inside_their_ranges():
    cfg = Config()
    for key, allowed in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            assert v in allowed, (key, v, allowed)


def _outside(allowed, kind):
    """A value just outside the range (the open bound itself, or one unit / 0.5 past a closed bound)."""
    step = 1 if kind is int else 0.5
    if math.isfinite(allowed.lo):
        return allowed.lo if allowed.open_lo else allowed.lo - step
    return allowed.hi if allowed.open_hi else allowed.hi + step


@pytest.mark.parametrize("key, kind, is_list", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_every_range_rejects_a_value_outside_it_in_one_line(key, kind, is_list):
    allowed = RANGES[key]
    bad = _outside(allowed, kind)
    value = kind(bad)
    raw = ",".join([str(value)] * {"optim.betas": 2}.get(key, 3)) if is_list else str(value)
    with pytest.raises(UserError) as err:
        load_config(None, [f"--{key}", raw])
    message = str(err.value)
    assert message.startswith(f"{key}: ") and allowed.interval() in message and str(value) in message, message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, needle", [
    (["--optim.weight_decay", "-0.01"], "optim.weight_decay: must be >= 0, got -0.01"),
    (["--data.augment.hflip", "1.5"], "data.augment.hflip: must be in [0, 1] (a probability), got 1.5"),
    (["--optim.lr", "1e-4", "--optim.eta_min", "1e-3"], "optim.eta_min (0.001) must be <= optim.lr (0.0001)"),
    (["--loss.margin", "-0.1"], "loss.margin: must be >= 0, got -0.1"),
    (["--loss.scale", "-30"], "loss.scale: must be > 0, got -30.0"),
    (["--loss.scale", "0"], "loss.scale: must be > 0, got 0.0"),
    (["--optim.gamma", "5"], "optim.gamma: must be in [0, 1] (0 = derived from the run length), got 5.0"),
    (["--optim.warmup_steps", "100", "--optim.t_max", "50"],
     "optim.t_max (50) must be longer than optim.warmup_steps (100)"),
    (["--loss.name", "arcface", "--loss.distance", "euclidean"], "loss.distance: loss 'arcface' ignores it"),
    (["--loss.name", "multi_similarity", "--loss.distance", "euclidean"],
     "loss.distance: loss 'multi_similarity' ignores it"),
    (["--loss.name", "bce_pair", "--loss.distance", "euclidean"], "loss.distance: loss 'bce_pair' ignores it"),
    (["--optim.step_size", "-1"], "optim.step_size: must be >= 0 (0 = a third of the run), got -1"),
    (["--data.augment.brightness", "-1"], "data.augment.brightness: must be >= 0 (0 = off), got -1.0"),
    (["--loss.margin", "2.5"], "loss.margin: must be in [0, 2] for triplet"),
    (["--loss.name", "arcface", "--loss.margin", "120"], "loss.margin: must be in [1, 90) degrees for arcface"),
    (["--loss.name", "subcenter_arcface", "--loss.margin", "0.5"],
     "loss.margin: must be in [1, 90) degrees for subcenter_arcface, got 0.5 (radians? 0.5 rad = 28.6 degrees"),
    (["--loss.name", "cosface", "--loss.margin", "1.5"], "loss.margin: must be in [0, 1) for cosface"),
    (["--loss.name", "multi_similarity", "--loss.margin", "0.2"], "loss.margin: loss 'multi_similarity' has no margin"),
    (["--loss.name", "subcenter_arcface", "--loss.sub_centers", "0"], "loss.sub_centers: must be >= 1"),
    (["--loss.name", "arcface", "--loss.sub_centers", "2"], "loss.sub_centers: loss 'arcface' ignores it"),
    (["--loss.name", "contrastive", "--loss.pos_margin", "1.5"], "loss.pos_margin: must be in [-1, 1]"),
    (["--loss.name", "contrastive", "--loss.distance", "euclidean", "--loss.neg_margin", "-0.5"],
     "loss.neg_margin: must be in [0, 2]"),
    (["--data.augment.crop_scale_min", "0.9", "--data.augment.crop_scale_max", "0.5"],
     "data.augment.crop_scale_min (0.9) must be <= data.augment.crop_scale_max (0.5)"),
    (["--data.mean", "124,117,104"], "data.mean: each value must be in [0, 1]"),
    (["--data.val_fraction", "0"], "data.val_fraction: must be in (0, 1) when data.val_identities is 0"),
])
def test_out_of_range_settings_from_the_issue_are_one_line_errors(overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides", [
    ["--optim.step_size", "0", "--optim.gamma", "0"],  # 0 = derived from the run length
    ["--optim.gamma", "1", "--data.augment.hflip", "1", "--data.augment.brightness", "0"],
    ["--optim.eta_min", "1e-3", "--optim.lr", "1e-3"],
    ["--optim.warmup_steps", "10", "--optim.t_max", "11"],
    ["--loss.distance", "euclidean"],  # triplet uses it
    ["--loss.name", "contrastive", "--loss.distance", "euclidean", "--loss.pos_margin", "0.3",
     "--loss.neg_margin", "1.2"],
    ["--loss.name", "multi_similarity", "--loss.miner", "triplet_hard", "--loss.distance", "euclidean"],  # miner
    ["--loss.name", "arcface", "--loss.margin", "28.6"],
    ["--loss.name", "arcface"],  # margin unset: the standard 28.6 degrees, whatever a triplet would use
    ["--loss.name", "cosface", "--loss.margin", "0"],
    ["--loss.name", "subcenter_arcface", "--loss.margin", "1", "--loss.sub_centers", "1"],
    ["--data.val_fraction", "0", "--data.val_identities", "5"],
    ["--model.freeze_stages", "-1", "--train.num_workers", "-1", "--debug.stop_at_step", "-1"],
])
def test_values_at_the_edges_of_their_ranges_are_accepted(overrides):
    load_config(None, overrides)


def test_ranges_are_checked_before_any_data_is_read(tmp_path):
    """Through the real entry point with a folder that does not exist: the range error comes first (data would
    say 'folder not found'), as one line with exit code 2 and no traceback."""
    proc = run_train(["--config", tiny_train_config(tmp_path), "--data.source", "folder",
                      "--data.root", tmp_path / "missing", "--data.augment.brightness", "-1",
                      "--train.output_dir", tmp_path / "run"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "facetrain: error: data.augment.brightness: must be >= 0 (0 = off), got -1.0", last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
