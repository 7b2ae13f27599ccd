"""The report of an evaluation: the rich table on the terminal, `metrics.json` / `args.json`, the default
output folder, the alignment summary and the TensorBoard scalars, figure and projector.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.evaluation.fta import REPORT_KEY, summary_line
from facetrain.evaluation.metrics import far_needed
from facetrain.runtime.atomic_dir import write_atomic

WRITE_TODO = "free disk space, or pass --output DIR on a writable disk"

if TYPE_CHECKING:
    from facetrain.evaluation.embedding import Embedder


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: list | None, digits: int = 4) -> str:
    return "" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if Console().is_terminal else 120)
    m = report["metrics"]
    iv = report.get("intervals") or {}
    table = Table(title=f"facetrain.eval: {report['model']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column(f"{iv['level']:.0%} interval" if iv else "interval (--bootstrap)", justify="right")
    table.add_column("threshold", justify="right")
    mode = f"{m['mode']} ROC" + (f" (bin width {m['bin_width']:.2e})" if m["mode"] == "histogram" else "")
    table.add_row("protocol", f"{report['protocol']}, {mode}", "", "")
    table.add_row("images / identities", f"{report['n_images']:,} / {report['n_identities']:,}", "", "")
    table.add_row("pairs genuine / impostor", f"{m['n_genuine']:,} / {m['n_impostor']:,}", "", "")
    table.add_row("ROC AUC", _fmt(m["auc"]), _ci(iv.get("auc")), "")
    table.add_row("EER", _fmt(m["eer"]), _ci(iv.get("eer")), _fmt(m["eer_threshold"]))
    table.add_row("best accuracy", _fmt(m["best_accuracy"]), "", _fmt(m["best_threshold"]))
    for far in DEFAULT_TARGET_FARS:
        key = f"{far:.0e}"
        tar = m[f"tar@far={key}"]
        value = _fmt(tar) if tar is not None else f"n/a (< {far_needed(far):,} impostor pairs)"
        table.add_row(f"TAR @ FAR={key}", value, _ci((iv.get("tar_at_far") or {}).get(key)),
                      _fmt(m[f"threshold@far={key}"]))
    if "kfold" in report:
        k = report["kfold"]
        table.add_row(f"{len(k['fold_accuracies'])}-fold accuracy", f"{k['accuracy_mean']:.4f} ± "
                      f"{k['accuracy_std']:.4f}", "", "other folds")
    cal = report["calibration"]
    if cal["far"] is not None:
        table.add_row(f"calibration: TAR @ FAR={cal['far']:.0e}", _fmt(cal["tar"]), _ci(cal.get("tar_interval")),
                      _fmt(cal["threshold"]))
    if cal.get("far_measured") is not None:
        table.add_row("calibration: FAR delivered", _fmt(cal["far_measured"], 6), _ci(cal.get("far_interval"), 6),
                      _fmt(cal["threshold"]))
    console.print(table)
    if iv:
        console.print(f"intervals: {iv['level']:.0%} bootstrap intervals ({iv['method']}), {iv['replicates']} "
                      f"replicates resampling {iv['units']:,} {iv['unit']} units (seed {iv['seed']}); the threshold "
                      "is held fixed for 'FAR delivered'")
        if cal.get("far_interval") == [0.0, 0.0]:  # no replicate can show a false accept the data never had
            n = m["n_impostor"]
            console.print(f"[yellow]note:[/] the threshold accepts none of the {n:,} impostor pairs, so the bootstrap "
                          f"cannot bound its FAR above 0; at 95% it is below 3/{n:,} = {3 / n:.1e} (rule of three)")
    for reason in m["tar_unavailable"]:
        console.print(f"[yellow]note:[/] {reason}")
    console.print(f"calibration: {cal['note']}")
    fta = summary_line(report.get(REPORT_KEY))
    if fta:  # soft_wrap: one line, however long
        from rich.markup import escape

        console.print(f"[yellow]{escape(fta)}[/] (all in metrics.json)", soft_wrap=True)
    several = (report.get("alignment") or {}).get("several_faces") or []
    if several:
        console.print(f"[yellow]alignment:[/] {len(several)} photos show several faces; the face used in each "
                      f"({report['alignment']['recipe']['face_choice']}) is listed in metrics.json")
    console.print(f"wrote {report['output']}/metrics.json" + (", roc.png, far_frr.png, scores.png, errors.png"
                                                               if report["plots"] else ""))


def alignment_summary(embedder: Embedder, align: bool, paths: list[str]) -> dict:
    """What the report says about alignment: the recipe applied (if any) and every photo left out."""
    failures = [{"path": r["path"], "status": r["status"], "reason": r["reason"]} for r in embedder.last_failures]
    if embedder.alignment is None:
        inputs = "aligned crops (--aligned)" if embedder.meta.get("alignment") else "as they are (no recipe in bundle)"
    else:
        inputs = "raw photos, aligned with the bundle's recipe" if align else "crops of facetrain.align (same recipe)"
    several = [{k: r[k] for k in ("path", "faces", "box", "choice")} for r in getattr(embedder, "last_faces", [])]
    return {"inputs": inputs, "recipe": embedder.alignment if align else None, "n_photos": len(paths),
            "n_without_face": len(failures), "without_face": failures,
            "n_several_faces": len(several), "several_faces": several}


def default_output_dir(model_path: Path, data: str) -> Path:
    """`<model>/../eval-<timestamp>-<data folder name>`, next to the bundle, never overwriting one."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = model_path.parent / f"eval-{stamp}-{Path(data).resolve().name}"
    out, k = base, 1
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON into `path`, atomically; a refused write is one line naming the file."""
    text = json.dumps(data, indent=2, default=_json_default)
    write_atomic(path, lambda tmp: tmp.write_text(text), WRITE_TODO)


#: The projector's tag for facetrain.eval's embeddings (training's final validation logs "validation").
EVAL_PROJECTOR_TAG = "eval"


def log_tensorboard(log_dir: str, report: dict, roc_fig, step: int, projector=None) -> None:
    """Scalars `eval/<metric>`, the ROC figure and (`projector`: a `pictures.Projector`) the embeddings with
    their thumbnails for TensorBoard's projector."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    try:
        for key, value in report["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
                writer.add_scalar(f"eval/{key}", value, step)
        if "kfold" in report:
            writer.add_scalar("eval/kfold_accuracy_mean", report["kfold"]["accuracy_mean"], step)
        if roc_fig is not None:
            writer.add_figure("eval/roc", roc_fig, step, close=False)
        if projector is not None:
            projector.log(writer, step, EVAL_PROJECTOR_TAG)
    finally:
        writer.close()

