"""`python -m facetrain.train --help`: every key, generated from the dataclasses of `config/schema.py` (their
field docstrings are the documentation), with its type, default and valid range or names."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from typing import Any

from facetrain.config.checks import CHOICES, VAL_METRICS
from facetrain.config.names import PRESETS
from facetrain.config.ranges import RANGES
from facetrain.config.schema import Config

NAMED_VALUES: dict[str, tuple[str, ...]] = {
    **{key: names for key, (_, names) in CHOICES.items()},
    "optim.preset": ("''", *PRESETS),
    "train.val_metric": VAL_METRICS,
}
"""The keys whose value is a name, and the names `--help` lists for each (the tables the checks use)."""


def _field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal right after each field in the class's source."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _summary(doc: str) -> str:
    """The docstring's first line, continued to the end of its sentence when the sentence runs on."""
    first = doc.splitlines()[0] if doc else ""
    text = " ".join(doc.split())
    end = re.compile(r"[.!?](?=\s+[A-Z(`]|\s*$)").search(text, max(0, len(first) - 1))
    return text[: end.end()] if end else text


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else "null" if value is None else str(value)


def _valid(key: str) -> str:
    """The valid values of `key` as --help shows them: its range, or its names; '' when any value goes."""
    if key in RANGES:
        return RANGES[key].interval() + (f"; {RANGES[key].note}" if RANGES[key].note else "")
    if key in NAMED_VALUES:
        return "one of " + " | ".join(NAMED_VALUES[key])
    return ""


def _describe_section(cls: type, prefix: str, lines: list[str]) -> None:
    """The header and keys of one section, then its nested sections (data.augment after data's own keys)."""
    docs = _field_docs(cls)
    lines.extend(["", f"{prefix}: {_summary(inspect.cleandoc(cls.__doc__ or ''))}"])
    nested = []
    for f in dataclasses.fields(cls):
        key, default = f"{prefix}.{f.name}", _default(f)
        if dataclasses.is_dataclass(default):
            nested.append((type(default), key))
            continue
        valid = _valid(key)
        lines.append(f"  --{key}: {f.type} = {_shown(default)}" + (f"  ({valid})" if valid else ""))
        lines.append(f"      {_summary(docs.get(f.name, ''))}")
    for nested_cls, nested_key in nested:
        _describe_section(nested_cls, nested_key, lines)


def describe_keys() -> str:
    """Every key as `--section.key: TYPE = DEFAULT (valid values)` and the summary of its docstring, grouped by
    section in the order of the dataclasses: the `--help` of facetrain.train."""
    lines: list[str] = []
    for f in dataclasses.fields(Config):
        _describe_section(type(_default(f)), f.name, lines)
    return "\n".join(lines).lstrip("\n")
