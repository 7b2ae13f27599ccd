"""The pictures of an evaluation: the worst pairs as an image grid (`errors.png`) and the embeddings with
thumbnails for TensorBoard's projector. Used by `facetrain.eval` (evaluator.py) and by training's final
validation (training/validation.py), on the same pairs and faces each of them scored.

* The worst pairs come from the scoring itself (`scoring.WorstPairs`, filled by the protocol: a top-k per
  block of the all-pairs products, or a pairs file's listed scores): the genuine pairs with the lowest scores
  and the impostor pairs with the highest, each marked "wrong" when the calibrated threshold decides it wrongly.
* A face is drawn by a `thumb(row) -> PIL image` callable: the file (aligned as evaluation aligned it) for
  `facetrain.eval`, the validation dataset's model input for training (synthetic faces have no file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from facetrain.evaluation.scoring import WorstPairs

WORST_PAIRS = 8
"""Pairs of each kind (genuine, impostor) listed in metrics.json and drawn in errors.png."""
ERRORS_FILE = "errors.png"

THUMB_PX = 72
"""Side of one face in errors.png (pixels)."""
GRID_COLUMNS = 4
"""Pairs per row of errors.png."""
PAD_PX = 6
LINE_PX = 14
"""Height of one text line (the default font at FONT_PX, plus spacing)."""
FONT_PX = 11
TEXT_LINES = 3
"""Per pair: kind, score and verdict; the first file name; the second."""
NAME_CHARS = 26
"""File names are shortened to this many characters (about the width of one pair at FONT_PX)."""

PROJECTOR_MAX = 1000
"""Embeddings sent to TensorBoard's projector at most (sampled evenly): its sprite stays ~1 MB."""
PROJECTOR_THUMB_PX = 32
PROJECTOR_HEADER = ["identity", "file"]
PROJECTOR_CONFIG = "projector_config.pbtxt"
"""The projector's index of embeddings in a TensorBoard log dir (written by SummaryWriter.add_embedding)."""

WRONG_COLOUR, RIGHT_COLOUR, TEXT_COLOUR = (200, 30, 30), (150, 150, 150), (20, 20, 20)

# ------------------------------------------------------------------------------------------- worst pairs


def worst_pairs_report(worst: WorstPairs, files: Sequence[str], threshold: float | None) -> dict:
    """metrics.json's `worst_pairs`: per kind, worst first, each pair's score, files, image rows and whether
    `threshold` (accept if score >= threshold) decides it wrongly (None: no threshold)."""
    def entries(found, genuine: bool) -> list[dict]:
        out = []
        for score, i, j in zip(*found, strict=True):
            wrong = None if threshold is None else bool((score < threshold) if genuine else (score >= threshold))
            out.append({"score": float(score), "a": str(files[i]), "b": str(files[j]), "rows": [int(i), int(j)],
                        "wrong": wrong})
        return out

    return {"threshold": threshold, "genuine": entries(worst.genuine, True),
            "impostor": entries(worst.impostor, False)}


# ------------------------------------------------------------------------------------------------ the grid


def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """The last two parts of a path (identity folder / file), cut in the middle to `limit` characters."""
    tail = "/".join(Path(str(name)).parts[-2:])
    if len(tail) <= limit:
        return tail
    keep = limit - 3
    return tail[: keep // 2] + "..." + tail[len(tail) - (keep - keep // 2):]


def _cell_size() -> tuple[int, int]:
    return 2 * THUMB_PX + 3 * PAD_PX, THUMB_PX + 2 * PAD_PX + TEXT_LINES * LINE_PX


def grid_size(n_genuine: int, n_impostor: int) -> tuple[int, int]:
    """(width, height) in pixels of errors.png for that many pairs of each kind."""
    cell_w, cell_h = _cell_size()
    rows = sum(max(1, -(-n // GRID_COLUMNS)) for n in (n_genuine, n_impostor))
    return GRID_COLUMNS * cell_w + PAD_PX, 2 * LINE_PX + 2 * PAD_PX + rows * cell_h


def _fit(img: Image.Image, size: int = THUMB_PX) -> Image.Image:
    """A square RGB thumbnail of `size` pixels: the centre square of `img`, resized."""
    img = img.convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


def _draw_section(canvas, draw, font, title: str, pairs: list[dict], genuine: bool, top: int,
                  thumb: Callable[[int], Image.Image]) -> int:
    """One kind's title line and cells from `top` (pixels); returns the y below them."""
    cell_w, cell_h = _cell_size()
    draw.text((PAD_PX, top + PAD_PX // 2), title if pairs else f"{title}: none", fill=TEXT_COLOUR, font=font)
    top += LINE_PX + PAD_PX
    kind = "genuine" if genuine else "impostor"
    for k, pair in enumerate(pairs):
        x, y = (k % GRID_COLUMNS) * cell_w + PAD_PX, top + (k // GRID_COLUMNS) * cell_h
        wrong = pair["wrong"]
        draw.rectangle((x, y, x + cell_w - PAD_PX, y + cell_h - PAD_PX), outline=WRONG_COLOUR if wrong else
                       RIGHT_COLOUR, width=2 if wrong else 1)
        for side, row in enumerate(pair["rows"]):
            canvas.paste(_fit(thumb(row)), (x + PAD_PX + side * (THUMB_PX + PAD_PX), y + PAD_PX))
        verdict = "" if wrong is None else ("  WRONG" if wrong else "  right")
        lines = [f"{kind} {pair['score']:.4f}{verdict}", short_name(pair["a"]), short_name(pair["b"])]
        for n, text in enumerate(lines):
            colour = WRONG_COLOUR if wrong and n == 0 else TEXT_COLOUR
            draw.text((x + PAD_PX, y + THUMB_PX + PAD_PX + 2 + n * LINE_PX), text, fill=colour, font=font)
    return top + max(1, -(-len(pairs) // GRID_COLUMNS)) * cell_h


def error_grid(worst: dict, thumb: Callable[[int], Image.Image]) -> Image.Image:
    """errors.png: the worst genuine pairs, then the worst impostor pairs (`worst`: `worst_pairs_report`'s
    dict), each cell the two faces, kind, score, verdict at the threshold and the two file names."""
    canvas = Image.new("RGB", grid_size(len(worst["genuine"]), len(worst["impostor"])), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=FONT_PX)
    t = worst["threshold"]
    at = "no calibrated threshold" if t is None else f"threshold {t:.4f}: WRONG = decided wrongly"
    y = _draw_section(canvas, draw, font, f"Worst genuine pairs (lowest scores; {at})", worst["genuine"], True,
                      0, thumb)
    _draw_section(canvas, draw, font, "Worst impostor pairs (highest scores)", worst["impostor"], False, y, thumb)
    return canvas


# ------------------------------------------------------------------------------------------- the projector


def projector_rows(n: int, limit: int = PROJECTOR_MAX) -> np.ndarray:
    """Which of `n` embeddings the projector shows: all of them up to `limit`, else `limit` evenly spaced ones
    (deterministic, and every identity of a folder-ordered set keeps about its share)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


@dataclass
class Projector:
    """What TensorBoard's projector shows: embeddings, one metadata row per embedding (PROJECTOR_HEADER), and
    the thumbnails as a (N, 3, PROJECTOR_THUMB_PX, PROJECTOR_THUMB_PX) float tensor in [0, 1] (the sprite)."""

    embeddings: torch.Tensor
    metadata: list[list[str]]
    thumbnails: torch.Tensor

    @classmethod
    def build(cls, emb: torch.Tensor, identities: Sequence[str], files: Sequence[str],
              thumb: Callable[[int], Image.Image]) -> Projector:
        rows = projector_rows(len(emb))
        # TSV cells: a tab or newline inside a name would shift the columns
        metadata = [[_tsv(identities[i]), _tsv(short_name(files[i], 200))] for i in rows]
        images = np.stack([np.asarray(_fit(thumb(int(i)), PROJECTOR_THUMB_PX)) for i in rows])
        thumbnails = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return cls(emb.detach().float().cpu()[torch.as_tensor(rows)], metadata, thumbnails)

    def log(self, writer, step: int, tag: str) -> None:
        """Into a torch SummaryWriter: `<logdir>/<step:05d>/<tag>/` (tensors.tsv, metadata.tsv, sprite.png)
        and an entry in `<logdir>/projector_config.pbtxt`, whose other entries are kept."""
        config = Path(writer.get_logdir()) / PROJECTOR_CONFIG
        before = config.read_text() if config.is_file() else ""
        writer.add_embedding(self.embeddings, metadata=self.metadata, label_img=self.thumbnails, global_step=step,
                             tag=tag, metadata_header=PROJECTOR_HEADER)
        if before:
            config.write_text(_merged_config(before, config.read_text()))


def _merged_config(before: str, written: str) -> str:
    """A SummaryWriter rewrites projector_config.pbtxt with only its own embeddings: `facetrain.eval
    --tensorboard <run>/tb` would hide the run's validation projector. Keep every earlier entry that the
    writer did not just replace (same tensor name)."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    old, new = text_format.Parse(before, ProjectorConfig()), text_format.Parse(written, ProjectorConfig())
    names = {e.tensor_name for e in new.embeddings}
    merged = ProjectorConfig()
    merged.embeddings.extend([e for e in old.embeddings if e.tensor_name not in names] + list(new.embeddings))
    return text_format.MessageToString(merged)


def _tsv(text: str) -> str:
    return str(text).replace("\t", " ").replace("\n", " ")


# ------------------------------------------------------------------------------------------------ thumbnails


def tensor_image(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) model input (the validation dataset's item) as a PIL image (gray kept gray)."""
    array = image.detach().cpu().numpy().transpose(1, 2, 0)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def file_thumb(paths: Sequence[str], alignment: dict | None) -> Callable[[int], Image.Image]:
    """Faces from files, as evaluation saw them: raw photos cut with the bundle's `alignment` recipe (None: the
    file as it is). A photo whose face is no longer found is shown whole."""
    from facetrain.data.images import load_image

    def thumb(row: int) -> Image.Image:
        img = load_image(paths[row])
        if alignment is not None:
            from facetrain.alignment.recipe import align_image

            res = align_image(img, alignment)
            return res.crop if res.ok else img
        return img

    return thumb
