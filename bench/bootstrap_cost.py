"""Cost of the bootstrap confidence intervals next to the all-pairs scoring they accompany.

    python bench/bootstrap_cost.py                        # 10^4 images (histogram ROC) and the exact-mode limit
    python bench/bootstrap_cost.py --sizes 10000 --no-write
    python bench/bootstrap_cost.py --device cuda          # the same on a GPU

For each size, in this process: random L2-normalised 512-d embeddings (seed 0), 10 images per identity in random
order, then exactly what `facetrain.eval` runs on rank 0:

* scoring: `scoring.all_pairs_roc` (auto mode: exact up to 2*10^7 pairs, else the streamed 2**16-bin histogram)
  plus `metrics.verification_metrics` with the calibration FAR 1e-3;
* bootstrap: the threshold grid, one more pass of blocked products counting every pair per resampling unit
  (`scoring.all_pairs_unit_counts`; identities dealt into bootstrap.MAX_UNITS groups when there are more), and
  `bootstrap.bootstrap_intervals` with --replicates replicates (the default 1000).

Reported: seconds for each, the bootstrap's split (counting pass / replicates) and its ratio to the scoring time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_md import command_line, machine, publish  # noqa: E402  (bench/ is on sys.path)

from facetrain.config.constants import DEFAULT_TARGET_FARS  # noqa: E402
from facetrain.evaluation import bootstrap as bs  # noqa: E402
from facetrain.evaluation.metrics import count_pairs, verification_metrics  # noqa: E402
from facetrain.evaluation.scoring import all_pairs_roc, all_pairs_unit_counts  # noqa: E402

SECTION = "Bootstrap confidence intervals: cost next to scoring"
EXACT_LIMIT_IMAGES = 6324  # 6324 * 6323 / 2 = 19.99M pairs: the largest set scored exactly by default
PER_ID, DIM = 10, 512


def _embeddings(n: int, device: str) -> tuple[torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, DIM, generator=gen), dim=1).to(device)
    labels = np.random.default_rng(0).permutation(np.arange(n) // PER_ID)
    return emb, labels


def measure(n: int, replicates: int, device: str) -> dict:
    emb, labels = _embeddings(n, device)
    t0 = time.perf_counter()
    roc = all_pairs_roc(emb, labels)
    metrics = verification_metrics(roc, target_far=1e-3)
    score_s = time.perf_counter() - t0
    threshold = metrics["threshold_at_target_far"]

    t0 = time.perf_counter()
    fars = list(DEFAULT_TARGET_FARS)
    grid = bs.threshold_grid(roc, [metrics[f"threshold@far={f:.0e}"] for f in fars] + [threshold])
    units, n_units = bs.identity_units(labels, seed=0)
    accumulator = bs.UnitPairAccumulator(n_units, grid)
    all_pairs_unit_counts(emb, labels, units, accumulator)
    counts = accumulator.unit_counts(int(labels.max()) + 1)
    count_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    intervals = bs.bootstrap_intervals(counts, metrics, fars, threshold, replicates, bs.DEFAULT_LEVEL, 0)
    replicate_s = time.perf_counter() - t0
    g, i = count_pairs(labels)
    return {"images": n, "pairs": g + i, "mode": roc.mode, "identities": int(labels.max()) + 1, "units": n_units,
            "grid": len(grid), "replicates": replicates, "score_s": score_s, "count_s": count_s,
            "replicate_s": replicate_s, "ratio": (count_s + replicate_s) / score_s,
            "tar_1e-3": metrics["tar@far=1e-03"], "tar_1e-3_interval": intervals.as_dict()["tar_at_far"]["1e-03"]}


def table(rows: list[dict]) -> str:
    head = ("| images | pairs | ROC | identities / units | scoring s | bootstrap s (counting pass + replicates) "
            "| bootstrap / scoring |\n|---:|---:|---|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['images']:,} | {r['pairs'] / 1e6:.1f}M | {r['mode']} | {r['identities']:,} / {r['units']} | "
        f"{r['score_s']:.1f} | {r['count_s'] + r['replicate_s']:.1f} ({r['count_s']:.1f} + {r['replicate_s']:.1f}) "
        f"| {r['ratio']:.2f} |\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[10_000, EXACT_LIMIT_IMAGES])
    p.add_argument("--replicates", type=int, default=bs.DEFAULT_REPLICATES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="also write the raw figures here")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = []
    for n in args.sizes:
        rows.append(measure(n, args.replicates, args.device))
        print(rows[-1], flush=True)
    text = (f"- date: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC)\n- machine: {machine()}; device "
            f"{args.device}; load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}\n"
            f"- command: `{command_line('bench/bootstrap_cost.py', argv)}`\n"
            f"- data: random 512-d embeddings, {PER_ID} images per identity; {args.replicates} replicates, 95% "
            f"intervals; grid of {rows[0]['grid']} thresholds\n\n{table(rows)}")
    publish(SECTION, text, {"rows": rows}, args.json, args.write)


if __name__ == "__main__":
    main()
