"""Whether and how a model's inputs are aligned: the checks the PyTorch path (`evaluation.embedding`) and the
onnxruntime path (`deploy.onnx_embedder`) share, torch-free.

A bundle (or an export of it) that records an alignment recipe aligns raw photos with it (`check_alignment`);
a folder facetrain.align cut with the same recipe is recognised by its marker file and embedded as it is
(`is_aligned_folder`); a photo without a usable face is `AlignmentFailed`.
"""

from __future__ import annotations

from pathlib import Path

from facetrain.alignment.detectors import DetectorUnavailable, require_detector
from facetrain.alignment.recipe import MARKER_FILE, AlignmentRecipe, recipe_of_folder
from facetrain.errors import UserError


class AlignmentFailed(UserError):
    """A raw photo without a usable face (`alignment.recipe.align_image` said why)."""

    def __init__(self, name: str, status: str, reason: str):
        super().__init__(f"{name}: {status.replace('_', ' ')} ({reason}); this model aligns raw photos as in "
                         "training: give a photo with one clearly visible face, or pass --aligned if the images "
                         "are already aligned crops")
        self.status, self.reason = status, reason


def is_aligned_folder(folder: str | Path, alignment: dict | None, option: str, owner: str) -> bool:
    """True when `folder` holds crops facetrain.align cut with the recipe `alignment` (its marker file), which
    are then embedded as they are; False without a recipe or a marker. Crops cut with another recipe are
    refused with one line naming every difference (`owner`: "model" or "bundle", for the message)."""
    if alignment is None:
        return False
    recipe = recipe_of_folder(folder)
    if recipe is None:
        return False
    if recipe != alignment:
        diff = ", ".join(f"{k} {v!r} ({owner} {alignment.get(k)!r})" for k, v in recipe.items()
                         if alignment.get(k) != v)
        raise UserError(f"{option}: {folder} holds crops aligned with another recipe than the model's ({diff}; "
                        f"{Path(folder) / MARKER_FILE}): align the raw photos with python -m facetrain.align "
                        f"and the {owner}'s recipe, or pass --aligned to embed these crops as they are")
    return True


def check_alignment(meta: dict, path: Path, aligned: bool) -> dict | None:
    """The recipe raw photos are aligned with (of an exported file's or a bundle's metadata `meta`), or None:
    no recipe recorded, or aligned=True. A recipe whose detector is not installed is a one-line error saying
    what to install."""
    recipe = meta.get("alignment")
    if not recipe or aligned:
        return None
    recipe = AlignmentRecipe.from_dict(recipe)
    try:
        require_detector(recipe.detector)
    except DetectorUnavailable as err:
        raise UserError(f"{path}: this model was trained on crops aligned by facetrain.align ({recipe.describe()}) "
                        f"and aligns raw photos the same way, but {err}; or pass --aligned if the images are "
                        "already aligned crops") from None
    return recipe.to_dict()


def faces_used(embedder, count: int) -> list[dict] | None:
    """Which face of each of the `count` photos of the embedder's last `embed` was used: {"faces": 1}, or for a
    photo with several {"faces": N, "box": [x0, y0, x1, y1] (photo pixels), "choice": why}; None when the photos
    were embedded as they are (no alignment recipe, or --aligned)."""
    if embedder.alignment is None:
        return None
    several = {r["index"]: r for r in embedder.last_faces}
    return [{k: several[i][k] for k in ("faces", "box", "choice")} if i in several else {"faces": 1}
            for i in range(count)]
