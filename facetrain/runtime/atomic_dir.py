"""Swapping a fully written directory into place, and recovering from a kill in the middle of a swap.

Checkpoints (`checkpoints/step_X/`) and the best-model bundle (`bundle/`) are written into `<name>.tmp` first
and then swapped in: `<name>` is renamed to `<name>.old`, `<name>.tmp` to `<name>`, and `<name>.old` is
deleted. Each rename is atomic, so at every moment either `<name>` or `<name>.old` is complete; a kill between
the two renames leaves only `<name>.old`, which `recover_dir` (called wherever a bundle or checkpoint is
resolved) renames back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

OLD = ".old"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse to open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def old_of(final: Path) -> Path:
    return final.with_name(final.name + OLD)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap the complete directory `tmp` in for `final` (which may not exist)."""
    old = old_of(final)
    if old.exists() and final.exists():  # a leftover of an earlier swap: `final` is the newer complete copy
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    elif old.exists():  # only `.old` survived an interrupted swap: it is replaced by the new copy below
        shutil.rmtree(old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(final: Path) -> Path:
    """`final`, restored from `final.old` when a kill between the swap's renames left only that. Where the
    parent folder is read-only, the `.old` copy itself is returned (it is complete)."""
    final = Path(final)
    old = old_of(final)
    if final.exists() or not old.is_dir():
        return final
    try:
        os.rename(old, final)
        fsync_dir(final.parent)
    except OSError:
        return old
    return final
