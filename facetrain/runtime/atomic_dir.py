"""Swapping a fully written directory (or file) into place, and recovering from a kill in the middle of a swap.

Checkpoints (`checkpoints/step_X/`) and the best-model bundle (`bundle/`) are written into `<name>.tmp` first
and then swapped in: `<name>` is renamed to `<name>.old`, `<name>.tmp` to `<name>`, and `<name>.old` is
deleted. Each rename is atomic, so at every moment either `<name>` or `<name>.old` is complete; a kill between
the two renames leaves only `<name>.old`, which `recover_dir` (called wherever a bundle or checkpoint is
resolved) renames back.

Single files (an exported model, a report, the threshold written into a bundle) go through `write_atomic`:
written as `<name>.tmp`, renamed over `<name>`; a failure removes the `.tmp` and a disk's refusal (full,
read-only, no permission) is one line naming the file.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from facetrain.errors import UserError

OLD = ".old"
TMP = ".tmp"

#: errno values of a file operation refused by the disk or its permissions (full, quota, read-only, denied)
REFUSED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
#: ... and of a write to a place that cannot hold the file (a folder, a vanished parent, a failing disk):
#: `write_atomic` reports all of them in one line, not as a traceback
DISK_ERRNOS = REFUSED_ERRNOS | {errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EIO}


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


def tmp_of(final: Path) -> Path:
    """Where `write_atomic` writes `final` first: `<name>.tmp` beside it."""
    final = Path(final)
    return final.with_name(final.name + TMP)


def disk_error(err: OSError, path: Path, todo: str) -> UserError:
    """A write refused by the disk as one line: the file, the system's reason, and `todo` (what to do)."""
    return UserError(f"{path}: cannot write ({err.strerror or type(err).__name__}); {todo}")


def write_atomic(final: str | Path, write: Callable[[Path], object], todo: str = "free disk space or choose "
                 "a writable location") -> Path:
    """`write(tmp)` writes the whole file at `<final>.tmp`, then it is renamed over `final`: a reader sees the
    old file or the new one, never half of one. On any failure the `.tmp` is removed; a disk's refusal
    (`DISK_ERRNOS`) becomes a one-line UserError ending in `todo`. A `final` that is a symbolic link gets its
    target rewritten (the link stays): replacing the link by a file would leave the real file unchanged."""
    final = Path(final)
    if final.is_symlink():
        final = final.resolve()
    tmp = tmp_of(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException as err:
        remove_quietly(tmp)
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            raise disk_error(err, final, todo) from None
        raise
    return final


def remove_quietly(path: Path) -> None:
    """Remove a leftover file; where even that is refused (a read-only disk) there is nothing more to do."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass
