"""`data.exclude`: the files training leaves out, read when the config loads (torch-free, json and paths only).

Two forms of file:
  - an `audit.json` written by `python -m facetrain.audit` (its "format" key is `AUDIT_FORMAT`): its "exclude"
    list, paths relative to the audited folder (the likely mislabels and the smaller identity of each likely
    duplicate pair);
  - a plain text file: one image path per line, relative to `data.root` (or absolute); blank lines and lines
    starting with `#` are skipped.
Either way the result is a set of paths spelled as the folder scan spells them (`str(Path(root) / relative)`),
so `preflight.without_files` can match them against `FaceSet.paths`.
"""

from __future__ import annotations

import json
from pathlib import Path

from facetrain.errors import UserError

AUDIT_FORMAT = "facetrain-audit"
"""The "format" value of an audit.json (facetrain/data/audit.py writes it)."""
AUDIT_VERSION = 1
COMMENT = "#"
FORMS = "an audit.json from python -m facetrain.audit, or a text file of image paths relative to data.root"


def _audit_entries(data: dict, path: Path, key: str) -> list[str]:
    if data.get("format") != AUDIT_FORMAT or not isinstance(data.get("exclude"), list):
        raise UserError(f"{key}: {path} is JSON but not a facetrain audit (no \"format\": \"{AUDIT_FORMAT}\" with "
                        f"an \"exclude\" list); give {FORMS}")
    if not all(isinstance(p, str) for p in data["exclude"]):
        raise UserError(f"{key}: {path}: \"exclude\" must be a list of paths (strings); run facetrain.audit again")
    return data["exclude"]


def _text_entries(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(COMMENT)]


def read_exclusions(path: str | Path, root: str, key: str = "data.exclude") -> set[str]:
    """The paths `path` names (absolute, or joined onto `root`); a missing, unreadable or malformed file is one
    line naming `key`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}; give {FORMS}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: cannot read {path} ({type(err).__name__}); give {FORMS}") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{key}: {path} is not valid JSON ({err.msg}, line {err.lineno}); give {FORMS}") from None
        entries = _audit_entries(data, path, key)
    else:
        entries = _text_entries(text)
    return {str(Path(root) / entry) for entry in entries}
