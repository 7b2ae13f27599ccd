"""User-facing errors and the CLI guard that turns them into one-line messages.

Every mistake a user can make (a wrong key, a missing folder, a bad image) raises `UserError` with a message
that names the file, key or value and says what to do. Entry points wrap `main()` in `run_cli`, which prints
that one line and exits non-zero; `--debug` (or FACETRAIN_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# What a rank's collective raises when another rank died (gloo). That rank's own error is the one to read.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


class UserError(Exception):
    """An error caused by the user's input; its message is shown without a traceback."""


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FACETRAIN_DEBUG", "") not in ("", "0")


def one_line(err: UserError) -> str:
    """The user's message. A UserError raised in a DataLoader worker reaches the main process re-created by
    torch with the worker's traceback as its message ("Caught UserError in DataLoader worker process 0.
    Original Traceback ..."); its last line, `facetrain.errors.UserError: <message>`, holds the original."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; user errors become `facetrain: error: <message>` and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
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
    except KeyboardInterrupt:
        print("facetrain: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
