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
and figure -> the bundle gains the threshold for the target FAR (`--no-calibrate` leaves it untouched).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from facetrain.alignment.recipe import incomplete_alignment
from facetrain.errors import UserError
from facetrain.evaluation.embedding import load_embedder
from facetrain.evaluation.figures import make_figures
from facetrain.evaluation.metrics import far_needed, verification_metrics
from facetrain.evaluation.options import EvalOptions
from facetrain.evaluation.protocols import PROTOCOLS, calibration_far, preflight_plan
from facetrain.evaluation.report import (
    WRITE_TODO,
    alignment_summary,
    default_output_dir,
    log_tensorboard,
    print_report,
    write_json,
)
from facetrain.model.files import META_FILE, is_onnx_file, resolve_model_path, update_bundle_meta
from facetrain.runtime.atomic_dir import write_atomic


def update_model_meta(path: Path, **fields) -> None:
    """Calibration fields into a bundle's metadata, or into an exported ONNX file's (same keys)."""
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
    plan, skipped = preflight_plan(protocol, plan, opts)
    if opts.target_far is not None and plan.n_impostor < far_needed(opts.target_far):
        raise UserError(f"--target-far {opts.target_far:g}: needs >= {far_needed(opts.target_far):,} impostor "
                        f"pairs to be resolvable, {plan.describe} gives {plan.n_impostor:,}: choose a larger FAR "
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
    if embedder.last_failures:
        plan, emb = protocol.without(plan, emb, {r["index"] for r in embedder.last_failures})

    t0 = time.perf_counter()
    roc, extra = protocol.score(emb, plan, opts)
    far, far_source = calibration_far(opts.target_far, roc.n_impostor)
    metrics = verification_metrics(roc, target_far=far)
    score_s = time.perf_counter() - t0
    threshold = metrics.get("threshold_at_target_far")

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
        **extra,
        "calibration": {"far": far, "far_source": far_source, "threshold": threshold,
                        "tar": metrics.get("tar_at_target_far"),
                        "written_to_bundle": bool(opts.calibrate and threshold is not None
                                                  and not embedder.meta.get("third_party")), "note": note},
        "timing_s": {"embed": round(embed_s, 3), "score": round(score_s, 3)},
        "output": str(out),
        "plots": opts.plots,
        "skipped_images": skipped,  # refused by the pre-flight check under --bad-images skip
    }

    report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
    # the results first, then the model's metadata: a model that cannot take the threshold loses nothing else;
    # until it took it, metrics.json says it did not (a kill in between leaves no false claim)
    calibrate, report["calibration"]["written_to_bundle"] = report["calibration"]["written_to_bundle"], False
    _write_results(out, report, opts, (roc, metrics, threshold, far), emb, plan, embedder)
    if calibrate:
        _calibrate(model_path, report, out, {
            "far_source": far_source, "tar": metrics.get("tar_at_target_far"), "protocol": protocol.name,
            "data": str(Path(opts.data).resolve()), "n_impostor": roc.n_impostor, "n_genuine": roc.n_genuine,
            "flip": embedder.flip, "eval_dir": str(out.resolve()), "date": datetime.now().isoformat(timespec="seconds"),
        })
    print_report(report)
    return report


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


def _write_results(out: Path, report: dict, opts: EvalOptions, scored: tuple, emb, plan, embedder) -> None:
    """metrics.json, then the plots, the embeddings and the TensorBoard scalars (`scored`: roc, metrics,
    threshold, far)."""
    roc, metrics, threshold, far = scored
    write_json(out / "metrics.json", report)
    roc_fig = None
    if opts.plots or opts.tensorboard:
        figures = make_figures(roc, metrics, threshold, far)
        roc_fig = figures["roc.png"]
        if opts.plots:
            for name, fig in figures.items():
                write_atomic(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png"), WRITE_TODO)
    if opts.save_embeddings:
        from safetensors.torch import save_file

        tensors = {"embeddings": emb.contiguous()}
        if plan.labels is not None:
            tensors["labels"] = torch.as_tensor(plan.labels)
        write_atomic(out / "embeddings.safetensors", lambda tmp: save_file(
            tensors, str(tmp), metadata={"files": json.dumps(plan.paths)}), WRITE_TODO)
    if opts.tensorboard:
        log_tensorboard(opts.tensorboard, report, roc_fig, int(embedder.meta.get("step") or 0))


def _calibrate(model_path: Path, report: dict, out: Path, calibration: dict) -> None:
    """The threshold into the model's metadata. Refused (a read-only model): metrics.json says so, and one
    line says where the figures are."""
    cal = report["calibration"]
    try:
        update_model_meta(model_path, threshold=cal["threshold"], threshold_far=cal["far"],
                          threshold_calibration=calibration)
    except UserError as err:
        cal.update(written_to_bundle=False, note=f"threshold NOT written: {err}")
        write_json(out / "metrics.json", report)
        print_report(report)
        raise UserError(f"{err}; the evaluation's figures were written to {out / 'metrics.json'}, the threshold "
                        f"{cal['threshold']:.6f} (FAR {cal['far']:.0e}) was not: make the model writable and run "
                        "again, or pass --no-calibrate") from None
    cal["written_to_bundle"] = True
    write_json(out / "metrics.json", report)
