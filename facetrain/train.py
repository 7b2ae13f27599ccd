"""Train a face-embedding model.

    accelerate launch -m facetrain.train                                   # built-in synthetic data, ~2 min CPU
    accelerate launch -m facetrain.train --config configs/article.yaml --data.root /data/faces
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m facetrain.train --config X.yaml
    accelerate launch -m facetrain.train --config X.yaml --train.resume auto   # continue an interrupted run

Options: --config FILE (YAML), then any --section.key value override (every key is listed below, with its type,
default, valid values and meaning, from facetrain/config/schema.py), --debug (show tracebacks).
"""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads: how idle OpenMP threads wait (facetrain/runtime/threads.py; the environment's setting wins).
from facetrain.runtime import threads

os.environ.update(threads.wait_policy())

from facetrain.cli import run_cli  # noqa: E402
from facetrain.config.help import describe_keys  # noqa: E402
from facetrain.config.load import load_config  # noqa: E402
from facetrain.errors import UserError  # noqa: E402


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("Keys (--section.key value on the command line, or nested by section in the YAML file):\n")
        print(describe_keys())
        return 0
    config_file = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file")
        config_file = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(config_file, argv)
    if cfg.distill.teacher_input:  # the teacher's input spec has its parser beside the teacher (torch-free)
        from facetrain.deploy.input_spec import parse_input_spec

        parse_input_spec(cfg.distill.teacher_input, "distill.teacher_input")

    if cfg.model.init_from:  # the model to fine-tune fits this config: checked before any data is read
        from facetrain.model.files import check_init_from
        check_init_from(cfg.model)
    if cfg.distill.teacher and Path(cfg.distill.teacher).is_dir():  # a bundle teacher is a bundle: checked too
        from facetrain.model.files import check_bundle
        check_bundle(cfg.distill.teacher, "distill.teacher")
    from facetrain.training.trainer import train  # heavy imports only after the config is known to be valid

    summary = train(cfg)
    return 0 if summary else 1


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
