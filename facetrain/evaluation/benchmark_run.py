"""`facetrain.eval --benchmarks DIR`: the five-set table papers report (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

Each set DIR holds (`benchmarks.find_benchmarks`) is read safely (`benchmarks.read_bin`, before the model loads,
so a bad file stops the run at once), its images embedded as the aligned crops they are (the bundle's
preprocessing, no alignment), the pairs scored by cosine similarity and reported as insightface reports them:
10-fold accuracy mean ± std (`metrics.kfold_accuracy`, each fold's threshold from the other nine) plus AUC, EER
and TAR@FAR over all pairs. Nothing is calibrated: these sets are not the deployment population.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from facetrain.config.constants import DEFAULT_TARGET_FARS
from facetrain.errors import UserError
from facetrain.evaluation.benchmarks import Benchmark, find_benchmarks, read_bin, standard_folds
from facetrain.evaluation.embedding import load_embedder
from facetrain.evaluation.metrics import kfold_accuracy, roc_exact, verification_metrics
from facetrain.evaluation.options import EvalOptions
from facetrain.evaluation.report import default_output_dir, write_json
from facetrain.evaluation.scoring import pair_scores
from facetrain.model.files import resolve_model_path

#: the TAR columns of the table: the FARs a standard set resolves (3,000 impostor pairs; 1e-4 would need 10,000);
#: metrics.json has every FAR point.
TABLE_FARS: tuple[float, ...] = tuple(f for f in DEFAULT_TARGET_FARS if 1e-3 <= f <= 1e-2)


def score_benchmark(bench: Benchmark, emb) -> dict:
    """10-fold accuracy and the all-pairs figures of one set from its embeddings (rows in file order)."""
    scores = pair_scores(emb[0::2], emb[1::2])
    figures = verification_metrics(roc_exact(scores, bench.issame))
    kfold = kfold_accuracy(scores, bench.issame, standard_folds(bench.n_pairs))
    return {"file": str(bench.path), "n_pairs": bench.n_pairs, "n_genuine": int(bench.issame.sum()),
            "kfold": kfold, "metrics": figures}


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
    if any(s["metrics"][f"tar@far={f:.0e}"] is None for s in report["sets"].values() for f in TABLE_FARS):
        console.print("n/a: a set with fewer than 1/FAR impostor pairs cannot resolve that FAR")
    console.print(f"wrote {report['output']}/metrics.json (every FAR point, fold accuracies and thresholds)")


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
        try:
            emb = embedder.embed(bench.images, align=False)
        except UserError as err:  # an undecodable image: say which set holds it
            raise UserError(f"{bench.path}: {err}") from None
        if embedder.is_main:
            results[bench.name] = score_benchmark(bench, emb)
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
