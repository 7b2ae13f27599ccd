"""Loading a config: defaults < YAML file < `--section.key value` overrides, with strict key and type checks;
then `checks.validate`. Saving: the resolved config as YAML (the run directory, checkpoints, bundles).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from facetrain.config.checks import validate
from facetrain.config.schema import Config
from facetrain.errors import UserError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise UserError(f"{key}: expected true or false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise UserError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise UserError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise UserError(f"{key}: must be a finite number, got {value!r}")
    return number


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `yes` as a boolean
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return str(value)
    raise UserError(f"{key}: expected a string, got {value!r}")


_SCALARS: dict[type, Callable[[Any, str], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
"""The scalar field types of the config and how a YAML or command-line value becomes one."""


def _to_optional(value: Any, tp: Any, key: str) -> Any:
    """`X | None`: null / none, else the first member type that takes the value."""
    args = typing.get_args(tp)
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except UserError as err:
            errors.append(str(err))
    raise UserError(errors[0] if errors else f"{key}: invalid value {value!r}")


def _to_list(value: Any, tp: Any, key: str) -> list:
    (item_tp,) = typing.get_args(tp)
    if isinstance(value, str):  # "0.5,0.5,0.5" from the command line
        value = [v for v in value.strip("[]").split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise UserError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
    return [_coerce(v, item_tp, key) for v in value]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise a one-line UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _to_optional(value, tp, key)
    if origin is list:
        return _to_list(value, tp, key)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _apply(obj: Any, updates: dict, prefix: str, source: str) -> None:
    """Set fields of dataclass `obj` from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = ", ".join(sorted(names))
            raise UserError(f"{source}: unknown key '{full}' (valid keys here: {close})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{full}' is a section; give it a mapping of keys, got {value!r}")
            _apply(current, value, f"{full}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {full}"))


def _parse_overrides(args: list[str]) -> dict:
    """`--a.b value` / `--a.b=value` pairs -> nested dict (values still strings, parsed by YAML rules)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"command line: expected --section.key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"command line: {arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = raw  # typed by the field's annotation in _coerce ("no" stays a string for a str field)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"command line: --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    """The nested dict of a YAML config file, or a one-line UserError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (give a YAML file, e.g. configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections (data, model, loss, optim, train)")
    return data


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < `--section.key value` overrides, then `validate`."""
    cfg = Config()
    if config_file:
        _apply(cfg, load_yaml(config_file), "", str(config_file))
    if overrides:
        _apply(cfg, _parse_overrides(overrides), "", "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict, source: str = "checkpoint") -> Config:
    """A config saved by `save_config` (keys and types checked, not re-validated: it was when it was made)."""
    cfg = Config()
    _apply(cfg, data, "", source)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A config (or one section) as nested plain dicts, as YAML and JSON write it."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
