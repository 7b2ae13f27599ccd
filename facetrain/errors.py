"""User-facing errors.

Every mistake a user can make (a wrong key, a missing folder, a bad image) raises `UserError` with a message
that names the file, key or value and says what to do. Entry points wrap `main()` in `cli.run_cli`, which
prints that one line and exits non-zero.
"""

from __future__ import annotations

# What a rank's collective raises when another rank died (gloo). That rank's own error is the one to read.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")

#: How to install an optional extra (pyproject.toml's [project.optional-dependencies]), for the messages of the
#: code that needs it: "serve" (onnx, onnxruntime, FastAPI, uvicorn), "align" (facenet-pytorch, scikit-image),
#: "track" (MLflow, for train.log_with).
INSTALL = {extra: f'pip install -e ".[{extra}]"' for extra in ("serve", "align", "track")}


class UserError(Exception):
    """An error caused by the user's input; its message is shown without a traceback."""


def one_line(err: UserError) -> str:
    """The user's message. A UserError raised in a DataLoader worker reaches the main process re-created by
    torch with the worker's traceback as its message ("Caught UserError in DataLoader worker process 0.
    Original Traceback ..."); its last line, `facetrain.errors.UserError: <message>`, holds the original."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
