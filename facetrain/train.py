"""Train a face-embedding model.

    accelerate launch -m facetrain.train                                   # built-in synthetic data, ~2 min CPU
    accelerate launch -m facetrain.train --config configs/article.yaml --data.root /data/faces
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m facetrain.train --config X.yaml
    accelerate launch -m facetrain.train --config X.yaml --train.resume auto   # continue an interrupted run

Options: --config FILE (YAML), then any --section.key value override (see facetrain/config.py), --debug.
"""

from __future__ import annotations

import os

# Before torch loads (the OpenMP runtime reads it once): idle OpenMP threads sleep instead of spinning. Spinning
# (the default) makes a process whose threads share cores with its DataLoader workers, other ranks or other jobs
# wait out scheduler time slices at every parallel region: training measured 18x slower on a loaded 2-core CPU
# (docs/performance.md). An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from facetrain.config import load_config  # noqa: E402
from facetrain.errors import UserError, run_cli  # noqa: E402


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config_file = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file")
        config_file = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(config_file, argv)

    from facetrain.trainer import train  # heavy imports only after the config is known to be valid

    summary = train(cfg)
    return 0 if summary else 1


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
