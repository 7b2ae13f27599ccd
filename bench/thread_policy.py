"""How idle OpenMP threads should wait: each training variant in its own process, as a user runs it.

    python bench/thread_policy.py                        # raw, facetrain, article x 3 policies x idle/loaded
    python bench/thread_policy.py --variants raw,facetrain --policies passive,spin --loads 0 --rounds 1
    python bench/thread_policy.py --smoke                # tiny network, 32 px: checks the code paths

bench/train_throughput.py runs its variants inside one process, so they all inherit one OpenMP setting and its
ratios compare the loops. This benchmark asks the other question, which setting facetrain's commands should
use by default (facetrain/runtime/threads.py): every (variant, policy, load) is a fresh `bench/train_throughput.py
--variants V` process started with that policy in its environment, timed for --steps after --warmup steps, so
the policy reaches the OpenMP runtime exactly as it does for `accelerate launch -m facetrain.train`.

Policies: `passive` (OMP_WAIT_POLICY=PASSIVE: sleep at once), `active` (OMP_WAIT_POLICY=ACTIVE: spin),
`spin` (GOMP_SPINCOUNT=--spincount, a bounded spin before sleeping), `gomp_default` (GOMP_SPINCOUNT=300000,
GNU OpenMP's own default when nothing is set). Loads: how many extra busy processes (one core each, like
another job on the machine) run during the measurement. Rounds alternate the policies, so that a drift of the
machine's speed shows as spread instead of as a difference. Writes a section of bench/RESULTS.md unless
--no-write or --smoke.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from results_md import machine, write_section  # noqa: E402

POLICIES = {
    "passive": lambda spin: {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": lambda spin: {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin": lambda spin: {"GOMP_SPINCOUNT": str(spin)},
    "gomp_default": lambda spin: {"GOMP_SPINCOUNT": "300000"},
}
MODES = {"raw": "bf16_cl", "facetrain": "bf16_cl", "article": "fp32"}  # as each is run: the article is fp32


def hogs(n: int) -> list[subprocess.Popen]:
    """`n` busy processes (another user's job on the machine), stopped by the caller."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_variant(variant: str, policy: dict, args, tmp: Path) -> float:
    """img/s of one fresh process running `variant` under `policy`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(policy)
    out = tmp / f"{variant}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--variants", variant,
           "--modes", MODES[variant], "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", "1",
           "--no-write", "--json", str(out)] + (["--smoke"] if args.smoke else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    job = json.loads(out.read_text())["jobs"][0]
    return float(job["median"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="raw,facetrain,article")
    p.add_argument("--policies", default="passive,active,spin")
    p.add_argument("--spincount", type=int, default=10_000, help="GOMP_SPINCOUNT of the `spin` policy")
    p.add_argument("--loads", default="0,1", help="extra busy processes during the measurement, comma list")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--section", default="OpenMP wait policy, one process per variant")
    p.add_argument("--no-write", dest="write", action="store_false")
    args = p.parse_args(argv)
    variants, policies = args.variants.split(","), args.policies.split(",")
    loads = [int(x) for x in args.loads.split(",")]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="thread_policy_") as tmp:
        for load in loads:
            busy = hogs(load)
            try:
                for r in range(args.rounds):
                    order = policies if r % 2 == 0 else policies[::-1]
                    for policy in order:
                        for variant in variants:
                            ips = run_variant(variant, POLICIES[policy](args.spincount), args, Path(tmp))
                            results.setdefault((load, policy, variant), []).append(ips)
                            print(f"load {load} round {r} {policy:>12} {variant:>9}: {ips:.2f} img/s", flush=True)
            finally:
                for h in busy:
                    h.kill()
    lines = [f"Date: {started} UTC  ", f"Machine: {machine()}  ",
             f"Command: `python bench/thread_policy.py {shlex.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Each cell: img/s of a fresh process (median over {args.rounds} rounds, range in brackets); "
             f"`spin` = GOMP_SPINCOUNT={args.spincount}. Load = extra busy processes.", "",
             "| load | policy | " + " | ".join(variants) + " | facetrain / raw | facetrain / article |",
             "|---|---|" + "---:|" * (len(variants) + 2)]
    for load in loads:
        for policy in policies:
            med = {v: statistics.median(results[(load, policy, v)]) for v in variants}
            cells = [f"{med[v]:.2f} ({min(results[(load, policy, v)]):.2f}-{max(results[(load, policy, v)]):.2f})"
                     for v in variants]
            ratio = [f"{med['facetrain'] / med[b]:.2f}" if "facetrain" in med and b in med else "" for b in
                     ("raw", "article")]
            lines.append(f"| {load} | {policy} | " + " | ".join(cells) + f" | {ratio[0]} | {ratio[1]} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.write and not args.smoke:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
