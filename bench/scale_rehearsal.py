"""Scale rehearsal: does anything in the pipeline grow with the number of identities?

    python bench/scale_rehearsal.py                          # all parts, ~12 min on a 2-core CPU
    python bench/scale_rehearsal.py --parts sampler scoring  # the quick parts only (~1 min)
    python bench/scale_rehearsal.py --repeats 3 --json /tmp/scale.json

Parts (docs/scale.md reports their figures):

* ``sampler``: MPerClassBatchSampler construction and one epoch's ``plan()`` for 100 / 2000 / 20000
  identities x 50 images (no images are read): CPU seconds and microseconds per drawn image, and a check
  that every identity is drawn in the epoch.
* ``scoring``: ``scoring.all_pairs_roc`` + ``verification_metrics`` on random unit embeddings shaped like the
  held-out sets (rehearsal 100-id and 2000-id runs, and the 200 x 50 x 512-d set of configs/scale_2000.yaml),
  each in a fresh process: the mode it picks (exact / histogram), seconds, and that process's peak RSS in
  all and above its baseline (torch and the inputs loaded).
* ``train``: the full pipeline on the built-in synthetic generator with 100 and with 2000 identities (10
  images each, 20 % of identities held out), and a control with 20000 identities and only 20 held out (the
  100 run's validation set size), 2 CPU processes over gloo:
  ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1
  --main_process_port <free> -m facetrain.train ...`` with timm's ``test_efficientnet`` at 32 px. Runs are
  interleaved (100, 2000, 20000, 100, ...) because the machine is shared and its load drifts; the table gives
  medians. Per run: start-up time (launch to the trainer's summary line), training img/s (the trainer's own
  ``step N: loss L, X img/s`` lines, first window dropped as warm-up), wall time of the untrained and the
  final validation (from the arrival times of the trainer's log lines), and per rank the peak RSS (VmHWM)
  and the largest RSS seen while training (VmRSS), polled from /proc every 0.2 s, and CPU ms per step (the
  ranks' /proc CPU time read as each step line arrives; barely affected by other load). Linux only.
* ``loader``: the input pipeline of configs/scale_2000.yaml on one core (what one DataLoader worker does):
  decode a 250 x 250 JPEG face crop (LFW's size; synthetic faces saved as JPEG) and apply the 224-px training
  augmentation, or the evaluation transform. img/s per core tells how many workers a GPU needs.
* ``recipe``: configs/scale_2000.yaml's own model (tf_efficientnetv2_b0, 224 px, batch 64, bf16 when the
  CPU supports it) for a few steps in one process on synthetic images: CPU img/s for the wall-time
  projection in docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The rehearsal runs, by name: (identities, images per identity, held-out identities). 100 and 2000 hold out
# 20 % (2000: 400 x 10 = 4000 validation images -> ~8M pairs). The 20000-identity control holds out only 20,
# like the 100 run, so its training can be compared without a large validation in front of it.
TRAIN_CASES = {"100": (100, 10, 20), "2000": (2000, 10, 400), "20000 (control)": (20000, 10, 20)}
# Tiny model, small images, fp32: the point is what scales with identities, not the network's cost.
TRAIN_ARGS = [
    "--data.source", "synthetic", "--data.image_size", "32",
    "--model.backbone", "test_efficientnet", "--model.embedding_dim", "32", "--model.channels_last", "false",
    "--train.batch_size", "32", "--train.m", "4", "--train.num_workers", "0", "--train.progress", "false",
    "--train.mixed_precision", "no", "--train.tensorboard", "false", "--train.ckpt_every", "100000",
]
STEP_LINE = re.compile(r"^step (\d+): loss (\S+), (\d+) img/s")
SAMPLER_IDS = (100, 2000, 20000)
PARTS = ("sampler", "scoring", "train", "loader", "recipe")
SAMPLER_IMAGES_PER_ID = 50
# (name, identities, images per identity, embedding dim)
SCORING_CASES = [("rehearsal 100 ids: 20 x 10", 20, 10, 32), ("rehearsal 2000 ids: 400 x 10", 400, 10, 32),
                 ("scale_2000.yaml: 200 x 50", 200, 50, 512)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": model, "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version(), "load_at_start": loadavg()}


# ----------------------------------------------------------------------------------------------- sampler


def bench_sampler(repeats: int) -> list[dict]:
    from facetrain.data.sampler import MPerClassBatchSampler

    times: dict[int, list[tuple[float, float]]] = {n: [] for n in SAMPLER_IDS}
    info: dict[int, dict] = {}
    for _ in range(repeats):  # interleaved, like the training runs
        for n in SAMPLER_IDS:
            labels = np.repeat(np.arange(n), SAMPLER_IMAGES_PER_ID)
            # CPU time of this (single-threaded) process: what the work costs, whatever else the machine runs
            t0 = time.process_time()
            # the rehearsal's layout: 2 processes x P 8 x m 4 (plan() is global, identical on every rank)
            s = MPerClassBatchSampler(labels, 4, 32, num_replicas=2, rank=0, seed=0)
            t1 = time.process_time()
            s.set_epoch(0)
            plan, _ = s.plan()
            t2 = time.process_time()
            times[n].append((t1 - t0, t2 - t1))
            drawn = np.unique(labels[plan.reshape(-1)])
            info[n] = {"steps_per_epoch": s.steps_per_epoch, "drawn_images": int(plan.size),
                       "all_identities_drawn": bool(len(drawn) == n)}
    rows = []
    for n in SAMPLER_IDS:
        init = statistics.median(t for t, _ in times[n])
        plan_s = statistics.median(t for _, t in times[n])
        rows.append({"identities": n, "images": n * SAMPLER_IMAGES_PER_ID, **info[n], "init_s": init,
                     "plan_s": plan_s, "plan_us_per_image": 1e6 * plan_s / info[n]["drawn_images"]})
    return rows


# ----------------------------------------------------------------------------------------------- scoring


def _score_once(ids: int, per_id: int, dim: int, queue) -> None:
    import resource

    import torch

    from facetrain.evaluation.metrics import verification_metrics
    from facetrain.evaluation.scoring import all_pairs_roc

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(ids).repeat_interleave(per_id)
    # identity centres plus noise: a realistic mix of genuine/impostor scores, not all ties
    emb = torch.randn(ids, dim, generator=gen)[labels] + 0.8 * torch.randn(ids * per_id, dim, generator=gen)
    before = _mem_kib(os.getpid()).get("VmHWM", 0) / 1024  # torch + inputs: the baseline, not scoring
    t0 = time.perf_counter()
    metrics = verification_metrics(all_pairs_roc(emb, labels))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"mode": metrics["mode"], "pairs": metrics["n_genuine"] + metrics["n_impostor"], "seconds": seconds,
               "peak_rss_mib": peak, "scoring_rss_mib": peak - before, "auc": metrics["auc"]})


def bench_scoring() -> list[dict]:
    ctx = mp.get_context("spawn")  # a fresh process per case, so its peak RSS is that case's alone
    rows = []
    for name, ids, per_id, dim in SCORING_CASES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_score_once, args=(ids, per_id, dim, queue))
        proc.start()
        result = queue.get(timeout=900)  # raises queue.Empty instead of hanging if the child died
        proc.join()
        rows.append({"case": name, "images": ids * per_id, "dim": dim, **result})
    return rows


# ------------------------------------------------------------------------------------------------- train


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # field 4; the command name may contain spaces
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def _rank_pids(root: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers below the launcher (they carry RANK in their environment)."""
    kids = _children()
    out, todo = {}, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0])] = pid  # not below it: its DataLoader workers inherit RANK
        else:
            todo.extend(kids.get(pid, []))
    return out


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (its /proc/<pid>/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mem_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def launch(cmd: list[str], env: dict, poll_ranks: bool) -> tuple[list[tuple[float, str]], list, list, float]:
    """Run `cmd`, timestamping each output line on arrival (seconds since launch). With `poll_ranks`, also
    sample each rank's VmHWM/VmRSS every 0.2 s and read each rank's CPU time when a `step N:` line arrives.
    Returns (lines, memory samples, step CPU times, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines: list[tuple[float, str]] = []
    pids: dict[int, int] = {}  # rank -> pid, kept current by the polling loop
    step_cpu: list[tuple[int, dict[int, float]]] = []  # (step, {rank: CPU seconds}) when a step line arrives

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            step = STEP_LINE.match(line)
            if step and pids:  # read at once: the trainer printed this line a few ms ago
                step_cpu.append((int(step.group(1)), {r: _cpu_seconds(pid) for r, pid in pids.items()}))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[tuple[float, int, dict]] = []  # (time, rank, {VmHWM, VmRSS})
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if poll_ranks and len(pids) < 2:
            pids.update(_rank_pids(proc.pid))
        for rank, pid in pids.items():
            mem = _mem_kib(pid)
            if mem:
                samples.append((now, rank, mem))
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-20:])
        raise SystemExit(f"{' '.join(cmd[:8])} ... failed (exit {proc.returncode}):\n{tail}")
    return lines, samples, step_cpu, time.perf_counter() - t0


def run_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def train_once(case: str, steps: int, log_every: int, workdir: Path) -> dict:
    ids, per_id, val_ids = TRAIN_CASES[case]
    out_dir = Path(tempfile.mkdtemp(prefix=f"ids{ids}_", dir=workdir))
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "-m", "facetrain.train", *TRAIN_ARGS,
           "--data.synthetic_identities", str(ids), "--data.synthetic_images_per_identity", str(per_id),
           "--data.val_identities", str(val_ids), "--train.max_steps", str(steps),
           "--train.log_every", str(log_every), "--train.output_dir", str(out_dir),
           # validate only at the end (and the untrained baseline): the 100-id run's epoch is 13 steps, and
           # per-epoch validation would make the two runs do different amounts of work
           "--train.val_every", str(steps)]
    load_before = loadavg()
    lines, samples, step_cpu, wall = launch(cmd, run_env(ACCELERATE_USE_CPU="1"), poll_ranks=True)

    def when(prefix: str) -> float:
        return next(t for t, line in lines if line.startswith(prefix))

    step_lines = [(t, STEP_LINE.match(line)) for t, line in lines if STEP_LINE.match(line)]
    ips = [int(m.group(3)) for _, m in step_lines][1:]  # the first window includes warm-up
    first_step_t, last_step_t = step_lines[0][0], step_lines[-1][0]
    ranks = sorted({r for _, r, _ in samples})
    return {
        "identities": ids, "val_images": val_ids * per_id, "load_before": load_before, "load_after": loadavg(),
        "wall_s": wall, "startup_s": when("facetrain:"),
        "untrained_val_s": when("untrained model:") - when("facetrain:"),
        "final_val_s": when(f"step {steps}: val auc") - last_step_t,
        "img_per_s": statistics.median(ips),
        # CPU ms per optimizer step on each rank, from the second logged step on (the first window is warm-up):
        # unlike img/s this barely moves when other processes compete for the cores
        "cpu_ms_per_step": {r: 1e3 * (step_cpu[-1][1][r] - step_cpu[1][1][r]) / (step_cpu[-1][0] - step_cpu[1][0])
                            for r in ranks},
        "peak_rss_mib": {r: max(s.get("VmHWM", 0) for _, q, s in samples if q == r) / 1024 for r in ranks},
        "train_rss_mib": {r: max((s.get("VmRSS", 0) for t, q, s in samples
                                  if q == r and first_step_t <= t <= last_step_t), default=0) / 1024
                          for r in ranks},
        "val_auc": float(re.search(r"val auc (\S+)", next(line for _, line in lines
                                                          if line.startswith(f"step {steps}: val auc"))).group(1)),
    }


def bench_train(repeats: int, steps: int, log_every: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {n: [] for n in TRAIN_CASES}
    with tempfile.TemporaryDirectory(prefix="scale_rehearsal_") as tmp:
        for k in range(repeats):
            for n in TRAIN_CASES:  # interleaved: 100, 2000, 20000, 100, 2000, 20000, ...
                run = train_once(n, steps, log_every, Path(tmp))
                cpu = "/".join(f"{v:.0f}" for v in run["cpu_ms_per_step"].values())
                print(f"  train run {k + 1}/{repeats}, {n} identities: {run['img_per_s']:.0f} img/s, "
                      f"CPU {cpu} ms/step, final validation {run['final_val_s']:.1f} s, load {run['load_before']}",
                      flush=True)
                runs[n].append(run)
    return runs


def summarise_train(runs: dict[str, list[dict]]) -> list[dict]:
    def med(values):
        return statistics.median(values)

    rows = []
    for n, rs in runs.items():
        ranks = sorted(rs[0]["peak_rss_mib"])
        rows.append({
            "identities": n, "runs": len(rs), "val_images": rs[0]["val_images"],
            "startup_s": med(r["startup_s"] for r in rs), "img_per_s": med(r["img_per_s"] for r in rs),
            "cpu_ms_per_step": {k: med(r["cpu_ms_per_step"][k] for r in rs) for k in ranks},
            "untrained_val_s": med(r["untrained_val_s"] for r in rs), "final_val_s": med(r["final_val_s"] for r in rs),
            "wall_s": med(r["wall_s"] for r in rs),
            "train_rss_mib": {k: med(r["train_rss_mib"][k] for r in rs) for k in ranks},
            "peak_rss_mib": {k: med(r["peak_rss_mib"][k] for r in rs) for k in ranks},
            "loads": [r["load_before"] for r in rs],
        })
    return rows


# ------------------------------------------------------------------------------------------------ loader


def bench_loader(images: int, workdir: Path) -> dict:
    """Per-core input-pipeline rate at 224 px: JPEG decode + the recipe's augmentation (train) or resize
    (eval) to uint8 tensors (normalisation runs on the device), in this process with one torch thread, as in
    a DataLoader worker."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from facetrain.config.load import load_config
    from facetrain.data import synthetic
    from facetrain.data.dataset import FaceDataset
    from facetrain.data.faceset import folder_faceset
    from facetrain.data.images import Preprocess
    from facetrain.data.transforms import eval_transform, train_transform

    cfg = load_config(str(REPO / "configs/scale_2000.yaml"), ["--data.root", str(workdir)])
    root = workdir / "jpeg_faces"
    for k in range(images):  # 250 x 250 JPEGs, quality 90: the size and format of LFW-style crops
        folder = root / f"id{k % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        synthetic.render(0, k % 10, k).resize((250, 250)).save(folder / f"{k:04d}.jpg", quality=90)
    faceset = folder_faceset(str(root))
    # the normalisation constants do not change the cost; timm's defaults avoid building the model here
    pre = Preprocess(cfg.data.image_size, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"images": images, "image_size": cfg.data.image_size}
    try:
        for name, transform in (("train", train_transform(pre, cfg.data.augment)), ("eval", eval_transform(pre))):
            ds = FaceDataset(faceset, np.arange(len(faceset)), faceset.labels, transform)
            ds[(0, 0)]  # warm-up: imports, first allocations
            t0, c0 = time.perf_counter(), time.process_time()
            for k in range(len(ds)):
                ds[(k, k)]
            # CPU time is the per-core cost whatever else runs on the machine; wall time is what we got here
            out[f"{name}_img_per_s_per_core"] = len(ds) / (time.process_time() - c0)
            out[f"{name}_img_per_s_wall"] = len(ds) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------------------------ recipe


def bench_recipe(steps: int, workdir: Path) -> dict:
    """The scale recipe's model and input size on this CPU: one process, synthetic images, a few steps."""
    out_dir = workdir / "recipe"
    cmd = [sys.executable, "-m", "facetrain.train", "--config", "configs/scale_2000.yaml",
           "--data.source", "synthetic", "--data.synthetic_identities", "40",
           "--data.synthetic_images_per_identity", "16", "--data.val_identities", "4",
           "--model.pretrained", "false",  # same cost as the ImageNet weights, and needs no download
           "--train.mixed_precision", "auto",  # bf16 where this CPU runs it faster at 224 px, else fp32
           "--train.max_steps", str(steps), "--train.log_every", "1", "--train.val_every", "0",
           "--train.tensorboard", "false", "--train.num_workers", "1", "--train.output_dir", str(out_dir)]
    lines, _, _, _ = launch(cmd, run_env(), poll_ranks=False)
    # img/s from the arrival times of consecutive step lines (the trainer rounds its own figure to whole
    # img/s, too coarse at ~1 img/s); the first step is warm-up and is not counted
    steps_at = [(t, int(m.group(1))) for t, m in ((t, STEP_LINE.match(line)) for t, line in lines) if m]
    (t_first, s_first), (t_last, s_last) = steps_at[0], steps_at[-1]
    precision = re.search(r"(\w+) precision", "\n".join(line for _, line in lines)).group(1)
    return {"img_per_s": (s_last - s_first) * 64 / (t_last - t_first), "precision": precision, "batch_size": 64,
            "image_size": 224, "steps_timed": s_last - s_first, "load_after": loadavg()}


# ------------------------------------------------------------------------------------------------- report


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    m = result["machine"]
    console.print(f"{m['date']}  {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load at start "
                  f"{m['load_at_start']}, at end {result.get('load_at_end')}")
    if "sampler" in result:
        t = Table(title=f"sampler: 2 ranks x P 8 x m 4, {SAMPLER_IMAGES_PER_ID} images per identity; CPU time, median")
        for col in ("identities", "images", "steps/epoch", "init s", "plan s", "plan us/image", "all ids drawn"):
            t.add_column(col, justify="right")
        for r in result["sampler"]:
            t.add_row(str(r["identities"]), str(r["images"]), str(r["steps_per_epoch"]), f"{r['init_s']:.3f}",
                      f"{r['plan_s']:.3f}", f"{r['plan_us_per_image']:.2f}", str(r["all_identities_drawn"]))
        console.print(t)
    if "scoring" in result:
        t = Table(title="validation scoring: all_pairs_roc + verification_metrics, one process")
        for col in ("held-out set", "images", "dim", "pairs", "mode", "seconds", "peak RSS MiB", "of which scoring"):
            t.add_column(col, justify="right")
        for r in result["scoring"]:
            t.add_row(r["case"], str(r["images"]), str(r["dim"]), f"{r['pairs']:,}", r["mode"], f"{r['seconds']:.2f}",
                      f"{r['peak_rss_mib']:.0f}", f"{r['scoring_rss_mib']:.0f}")
        console.print(t)
    if "train" in result:
        t = Table(title="training rehearsal: 2 CPU ranks, test_efficientnet, 32 px, global batch 64 = 16 ids x 4; "
                        "medians")
        for col in ("identities", "runs", "val images", "start-up s", "train img/s", "CPU ms/step r0/r1",
                    "untrained val s", "final val s", "train RSS MiB r0/r1", "peak RSS MiB r0/r1", "wall s"):
            t.add_column(col, justify="right")
        for r in result["train"]:
            rss = "/".join(f"{v:.0f}" for v in r["train_rss_mib"].values())
            peak = "/".join(f"{v:.0f}" for v in r["peak_rss_mib"].values())
            cpu = "/".join(f"{v:.0f}" for v in r["cpu_ms_per_step"].values())
            t.add_row(str(r["identities"]), str(r["runs"]), str(r["val_images"]), f"{r['startup_s']:.1f}",
                      f"{r['img_per_s']:.0f}", cpu, f"{r['untrained_val_s']:.1f}", f"{r['final_val_s']:.1f}", rss, peak,
                      f"{r['wall_s']:.0f}")
        console.print(t)
    if "loader" in result:
        r = result["loader"]
        console.print(f"input pipeline, per core of CPU time (wall-clock here), {r['image_size']} px from 250 x 250 "
                      f"JPEGs: training augmentation {r['train_img_per_s_per_core']:.0f} img/s "
                      f"({r['train_img_per_s_wall']:.0f}), evaluation transform {r['eval_img_per_s_per_core']:.0f} "
                      f"img/s ({r['eval_img_per_s_wall']:.0f})")
    if "recipe" in result:
        r = result["recipe"]
        console.print(f"recipe model on this CPU (1 process, tf_efficientnetv2_b0, {r['image_size']} px, batch "
                      f"{r['batch_size']}, {r['precision']}): {r['img_per_s']:.2f} img/s over {r['steps_timed']} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per identity count (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per training run (default 40)")
    parser.add_argument("--log-every", type=int, default=10, help="trainer log interval, steps (default 10)")
    parser.add_argument("--loader-images", type=int, default=200, help="JPEGs timed by the loader part")
    parser.add_argument("--recipe-steps", type=int, default=4, help="steps of the recipe-model run (default 4)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.steps < 3 * args.log_every:  # the first window is warm-up; a rate needs two more log lines
        parser.error(f"--steps ({args.steps}) must be at least 3 x --log-every ({args.log_every})")

    result: dict = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    if "sampler" in args.parts:
        print("sampler ...", flush=True)
        result["sampler"] = bench_sampler(max(3, args.repeats))
    if "scoring" in args.parts:
        print("scoring ...", flush=True)
        result["scoring"] = bench_scoring()
    if "train" in args.parts:
        print("training runs ...", flush=True)
        runs = bench_train(args.repeats, args.steps, args.log_every)
        result["train_runs"] = runs
        result["train"] = summarise_train(runs)
    if "loader" in args.parts:
        print("input pipeline ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="scale_loader_") as tmp:
            result["loader"] = bench_loader(args.loader_images, Path(tmp))
    if "recipe" in args.parts:
        print("recipe model ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="scale_recipe_") as tmp:
            result["recipe"] = bench_recipe(args.recipe_steps, Path(tmp))
    result["load_at_end"] = loadavg()
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
