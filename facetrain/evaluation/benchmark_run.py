"""`facetrain.eval --benchmarks DIR`: the five-set table papers report (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

Each set DIR holds (`benchmarks.find_benchmarks`) is read safely (`benchmarks.read_bin`, before the model loads,
so a bad file stops the run at once), its images embedded as the aligned crops they are (the bundle's
preprocessing, no alignment), the pairs scored by cosine similarity and reported as insightface reports them:
10-fold accuracy mean ± std (`metrics.kfold_accuracy`, each fold's threshold from the other nine) plus AUC, EER
and TAR@FAR over all pairs. Nothing is calibrated: these sets are not the deployment population. An image that
does not decode is a failure to acquire (`fta`): its pairs are scored by `--fta` as in the other protocols, and
each set's `failures_to_acquire` says which.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.evaluation.benchmarks import Benchmark, find_benchmarks, read_bin, standard_folds
from facetrain.evaluation.embedding import load_embedder
from facetrain.evaluation.fta import REPORT_KEY, section, stop_if_asked, summary_line, undecodable_images
from facetrain.evaluation.metrics import kfold_accuracy, roc_exact, verification_metrics, with_rejected_pairs
from facetrain.evaluation.options import EvalOptions
from facetrain.evaluation.report import default_output_dir, write_json
from facetrain.evaluation.scoring import pair_scores
from facetrain.model.files import resolve_model_path

#: the TAR columns of the table: the FARs a standard set resolves (3,000 impostor pairs; 1e-4 would need 10,000);
#: metrics.json has every FAR point.
TABLE_FARS: tuple[float, ...] = tuple(f for f in DEFAULT_TARGET_FARS if 1e-3 <= f <= 1e-2)


def score_benchmark(bench: Benchmark, emb, failures: list[dict] | None = None, policy: str = "nonmatch") -> dict:
    """10-fold accuracy and the all-pairs figures of one set from its embeddings (rows in file order; the rows of
    `failures`, images that did not decode, are not read: their pairs are scored by `policy`)."""
    failed = np.zeros(len(bench.images), dtype=bool)
    failed[[r["index"] for r in failures or []]] = True
    rejected = failed[0::2] | failed[1::2]
    scores, issame, folds = pair_scores(emb[0::2], emb[1::2]), bench.issame, standard_folds(bench.n_pairs)
    ok = ~rejected
    roc = roc_exact(scores[ok], issame[ok])
    n_genuine, n_impostor = int(issame[rejected].sum()), int((~issame[rejected]).sum())
    if policy == "nonmatch":
        figures = verification_metrics(with_rejected_pairs(roc, n_genuine, n_impostor))
        kfold = kfold_accuracy(scores, issame, folds, rejected)
    else:
        figures = verification_metrics(roc)
        kfold = kfold_accuracy(scores[ok], issame[ok], folds[ok])
    return {"file": str(bench.path), "n_pairs": bench.n_pairs, "n_genuine": int(bench.issame.sum()),
            "kfold": kfold, "metrics": figures,
            REPORT_KEY: section(policy, len(bench.images), failures or [], n_genuine, n_impostor)}


def print_benchmarks(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if Console().is_terminal else 120)
    table = Table(title=f"facetrain.eval --benchmarks: {report['model']}", title_justify="left")
    for column in ("set", "pairs", "10-fold accuracy", "AUC", "EER", *(f"TAR@FAR={f:.0e}" for f in TABLE_FARS)):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, s in report["sets"].items():
        m, k = s["metrics"], s["kfold"]
        tars = [m[f"tar@far={f:.0e}"] for f in TABLE_FARS]
        table.add_row(name, f"{s['n_pairs']:,}", f"{k['accuracy_mean']:.4f} ± {k['accuracy_std']:.4f}",
                      f"{m['auc']:.4f}", f"{m['eer']:.4f}", *("n/a" if t is None else f"{t:.4f}" for t in tars))
    console.print(table)
    for name, s in report["sets"].items():
        line = summary_line(s.get(REPORT_KEY))
        if line:
            console.print(f"{name}: {line}", soft_wrap=True, markup=False)
    if any(s["metrics"][f"tar@far={f:.0e}"] is None for s in report["sets"].values() for f in TABLE_FARS):
        console.print("n/a: a set with fewer than 1/FAR impostor pairs cannot resolve that FAR")
    console.print(f"wrote {report['output']}/metrics.json (every FAR point, fold accuracies and thresholds)")


def _embed_acquired(embedder, images: list[bytes], failures: list[dict]):
    """Embeddings of every image of a set, in order; the rows of `failures` stay zero (never scored)."""
    import torch

    failed = {r["index"] for r in failures}
    rows = [i for i in range(len(images)) if i not in failed]
    emb = embedder.embed([images[i] for i in rows], align=False)
    if len(rows) == len(images):
        return emb
    full = torch.zeros((len(images), emb.shape[1]), dtype=emb.dtype)
    full[torch.as_tensor(rows, dtype=torch.long)] = emb
    return full


def run_benchmarks(opts: EvalOptions) -> dict | None:
    """Evaluate the model on every standard set in `opts.benchmarks`; the report on rank 0 (None elsewhere)."""
    started = time.perf_counter()
    model_path = resolve_model_path(opts.model, opts.backend)
    sets = [read_bin(path, name) for name, path in find_benchmarks(opts.benchmarks).items()]
    flip = opts.flip if opts.backend == "torch" else (opts.flip or None)
    # the crops are aligned 112x112 already: never run a bundle's alignment recipe on them
    embedder = load_embedder(opts.backend, model_path, opts.batch_size, opts.num_workers, flip,
                             opts.mixed_precision, opts.fold_batchnorm, aligned=True,
                             input_spec=opts.input_spec)
    results = {}
    for bench in sets:  # every rank embeds its share of each set; rank 0 scores
        failures = undecodable_images(bench.images, bench.path.name)  # failures to acquire, before embedding
        stop_if_asked(opts.fta, failures)
        emb = _embed_acquired(embedder, bench.images, failures)
        if embedder.is_main:
            results[bench.name] = score_benchmark(bench, emb, failures, opts.fta)
    if not embedder.is_main:
        return None
    out = Path(opts.output) if opts.output else default_output_dir(model_path, opts.benchmarks)
    out.mkdir(parents=True, exist_ok=True)
    report = {"protocol": "benchmarks", "model": str(model_path), "model_step": embedder.meta.get("step"),
              "benchmarks": str(opts.benchmarks), "flip": embedder.flip, "mixed_precision": embedder.precision,
              "num_processes": embedder.num_processes, "sets": results, "output": str(out),
              "calibration": {"written_to_bundle": False, "note": "benchmarks never calibrate the threshold"},
              "timing_s": {"total": round(time.perf_counter() - started, 3)}}
    write_json(out / "metrics.json", report)
    write_json(out / "args.json", {**dataclasses.asdict(opts), "command": [sys.executable, "-m", "facetrain.eval",
                                                                         *opts.argv]})
    print_benchmarks(report)
    return report
