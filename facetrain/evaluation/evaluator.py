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

from facetrain.errors import UserError
from facetrain.evaluation.embedding import load_embedder
from facetrain.evaluation.figures import make_figures
from facetrain.evaluation.metrics import far_needed, verification_metrics
from facetrain.evaluation.options import EvalOptions
from facetrain.evaluation.protocols import PROTOCOLS, calibration_far, preflight_plan
from facetrain.evaluation.report import alignment_summary, default_output_dir, log_tensorboard, print_report, write_json
from facetrain.model.files import META_FILE, is_onnx_file, resolve_model_path, update_bundle_meta


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
                             opts.mixed_precision, opts.fold_batchnorm, aligned=opts.aligned)
    align = not embedder.aligned_folder(opts.data, "--data")  # crops of facetrain.align with the bundle's recipe
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
        target = model_path / META_FILE if model_path.is_dir() else model_path
        note = f"wrote threshold {threshold:.6f} (FAR {far:.0e}, {far_source}) to {target}"
    report = {
        "protocol": protocol.name,
        "description": plan.describe,
        "model": str(model_path),
        "model_step": embedder.meta.get("step"),
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
                        "written_to_bundle": bool(opts.calibrate and threshold is not None), "note": note},
        "timing_s": {"embed": round(embed_s, 3), "score": round(score_s, 3)},
        "output": str(out),
        "plots": opts.plots,
        "skipped_images": skipped,  # refused by the pre-flight check under --bad-images skip
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
        update_model_meta(model_path, threshold=threshold, threshold_far=far, threshold_calibration={
            "far_source": far_source, "tar": metrics.get("tar_at_target_far"), "protocol": protocol.name,
            "data": str(Path(opts.data).resolve()), "n_impostor": roc.n_impostor, "n_genuine": roc.n_genuine,
            "flip": embedder.flip, "eval_dir": str(out.resolve()), "date": datetime.now().isoformat(timespec="seconds"),
        })
    report["timing_s"]["total"] = round(time.perf_counter() - started, 3)
    write_json(out / "metrics.json", report)
    write_json(out / "args.json", {**dataclasses.asdict(opts), "command": [sys.executable, "-m", "facetrain.eval",
                                                                         *opts.argv]})
    print_report(report)
    return report
