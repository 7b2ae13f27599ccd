"""Run under `accelerate launch` with N CPU processes (tests/helpers.py, train_one_and_many_runs): trains
several configs one after the other in the same ranks, so that N processes start (and import torch) once.

    accelerate launch ... tests/scripts/train_configs.py CONFIG OUTPUT_DIR BATCH_SIZE [CONFIG OUTPUT_DIR ...]

Each run is `facetrain.train`'s main with `--config CONFIG --train.output_dir OUTPUT_DIR --train.batch_size
BATCH_SIZE`; a config with distill.teacher gets the tiny teacher of that file (tests/helpers.py,
use_tiny_teachers), as the 1-process runs of the tests do. The process group stays up between runs:
accelerate's end_training would destroy it (and a second rendezvous on the launcher's port hangs), so here it
leaves the group to run_cli, which leaves it once at the end as after any command; each run still gets a new
Accelerator."""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState, PartialState

from facetrain import train
from facetrain.cli import run_cli


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny teachers of helpers.py
    from helpers import use_tiny_teachers

    use_tiny_teachers()
    PartialState.destroy_process_group = lambda self, group=None: None  # kept for the next run (docstring)
    if len(argv) % 3:
        raise SystemExit("usage: train_configs.py CONFIG OUTPUT_DIR BATCH_SIZE [...]")
    for i in range(0, len(argv), 3):
        config, output_dir, batch = argv[i:i + 3]
        AcceleratorState._reset_state()  # a new Accelerator (precision, project dir), the same process group
        GradientState._reset_state()
        code = train.main(["--config", config, "--train.output_dir", output_dir, "--train.batch_size", batch])
        if code:
            return code
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
