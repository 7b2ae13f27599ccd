"""pytest setup: make the repo importable and keep heavy libraries offline and quiet."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facetrain.runtime import threads  # noqa: E402

# as facetrain's commands do, before anything imports torch: in-process tests share the CPU with subprocesses
os.environ.update(threads.wait_policy())
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# identify and serve cache galleries in $XDG_CACHE_HOME/facetrain by default: never in the user's own cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="facetrain-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
