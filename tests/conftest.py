"""pytest setup: make the repo importable and keep heavy libraries offline and quiet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facetrain.runtime import threads  # noqa: E402

# as facetrain's commands do, before anything imports torch: in-process tests share the CPU with subprocesses
os.environ.update(threads.wait_policy())
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
