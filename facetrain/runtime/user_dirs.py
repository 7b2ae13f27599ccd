"""The environment variables that locate the user's folders, read here (library code outside runtime/ never
reads the environment itself: tests/test_layering.py)."""

from __future__ import annotations

import os

CACHE_VARIABLES = ("XDG_CACHE_HOME", "HOME")
"""What `deploy.gallery_cache.default_cache_dir` needs to place the user's cache folder."""


def cache_environment() -> dict[str, str]:
    """This process's values of `CACHE_VARIABLES` (those that are set), for `default_cache_dir`."""
    return {name: os.environ[name] for name in CACHE_VARIABLES if name in os.environ}
