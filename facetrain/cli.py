"""Command-line helpers shared by the entry points (eval, verify, identify, align, export, pack, serve).

`run_cli` runs an entry point's `main`: a `UserError` becomes `facetrain: error: <one line>` and exit code 2
(`--debug` or FACETRAIN_DEBUG=1: the full traceback instead); it also reads the launcher's RANK / WORLD_SIZE
to say which process failed. `ArgumentParser` turns argparse's mistakes into one-line `UserError`s;
`require_files` checks the inputs before any model is built (what --model can name:
`model.files.resolve_model_path`).

Nothing here imports torch at import time (the model and data helpers are imported where they are used), so
the onnxruntime service can parse its command line with it too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.errors import PEER_LOST, UserError, one_line
from facetrain.runtime.atomic_dir import REFUSED_ERRNOS


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one-line UserErrors (run_cli prints them) instead of usage dumps."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def add_image_check_options(parser: argparse.ArgumentParser, skip_means: str) -> None:
    """--bad-images and --max-image-pixels: the training pre-flight's check of every file a command reads."""
    parser.add_argument("--bad-images", default="error", choices=("error", "skip"),
                        help="files that cannot be decoded (zero-byte, truncated, not an image, over "
                        f"--max-image-pixels): error = name every one and stop (default), skip = {skip_means}")
    add_pixel_limit_option(parser)


def add_pixel_limit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="larger images are refused as decompression bombs (default: PIL's limit)")


RECOGNISED = "; a folder written by facetrain.align with the same recipe is recognised without this flag"


def print_result(result: dict, as_json: bool, describe: Callable[[dict], str]) -> None:
    """A command's answer on stdout: one JSON object (--json), or `describe`'s text for a person."""
    import json

    print(json.dumps(result) if as_json else describe(result), flush=True)


def add_embedding_options(parser: argparse.ArgumentParser, inputs: str, recognised: str = "") -> None:
    """--aligned and --backend: how `inputs` ("the images", "the two images", ...) reach the model."""
    parser.add_argument("--aligned", action="store_true", help=f"{inputs} are already aligned face crops (by "
                        "default a bundle with an alignment recipe aligns raw photos with it" + recognised + ")")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                        help="torch: the bundle in PyTorch; onnxruntime: a model.onnx written by facetrain.export "
                        "(--model FILE.onnx), same embeddings without PyTorch model code")




def require_files(paths: list[str], what: str) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{what}: file not found: {p}")


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FACETRAIN_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; user errors become `facetrain: error: <message>` and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
        if "torch.distributed" in sys.modules:  # a multi-process run: every rank leaves together
            from facetrain.runtime.distributed import leave_process_group

            if leave_process_group():
                # and skips the interpreter's teardown, where gloo's remaining threads can still abort a rank
                # that finished ("terminate called without an active exception": seen on 2-process Slurm runs
                # after the group was destroyed); everything the command wrote is closed by now
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
    except UserError as err:
        if debug:
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"facetrain: error: {prefix}{one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as err:  # torch.distributed's DistBackendError is a RuntimeError
        if debug or os.environ.get("WORLD_SIZE", "1") == "1" or not any(s in str(err) for s in PEER_LOST):
            raise
        print(f"facetrain: error: [rank {os.environ.get('RANK', '?')}] lost contact with another process, which "
              "failed or was stopped (read that process's own error)", file=sys.stderr, flush=True)
        sys.exit(1)
    except OSError as err:  # a disk that is full or read-only where no command expected it: still one line
        if debug or err.errno not in REFUSED_ERRNOS:
            raise
        print(f"facetrain: error: {err.filename or 'a file'}: {err.strerror}; free disk space or check the "
              "permissions, then run again (--debug shows where)", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("facetrain: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
