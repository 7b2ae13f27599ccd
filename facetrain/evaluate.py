"""Evaluate an embedding model on people it has never seen, and calibrate its decision threshold.

    python -m facetrain.eval --model runs/exp/bundle --data /data/heldout                 # all pairs of a folder
    python -m facetrain.eval --model runs/exp/bundle --data /data/lfw --pairs /data/lfw/pairs.txt   # LFW protocol
    accelerate launch --multi_gpu --num_processes 8 -m facetrain.eval --model ... --data ...     # 8 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --main_process_port <free port> -m facetrain.eval --model ... --data ...                # 2 CPU ranks

This module holds the logic; `facetrain/eval.py` is the command line. `verify.py` and `identify.py` embed
images through `Embedder` here, so all three preprocess an image exactly as validation during training did
(`data.eval_transform` with the bundle's stored preprocessing, the same autocast and memory layout).

Flow: check the inputs (before any model is built) -> embed every image once, in batches, sharded across the
ranks and gathered in order (`embed.embed_dataset`) -> rank 0 scores the pairs with `metrics` (the code the
trainer validates with) -> rich table, `metrics.json`, `args.json`, PNG plots, optional TensorBoard scalars
and figure -> the bundle gains the threshold for the target FAR (`--no-calibrate` leaves it untouched).

Protocols (`PROTOCOLS`):
* `all_pairs` (default): every unordered pair of a labelled folder `<data>/<identity>/<image>`. The ROC is
  exact up to `--max-exact-pairs` pairs (every score kept), else a fixed histogram of 2**16 bins streamed
  block by block (memory independent of the number of pairs, thresholds quantised to 3.05e-5).
* `pairs_file` (`--pairs FILE`): an LFW `pairs.txt` over `<data>/<name>/<name>_<0001>.<ext>`; 10-fold
  accuracy (threshold chosen on the other nine folds) plus AUC/EER/TAR@FAR over all listed pairs.

Threshold calibration: the decision rule is "same person if cosine >= threshold". The threshold written to
the bundle is the highest one whose FAR on this data is <= the target FAR (`--target-far`; by default 1e-3
when the data has >= 1000 impostor pairs, else the smallest of 1e-1/1e-2 that it can resolve). A FAR f is
resolvable only with >= 1/f impostor pairs: below that, one false accept already overshoots the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facetrain.data import Preprocess, eval_transform, scan_folder, to_rgb
from facetrain.errors import UserError
from facetrain.metrics import (
    DEFAULT_TARGET_FARS,
    RocCurve,
    all_pairs_roc,
    count_pairs,
    kfold_accuracy,
    pair_scores,
    parse_lfw_pairs,
    resolve_pair_paths,
    roc_exact,
    verification_metrics,
)
from facetrain.model import (
    META_FILE,
    inference_model,
    load_bundle,
    read_bundle_meta,
    update_bundle_meta,
)

#: FAR the bundle's threshold is calibrated for when --target-far is not given: a common operating point for
#: 1:1 verification (1 false accept in 1000 impostor attempts), resolvable by any set with >= 1000
#: impostor pairs (e.g. 5 identities x 10 images).
DEFAULT_CALIBRATION_FAR = 1e-3


# ----------------------------------------------------------------------------------------------------------
# Command-line helpers shared by eval, verify and identify


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one-line UserErrors (run_cli prints them) instead of usage dumps."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def resolve_model_path(path: str | Path) -> Path:
    """A bundle or checkpoint directory; a training run directory means its best model, `<run>/bundle`."""
    path = Path(path)
    if path.is_dir() and not (path / META_FILE).is_file() and (path / "bundle" / META_FILE).is_file():
        path = path / "bundle"
    return Path(read_bundle_meta(path)["path"])  # raises a one-line error for anything else


def labelled_folder(root: str | Path, option: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, identity label per image, identity names) of `root/<identity>/<image>`."""
    if not Path(root).is_dir():
        raise UserError(f"{option}: folder not found: {root} (expected {root}/<identity>/<image>)")
    try:
        paths, labels, names = scan_folder(str(root))
    except UserError as err:  # scan_folder speaks in config keys; this is a command-line option
        raise UserError(str(err).replace("data.root", option, 1)) from None
    return paths, np.asarray(labels, dtype=np.int64), names


def require_files(paths: list[str], what: str) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{what}: file not found: {p}")


# ----------------------------------------------------------------------------------------------------------
# Embedding images: one path for eval, verify and identify


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (model input, position); a file that cannot be decoded is a one-line error naming it."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                img = to_rgb(im, keep_gray=True)
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise UserError(f"{path}: cannot decode image ({type(err).__name__}: {err}); remove or replace "
                            "the file") from None
        return self.transform(img), i


@dataclass
class Embedder:
    """A loaded model with its preprocessing, placed on this process's device, embedding lists of files."""

    model: torch.nn.Module
    preprocess: Preprocess
    meta: dict
    path: Path
    accelerator: Any
    precision: str
    batch_size: int = 64
    num_workers: int = 0
    flip: bool = False
    fold_batchnorm: bool = True
    _folded: torch.nn.Module | None = field(default=None, repr=False)

    @classmethod
    def load(cls, model_path: str | Path, batch_size: int = 64, num_workers: int = -1, flip: bool | None = False,
             mixed_precision: str = "auto", fold_batchnorm: bool | None = None) -> Embedder:
        """Load a bundle/checkpoint and create the Accelerator (here, never at import: under `accelerate
        launch` this joins the process group). Precision follows the trainer's rule: bf16 autocast only where
        it is faster (GPUs; bf16-capable CPUs at >= 160 px). flip=None: the flip test if the bundle's threshold
        was calibrated with it (verify and identify then score as the threshold expects). fold_batchnorm=None:
        the bundle's model.fold_batchnorm (BatchNorm folded into the convolutions for calls of `embed` with at
        least model.FOLD_MIN_IMAGES images)."""
        from accelerate import Accelerator

        from facetrain.data import default_num_workers
        from facetrain.precision import resolve_mixed_precision

        path = resolve_model_path(model_path)
        model, pre, meta = load_bundle(path)
        if flip is None:
            flip = bool((meta.get("threshold_calibration") or {}).get("flip", False))
        precision = resolve_mixed_precision(mixed_precision, pre.image_size)
        accelerator = Accelerator(mixed_precision=precision)
        model = model.to(accelerator.device)
        workers = num_workers if num_workers >= 0 else default_num_workers(accelerator.num_processes)
        if fold_batchnorm is None:
            fold_batchnorm = bool(meta["model"].get("fold_batchnorm", True))
        return cls(model, pre, meta, path, accelerator, precision, batch_size, workers, flip, fold_batchnorm)

    @property
    def channels_last(self) -> bool:
        return bool(self.meta["model"].get("channels_last", False))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def embed(self, paths: list[str], num_workers: int | None = None) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of `paths`, in order, on every rank."""
        from facetrain.embed import embed_dataset

        dataset = ImageFiles(paths, eval_transform(self.preprocess))
        workers = self.num_workers if num_workers is None else num_workers
        if self._folded is None:  # once folded, every later call uses the same copy (identify: gallery, probes)
            model = inference_model(self.model, self.preprocess.image_size, len(paths), self.fold_batchnorm)
            self._folded = model if model is not self.model else None
        model = self._folded if self._folded is not None else self.model
        return embed_dataset(model, dataset, self.preprocess, self.batch_size, self.accelerator,
                             num_workers=workers, flip=self.flip, channels_last=self.channels_last)


# ----------------------------------------------------------------------------------------------------------
# Options


@dataclass
class EvalOptions:
    """Everything `facetrain.eval` accepts (facetrain/eval.py maps the command line onto this)."""

    model: str
    data: str
    pairs: str = ""
    output: str = ""
    target_far: float | None = None
    calibrate: bool = True
    flip: bool = False
    batch_size: int = 64
    num_workers: int = -1
    mixed_precision: str = "auto"
    fold_batchnorm: bool | None = None
    roc_mode: str = "auto"
    max_exact_pairs: int = 20_000_000
    tensorboard: str = ""
    save_embeddings: bool = False
    plots: bool = True
    argv: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.target_far is not None and not 0.0 < self.target_far < 1.0:
            raise UserError(f"--target-far: must be in (0, 1), e.g. 1e-3; got {self.target_far}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.max_exact_pairs < 1:
            raise UserError(f"--max-exact-pairs: must be >= 1, got {self.max_exact_pairs}")
        if self.pairs and not Path(self.pairs).is_file():
            raise UserError(f"--pairs: file not found: {self.pairs}")


def far_needed(far: float) -> int:
    """Impostor pairs needed to resolve `far` (same rule as metrics: FAR moves in steps of 1/n_impostor)."""
    return math.ceil(1.0 / far - 1e-9)


def calibration_far(requested: float | None, n_impostor: int) -> tuple[float | None, str]:
    """(FAR to calibrate the threshold at, where that choice came from); None when nothing is resolvable."""
    if requested is not None:
        return requested, "--target-far"
    if n_impostor >= far_needed(DEFAULT_CALIBRATION_FAR):
        return DEFAULT_CALIBRATION_FAR, "default"
    resolvable = [f for f in DEFAULT_TARGET_FARS if n_impostor >= far_needed(f)]
    if resolvable:
        return min(resolvable), f"smallest resolvable ({n_impostor} impostor pairs < {far_needed(1e-3)})"
    return None, f"no standard FAR is resolvable with {n_impostor} impostor pairs (need >= 10)"


# ----------------------------------------------------------------------------------------------------------
# Protocols: what to embed, and how to turn embeddings into an ROC


@dataclass
class Plan:
    """What a protocol needs embedded, and the pair counts known before any model runs."""

    paths: list[str]
    n_genuine: int
    n_impostor: int
    n_identities: int
    describe: str
    labels: np.ndarray | None = None
    pair_index: np.ndarray | None = None  # (K, 2) rows into `paths` (pairs_file)
    pair_genuine: np.ndarray | None = None
    pair_fold: np.ndarray | None = None


class AllPairs:
    """Every unordered pair of a labelled folder."""

    name = "all_pairs"

    def plan(self, opts: EvalOptions) -> Plan:
        paths, labels, names = labelled_folder(opts.data, "--data")
        n_genuine, n_impostor = count_pairs(labels)
        if len(names) < 2:
            raise UserError(f"--data: {opts.data} has only one identity ({names[0]}, {len(paths)} images), so "
                            "there are no impostor pairs and FAR is undefined: add folders of other people")
        if n_genuine == 0:
            raise UserError(f"--data: every identity in {opts.data} has a single image, so there are no "
                            "genuine pairs and TAR is undefined: add a second image of some people")
        return Plan(paths, n_genuine, n_impostor, len(names), f"all pairs of {opts.data}", labels=labels)

    def score(self, emb: torch.Tensor, plan: Plan, opts: EvalOptions) -> tuple[RocCurve, dict]:
        roc = all_pairs_roc(emb, torch.as_tensor(plan.labels), mode=opts.roc_mode,
                            max_exact_pairs=opts.max_exact_pairs)
        return roc, {}


class PairsFile:
    """The pairs listed in an LFW-format pairs.txt, with the 10-fold accuracy protocol."""

    name = "pairs_file"

    def plan(self, opts: EvalOptions) -> Plan:
        if not Path(opts.data).is_dir():
            raise UserError(f"--data: folder not found: {opts.data} (the LFW root: <data>/<name>/<name>_0001.jpg)")
        specs = resolve_pair_paths(parse_lfw_pairs(opts.pairs), opts.data)
        files = list(dict.fromkeys(str(p) for s in specs for p in (s.path_a, s.path_b)))
        row = {p: i for i, p in enumerate(files)}
        index = np.array([[row[str(s.path_a)], row[str(s.path_b)]] for s in specs], dtype=np.int64)
        genuine = np.array([s.genuine for s in specs], dtype=bool)
        folds = np.array([s.fold for s in specs], dtype=np.int64)
        n_genuine = int(genuine.sum())
        people = {s.name_a for s in specs} | {s.name_b for s in specs}
        return Plan(files, n_genuine, len(specs) - n_genuine, len(people),
                    f"{len(specs)} pairs of {opts.pairs} ({len(np.unique(folds))} folds)",
                    pair_index=index, pair_genuine=genuine, pair_fold=folds)

    def score(self, emb: torch.Tensor, plan: Plan, opts: EvalOptions) -> tuple[RocCurve, dict]:
        scores = pair_scores(emb[plan.pair_index[:, 0]], emb[plan.pair_index[:, 1]])
        roc = roc_exact(scores, plan.pair_genuine)
        extra = {}
        if len(np.unique(plan.pair_fold)) >= 2:
            extra["kfold"] = kfold_accuracy(scores, plan.pair_genuine, plan.pair_fold)
        return roc, extra


PROTOCOLS = {"all_pairs": AllPairs(), "pairs_file": PairsFile()}


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot state, no display needed)


def _plot_points(roc: RocCurve, points: int = 3000) -> np.ndarray:
    """Indices of ROC points to draw: a curve with millions of points looks the same with a few thousand
    taken on a log-FAR grid (the low-FAR end matters), a linear FAR grid and a linear TAR grid."""
    last = len(roc.far) - 1
    if last + 1 <= points:
        return np.arange(last + 1)
    positive = roc.far[roc.far > 0]
    low = float(positive[0]) if positive.size else 1e-12
    picks = [
        np.searchsorted(roc.far, np.geomspace(low, 1.0, points // 2), side="right") - 1,
        np.searchsorted(roc.far, np.linspace(0.0, 1.0, points // 4), side="right") - 1,
        np.searchsorted(roc.tar, np.linspace(0.0, 1.0, points // 4), side="left"),
        [0, last],
    ]
    return np.unique(np.clip(np.concatenate(picks), 0, last))


def _new_figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def roc_figure(roc: RocCurve, metrics: dict, threshold: float | None, far: float | None):
    idx = _plot_points(roc)
    fig = _new_figure()
    ax = fig.add_subplot()
    keep = roc.far[idx] > 0
    ax.plot(roc.far[idx][keep], roc.tar[idx][keep], lw=1.5, label=f"ROC (AUC {metrics['auc']:.4f})")
    for f in DEFAULT_TARGET_FARS:
        tar = metrics.get(f"tar@far={f:.0e}")
        if tar is not None:
            ax.plot([f], [tar], "o", ms=4, color="gray")
            ax.annotate(f"{tar:.3f}", (f, tar), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if threshold is not None and far is not None:
        ax.axvline(far, ls="--", lw=1, color="tab:red", label=f"calibration FAR {far:.0e} (t = {threshold:.4f})")
    ax.set_xscale("log")
    ax.set_xlim(min(1.0, 0.5 / roc.n_impostor), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate, log scale)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(f"ROC: {roc.n_genuine:,} genuine / {roc.n_impostor:,} impostor pairs, EER {metrics['eer']:.4f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def far_frr_figure(roc: RocCurve, metrics: dict, threshold: float | None):
    idx = _plot_points(roc)
    idx = idx[np.isfinite(roc.thresholds[idx])]
    fig = _new_figure()
    ax = fig.add_subplot()
    t = roc.thresholds[idx]
    ax.plot(t, roc.far[idx], label="FAR (impostors accepted)")
    ax.plot(t, 1.0 - roc.tar[idx], label="FRR (genuine rejected)")
    ax.set_yscale("log", nonpositive="mask")
    if metrics.get("eer_threshold") is not None:
        ax.axvline(metrics["eer_threshold"], ls=":", color="gray", label=f"EER {metrics['eer']:.4f}")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="tab:red", label=f"calibrated threshold {threshold:.4f}")
    ax.set_xlabel("threshold (cosine similarity; accept if score >= threshold)")
    ax.set_ylabel("error rate (log scale)")
    ax.set_title("FAR and FRR vs threshold")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def score_histogram_figure(roc: RocCurve, threshold: float | None, bins: int = 100):
    """Genuine vs impostor score distributions, recovered from the ROC itself (each point's step in TAR/FAR
    is the number of pairs at that score), so both ROC modes plot without keeping the scores."""
    scores = roc.thresholds[1:]
    genuine = np.diff(np.rint(roc.tar * roc.n_genuine))
    impostor = np.diff(np.rint(roc.far * roc.n_impostor))
    edges = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, bins + 1)
    fig = _new_figure()
    ax = fig.add_subplot()
    for counts, total, label in ((impostor, roc.n_impostor, "impostor"), (genuine, roc.n_genuine, "genuine")):
        hist, _ = np.histogram(scores, bins=edges, weights=counts / total)
        ax.stairs(hist, edges, fill=True, alpha=0.45, label=f"{label} ({total:,} pairs)")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="tab:red", label=f"calibrated threshold {threshold:.4f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of pairs per bin")
    ax.set_title("Genuine vs impostor scores")
    ax.legend(fontsize=8)
    return fig


def make_figures(roc: RocCurve, metrics: dict, threshold: float | None, far: float | None) -> dict:
    return {
        "roc.png": roc_figure(roc, metrics, threshold, far),
        "far_frr.png": far_frr_figure(roc, metrics, threshold),
        "scores.png": score_histogram_figure(roc, threshold),
    }


# ----------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if Console().is_terminal else 120)
    m = report["metrics"]
    table = Table(title=f"facetrain.eval: {report['model']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    mode = f"{m['mode']} ROC" + (f" (bin width {m['bin_width']:.2e})" if m["mode"] == "histogram" else "")
    table.add_row("protocol", f"{report['protocol']}, {mode}", "")
    table.add_row("images / identities", f"{report['n_images']:,} / {report['n_identities']:,}", "")
    table.add_row("pairs genuine / impostor", f"{m['n_genuine']:,} / {m['n_impostor']:,}", "")
    table.add_row("ROC AUC", _fmt(m["auc"]), "")
    table.add_row("EER", _fmt(m["eer"]), _fmt(m["eer_threshold"]))
    table.add_row("best accuracy", _fmt(m["best_accuracy"]), _fmt(m["best_threshold"]))
    for far in DEFAULT_TARGET_FARS:
        key = f"{far:.0e}"
        tar = m[f"tar@far={key}"]
        value = _fmt(tar) if tar is not None else f"n/a (< {far_needed(far):,} impostor pairs)"
        table.add_row(f"TAR @ FAR={key}", value, _fmt(m[f"threshold@far={key}"]))
    if "kfold" in report:
        k = report["kfold"]
        table.add_row(f"{len(k['fold_accuracies'])}-fold accuracy", f"{k['accuracy_mean']:.4f} ± "
                      f"{k['accuracy_std']:.4f}", "other folds")
    cal = report["calibration"]
    if cal["far"] is not None:
        table.add_row(f"calibration: TAR @ FAR={cal['far']:.0e}", _fmt(cal["tar"]), _fmt(cal["threshold"]))
    console.print(table)
    for reason in m["tar_unavailable"]:
        console.print(f"[yellow]note:[/] {reason}")
    console.print(f"calibration: {cal['note']}")
    console.print(f"wrote {report['output']}/metrics.json" + (", roc.png, far_frr.png, scores.png"
                                                               if report["plots"] else ""))


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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def log_tensorboard(log_dir: str, report: dict, roc_fig, step: int) -> None:
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
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------------------
# The run


def run(opts: EvalOptions) -> dict | None:
    """Evaluate; returns the report on rank 0 (None on other ranks)."""
    started = time.perf_counter()
    opts.check()
    model_path = resolve_model_path(opts.model)
    protocol = PROTOCOLS["pairs_file" if opts.pairs else "all_pairs"]
    plan = protocol.plan(opts)
    if opts.target_far is not None and plan.n_impostor < far_needed(opts.target_far):
        raise UserError(f"--target-far {opts.target_far:g}: needs >= {far_needed(opts.target_far):,} impostor "
                        f"pairs to be resolvable, {plan.describe} gives {plan.n_impostor:,}: choose a larger FAR "
                        "or add identities")

    embedder = Embedder.load(model_path, opts.batch_size, opts.num_workers, opts.flip, opts.mixed_precision,
                             opts.fold_batchnorm)
    t0 = time.perf_counter()
    emb = embedder.embed(plan.paths)
    embed_s = time.perf_counter() - t0
    if not embedder.is_main:
        return None

    t0 = time.perf_counter()
    roc, extra = protocol.score(emb, plan, opts)
    far, far_source = calibration_far(opts.target_far, roc.n_impostor)
    metrics = verification_metrics(roc, target_far=far)
    score_s = time.perf_counter() - t0
    threshold = metrics.get("threshold_at_target_far")

    out = Path(opts.output) if opts.output else default_output_dir(model_path, opts.data)
    out.mkdir(parents=True, exist_ok=True)
    if far is None:
        note = f"no threshold written: {far_source}"
    elif threshold is None:
        note = (f"no threshold written: at FAR <= {far:.0e} this model accepts no genuine pair (TAR 0); "
                "evaluate on more identities or a better model")
    elif not opts.calibrate:
        note = f"--no-calibrate: bundle left unchanged (threshold {threshold:.6f} at FAR {far:.0e} not written)"
    else:
        note = f"wrote threshold {threshold:.6f} (FAR {far:.0e}, {far_source}) to {model_path / META_FILE}"
    report = {
        "protocol": protocol.name,
        "description": plan.describe,
        "model": str(model_path),
        "model_step": embedder.meta.get("step"),
        "data": str(opts.data),
        "pairs_file": opts.pairs or None,
        "n_images": len(plan.paths),
        "n_identities": plan.n_identities,
        "flip": opts.flip,
        "num_processes": embedder.accelerator.num_processes,
        "mixed_precision": embedder.precision,
        "metrics": metrics,
        **extra,
        "calibration": {"far": far, "far_source": far_source, "threshold": threshold,
                        "tar": metrics.get("tar_at_target_far"),
                        "written_to_bundle": bool(opts.calibrate and threshold is not None), "note": note},
        "timing_s": {"embed": round(embed_s, 3), "score": round(score_s, 3)},
        "output": str(out),
        "plots": opts.plots,
    }

    roc_fig = None
    if opts.plots or opts.tensorboard:
        figures = make_figures(roc, metrics, threshold, far)
        roc_fig = figures["roc.png"]
        if opts.plots:
            for name, fig in figures.items():
                fig.savefig(out / name)
    if opts.save_embeddings:
        from safetensors.torch import save_file

        tensors = {"embeddings": emb.contiguous()}
        if plan.labels is not None:
            tensors["labels"] = torch.as_tensor(plan.labels)
        save_file(tensors, str(out / "embeddings.safetensors"), metadata={"files": json.dumps(plan.paths)})
    if opts.tensorboard:
        log_tensorboard(opts.tensorboard, report, roc_fig, int(embedder.meta.get("step") or 0))
    if report["calibration"]["written_to_bundle"]:
        update_bundle_meta(model_path, threshold=threshold, threshold_far=far, threshold_calibration={
            "far_source": far_source, "tar": metrics.get("tar_at_target_far"), "protocol": protocol.name,
            "data": str(Path(opts.data).resolve()), "n_impostor": roc.n_impostor, "n_genuine": roc.n_genuine,
            "flip": opts.flip, "eval_dir": str(out.resolve()), "date": datetime.now().isoformat(timespec="seconds"),
        })
    report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
    write_json(out / "metrics.json", report)
    write_json(out / "args.json", {**dataclasses.asdict(opts), "command": [sys.executable, "-m", "facetrain.eval",
                                                                         *opts.argv]})
    print_report(report)
    return report
