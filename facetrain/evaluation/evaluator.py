"""Evaluate an embedding model on people it has never seen, and calibrate its decision threshold.

    python -m facetrain.eval --model runs/exp/bundle --data /data/heldout                 # all pairs of a folder
    python -m facetrain.eval --model runs/exp/bundle --data /data/lfw --pairs /data/lfw/pairs.txt   # LFW protocol
    accelerate launch --multi_gpu --num_processes 8 -m facetrain.eval --model ... --data ...     # 8 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --main_process_port <free port> -m facetrain.eval --model ... --data ...                # 2 CPU ranks

This module holds the evaluation flow (`run`); `facetrain/eval.py` is the command line. Its parts live in
their own modules: `embed` (images -> embeddings, the same `Embedder` verify and identify use), `protocols`
(what to embed and how to score it, the calibration FAR), `figures` (the plots) and `report` (table, JSON,
TensorBoard).

Flow: check the inputs (before any model is built) -> embed every image once, in batches, sharded across the
ranks and gathered in order (`embed.embed_dataset`) -> rank 0 scores the pairs with `metrics` (the code the
trainer validates with) -> rich table, `metrics.json`, `args.json`, PNG plots, optional TensorBoard scalars
and figure -> the bundle gains the threshold for the target FAR, and its model card (`model.card`) the
evaluation behind it (`--no-calibrate` leaves model and card untouched).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from facetrain.alignment.recipe import incomplete_alignment
from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.errors import UserError
from facetrain.evaluation.bootstrap import Intervals, bootstrap_intervals, threshold_grid
from facetrain.evaluation.embedding import load_embedder
from facetrain.evaluation.figures import make_figures
from facetrain.evaluation.fta import REPORT_KEY, faceless, section, stop_if_asked
from facetrain.evaluation.metrics import far_needed, verification_metrics
from facetrain.evaluation.options import EvalOptions
from facetrain.evaluation.pictures import (
    ERRORS_FILE,
    WORST_PAIRS,
    Projector,
    error_grid,
    file_thumb,
    worst_pairs_report,
)
from facetrain.evaluation.protocols import PROTOCOLS, calibration_far, preflight_plan
from facetrain.evaluation.report import (
    WRITE_TODO,
    alignment_summary,
    default_output_dir,
    log_tensorboard,
    print_report,
    write_json,
)
from facetrain.evaluation.scoring import WorstPairs
from facetrain.model.card import CARD_KEY, build_card, evaluation_entry
from facetrain.model.files import META_FILE, is_onnx_file, resolve_model_path, update_bundle_meta
from facetrain.runtime.atomic_dir import write_atomic


def update_model_meta(path: Path, **fields) -> None:
    """Calibration fields and the model card into a bundle's metadata (and its MODEL_CARD.md), or into an
    exported ONNX file's (same keys)."""
    from facetrain.deploy.onnx_embedder import update_metadata

    (update_metadata if is_onnx_file(path) else update_bundle_meta)(path, **fields)


def run(opts: EvalOptions) -> dict | None:
    """Evaluate; returns the report on rank 0 (None on other ranks)."""
    started = time.perf_counter()
    opts.check()
    if opts.benchmarks:  # the standard verification sets: their own flow and table
        from facetrain.evaluation.benchmark_run import run_benchmarks

        return run_benchmarks(opts)
    model_path = resolve_model_path(opts.model, opts.backend)
    protocol = PROTOCOLS["pairs_file" if opts.pairs else "all_pairs"]
    plan = protocol.plan(opts)
    attempted = len(plan.paths)  # the images the protocol lists: the FTA rate's denominator
    plan, failures = preflight_plan(protocol, plan, opts)  # missing and undecodable: failures to acquire
    n_impostor = plan.scored_impostors(opts.fta)
    if opts.target_far is not None and n_impostor < far_needed(opts.target_far):
        raise UserError(f"--target-far {opts.target_far:g}: needs >= {far_needed(opts.target_far):,} impostor "
                        f"pairs to be resolvable, {plan.describe} gives {n_impostor:,}: choose a larger FAR "
                        "or add identities")

    # an exported file's flip test is in its graph: without --flip, evaluate it as exported
    flip = opts.flip if opts.backend == "torch" else (opts.flip or None)
    embedder = load_embedder(opts.backend, model_path, opts.batch_size, opts.num_workers, flip,
                             opts.mixed_precision, opts.fold_batchnorm, aligned=opts.aligned,
                             input_spec=opts.input_spec)
    # rank 0 writes the report: its folder must take files before the (long) evaluation, not after it
    out = _start_output(opts, model_path) if embedder.is_main else None
    align = not embedder.aligned_folder(opts.data, "--data")  # crops of facetrain.align with the bundle's recipe
    half_aligned = incomplete_alignment(opts.data) if embedder.is_main else None
    if half_aligned:
        print(f"facetrain.eval: {half_aligned}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    emb = embedder.embed(plan.paths, align=align, record_failures=True)
    embed_s = time.perf_counter() - t0
    if not embedder.is_main:  # rank 0 scores; the others wait for it in cli.run_cli (leave_process_group)
        return None
    alignment = alignment_summary(embedder, align, plan.paths)
    if embedder.last_failures:  # photos without a usable face: failures to acquire too
        stop_if_asked(opts.fta, faceless(embedder.last_failures))
        plan, emb = protocol.without(plan, emb, {r["index"] for r in embedder.last_failures})
        failures = sorted(failures + faceless(embedder.last_failures), key=lambda r: r["path"])

    t0 = time.perf_counter()
    worst = WorstPairs(WORST_PAIRS)
    roc, extra = protocol.score(emb, plan, opts, worst)
    far, far_source = calibration_far(opts.target_far, roc.n_impostor)
    metrics = verification_metrics(roc, target_far=far)
    metrics["fta_rate"] = len(failures) / attempted  # as validation logs it (val/fta_rate; eval/fta_rate)
    score_s = time.perf_counter() - t0
    threshold = metrics.get("threshold_at_target_far")
    t0 = time.perf_counter()
    intervals = _intervals(protocol, emb, plan, (roc, metrics, threshold), opts)
    bootstrap_s = time.perf_counter() - t0

    if far is None:
        note = f"no threshold written: {far_source}"
    elif threshold is None:
        note = (f"no threshold written: at FAR <= {far:.0e} this model accepts no genuine pair (TAR 0); "
                "evaluate on more identities or a better model")
    elif embedder.meta.get("third_party"):
        note = (f"third-party model: its file is never written; threshold {threshold:.6f} at FAR {far:.0e} is in "
                "metrics.json only")
    elif not opts.calibrate:
        note = f"--no-calibrate: bundle left unchanged (threshold {threshold:.6f} at FAR {far:.0e} not written)"
    else:
        target = model_path / META_FILE if model_path.is_dir() else model_path
        note = f"wrote threshold {threshold:.6f} (FAR {far:.0e}, {far_source}) to {target}"
    report = {
        "protocol": protocol.name,
        "description": plan.describe,
        "model": str(model_path),
        "model_step": embedder.meta.get("step"),
        "model_input_spec": embedder.meta.get("input_spec"),  # a third-party model's, as given
        "data": str(opts.data),
        "pairs_file": opts.pairs or None,
        "n_images": len(plan.paths),
        "n_identities": plan.n_identities,
        "flip": embedder.flip,
        "num_processes": embedder.num_processes,
        "mixed_precision": embedder.precision,
        "alignment": alignment,
        "metrics": metrics,
        "intervals": intervals.as_dict() if intervals else None,
        **extra,
        "worst_pairs": worst_pairs_report(worst, plan.paths, threshold),
        "calibration": {"far": far, "far_source": far_source, "threshold": threshold,
                        "tar": metrics.get("tar_at_target_far"), **_calibration_intervals(roc, threshold, intervals),
                        "written_to_bundle": bool(opts.calibrate and threshold is not None
                                                  and not embedder.meta.get("third_party")), "note": note},
        "timing_s": {"embed": round(embed_s, 3), "score": round(score_s, 3), "bootstrap": round(bootstrap_s, 3)},
        "output": str(out),
        "plots": opts.plots,
        REPORT_KEY: section(opts.fta, attempted, failures, plan.left_out_genuine, plan.left_out_impostor),
    }

    report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
    # the results first, then the model's metadata: a model that cannot take the threshold loses nothing else;
    # until it took it, metrics.json says it did not (a kill in between leaves no false claim)
    calibrate, report["calibration"]["written_to_bundle"] = report["calibration"]["written_to_bundle"], False
    # the faces of the pictures as the model saw them: raw photos aligned with the bundle's recipe
    thumb = file_thumb(plan.paths, embedder.alignment if align else None)
    _write_results(out, report, opts, (roc, metrics, threshold, far, intervals), emb, plan, embedder, thumb)
    if calibrate:
        cal = report["calibration"]
        _calibrate(model_path, report, out, {
            "far_source": far_source, "tar": metrics.get("tar_at_target_far"), "protocol": protocol.name,
            **{key: cal[key] for key in _CALIBRATION_INTERVAL_KEYS},
            "data": str(Path(opts.data).resolve()), "n_impostor": roc.n_impostor, "n_genuine": roc.n_genuine,
            "flip": embedder.flip, "eval_dir": str(out.resolve()), "date": datetime.now().isoformat(timespec="seconds"),
        }, embedder.meta)
    print_report(report)
    return report


_CALIBRATION_INTERVAL_KEYS = ("far_measured", "far_interval", "tar_interval", "ci_level")


def _intervals(protocol, emb, plan, scored: tuple, opts: EvalOptions) -> Intervals | None:
    """Bootstrap intervals (`--bootstrap` replicates, none with 0) of the figures in `scored` (roc, metrics,
    calibrated threshold): counts per resampling unit at a threshold grid, then weighted sums per replicate."""
    if not opts.bootstrap:
        return None
    roc, metrics, threshold = scored
    fars = list(DEFAULT_TARGET_FARS)
    grid = threshold_grid(roc, [metrics[f"threshold@far={f:.0e}"] for f in fars] + [threshold])
    counts = protocol.unit_counts(emb, plan, grid, opts.seed, opts.fta)
    return bootstrap_intervals(counts, metrics, fars, threshold, opts.bootstrap, opts.ci_level, opts.seed)


def _calibration_intervals(roc, threshold: float | None, intervals: Intervals | None) -> dict:
    """What the calibrated threshold delivers on this data: its FAR, and with the bootstrap the intervals of
    its FAR and TAR (the threshold held fixed, both re-measured per replicate)."""
    measured = None if threshold is None else float(roc.far[np.flatnonzero(roc.thresholds == threshold)[0]])
    iv = intervals.as_dict() if intervals else {}
    return {"far_measured": measured, "far_interval": iv.get("delivered_far"),
            "tar_interval": iv.get("tar_at_threshold"), "ci_level": iv.get("level")}


def _start_output(opts: EvalOptions, model_path: Path) -> Path:
    """The report's folder, created with the command line in it (`args.json`) before anything is embedded:
    a folder that takes no files (read-only, full) is one line now, not after the whole evaluation."""
    out = Path(opts.output) if opts.output else default_output_dir(model_path, opts.data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output: cannot create {out} ({err.strerror or err}); {WRITE_TODO}") from None
    write_json(out / "args.json", {**dataclasses.asdict(opts), "command": [sys.executable, "-m", "facetrain.eval",
                                                                         *opts.argv]})
    return out


def _write_results(out: Path, report: dict, opts: EvalOptions, scored: tuple, emb, plan, embedder, thumb) -> None:
    """metrics.json, then the plots (and errors.png), the embeddings and the TensorBoard scalars and projector
    (`scored`: roc, metrics, threshold, far, intervals; `thumb(row)`: image `row`'s face for the pictures)."""
    roc, metrics, threshold, far, intervals = scored
    write_json(out / "metrics.json", report)
    roc_fig = None
    if opts.plots or opts.tensorboard:
        figures = make_figures(roc, metrics, threshold, far, intervals)
        roc_fig = figures["roc.png"]
        if opts.plots:
            for name, fig in figures.items():
                write_atomic(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png"), WRITE_TODO)
    if opts.plots:
        grid = error_grid(report["worst_pairs"], thumb)
        write_atomic(out / ERRORS_FILE, lambda tmp: grid.save(tmp, format="PNG"), WRITE_TODO)
    if opts.save_embeddings:
        from safetensors.torch import save_file

        tensors = {"embeddings": emb.contiguous()}
        if plan.labels is not None:
            tensors["labels"] = torch.as_tensor(plan.labels)
        write_atomic(out / "embeddings.safetensors", lambda tmp: save_file(
            tensors, str(tmp), metadata={"files": json.dumps(plan.paths)}), WRITE_TODO)
    if opts.tensorboard:
        # up to PROJECTOR_MAX thumbnails: raw photos are shown as they are, not detected and aligned once more
        sprite_thumb = thumb if embedder.alignment is None else file_thumb(plan.paths, None)
        projector = Projector.build(emb, [Path(p).parent.name for p in plan.paths], plan.paths, sprite_thumb)
        log_tensorboard(opts.tensorboard, report, roc_fig, int(embedder.meta.get("step") or 0), projector)


def _calibrate(model_path: Path, report: dict, out: Path, calibration: dict, meta: dict) -> None:
    """The threshold into the model's metadata, with the model card that records this evaluation (`meta`: the
    model's metadata as loaded). Refused (a read-only model): metrics.json says so, and one line says where the
    figures are."""
    cal = report["calibration"]
    fields = {"threshold": cal["threshold"], "threshold_far": cal["far"], "threshold_calibration": calibration}
    card = build_card({**meta, **fields}, evaluation_entry(report, calibration["date"]))
    try:
        update_model_meta(model_path, **fields, **{CARD_KEY: card})
    except UserError as err:
        cal.update(written_to_bundle=False, note=f"threshold NOT written: {err}")
        write_json(out / "metrics.json", report)
        print_report(report)
        raise UserError(f"{err}; the evaluation's figures were written to {out / 'metrics.json'}, the threshold "
                        f"{cal['threshold']:.6f} (FAR {cal['far']:.0e}) was not: make the model writable and run "
                        "again, or pass --no-calibrate") from None
    cal["written_to_bundle"] = True
    write_json(out / "metrics.json", report)
