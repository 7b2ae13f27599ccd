"""Real full and read-only disks for tests: a small tmpfs, a read-only bind mount.

Both need the right to mount (root with CAP_SYS_ADMIN; many CI containers lack it): without it the context
managers skip the test with the reason. chmod is no substitute: tests run as root in CI, and root writes
through a 0o555 folder. Tests that must run everywhere monkeypatch the one write instead, and say so.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()[:120]}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def small_disk(path: Path, size_kib: int) -> Iterator[Path]:
    """`path` (created) is a tmpfs of `size_kib` KiB for the duration: writing more fails with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a folder, with its contents) is read-only for the duration: every write in it fails with EROFS,
    for root too."""
    _mount("--bind", str(path), str(path))
    try:
        proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {proc.stderr.strip()[:120]}")
        yield path
    finally:
        _umount(path)
