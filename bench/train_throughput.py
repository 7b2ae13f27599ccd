"""Training throughput: the raw model step vs facetrain's full training step vs the reference article's loop.

    python bench/train_throughput.py                    # att_faces, 224 px, batch 32: ~10-15 min on an idle 2-core CPU
    python bench/train_throughput.py --steps 6 --rounds 6   # the runs in bench/RESULTS.md (~15-20 min)
    OMP_NUM_THREADS=1 python bench/train_throughput.py --variants raw --modes fp32_cl,bf16_cl \\
        --image-sizes 64,96,128,160,192,224 --steps 3 --warmup 1 \\
        --section "Training throughput: bf16 vs fp32 by image size"                  # where bf16 starts to pay
    python bench/train_throughput.py --smoke            # timm's tiny test network at 32 px: every path, seconds

Variants (same backbone, image size, batch and data; random weights; batch = batch/4 identities x 4 images):

* ``raw``: facetrain's model (timm backbone + 512-d head, L2-normalised) forward, triplet loss, backward, AdamW
  step (fused, as facetrain's optim.fused default), on one pre-made batch of random tensors already on the
  device. No data, no logging: the ceiling.
* ``raw_guard``: ``raw`` with the optimizer step taken through facetrain's non-finite-step guard
  (facetrain/training/guard.py: the gradient-norm pass and the skip decision handed to the fused AdamW kernel, no host
  sync). On a GPU it shows what the guard costs.
* ``facetrain``: ``facetrain.training.trainer.train()`` itself on the image folder, configs/article.yaml plus overrides:
  file decode, augmentation, the P x m sampler, DataLoader workers, loss, the guard, optimizer, scheduler,
  TensorBoard + console logging every step (10x more often than the default). The figure is the trainer's own
  img/s (``summary["throughput"]``, one window per logged step), warm-up windows dropped, the other variants'
  time taken out (see below). Its DataLoader workers may finish the batch they are on while another variant
  starts (about 25 ms of one core per batch of 32 here): the other variant's untimed warm-up steps absorb it.
* ``article``: the reference article's loop, rewritten as the article has it: torchvision ImageFolder with its
  transforms (Resize((224, 224)), RandomHorizontalFlip, RandomRotation(15), RandomResizedCrop(224, scale 0.8-1),
  ColorJitter(0.2, 0.2, 0.2, 0.1), ToTensor, Normalize(ImageNet)), pytorch-metric-learning's MPerClassSampler
  (m=4), a DataLoader without workers, timm tf_efficientnetv2_b0 (num_classes=0) + Linear(1280, 512),
  TripletMarginLoss(margin 0.1, CosineSimilarity), AdamW 1e-4, single process, fp32, NCHW, loss.item() per
  step. Only run in fp32: that is the article.
* ``facetrain_w0``: ``facetrain`` with train.num_workers 0 (images loaded in the training process), to check
  that the default worker count (--workers -1: data.default_num_workers) is the better choice here.

Modes (``--modes``): fp32 (NCHW), fp32_cl (channels_last), bf16_cl (bf16 autocast + channels_last: facetrain's
default on this CPU at 224 px), bf16 (NCHW).

The machine is shared and its speed drifts by 10-20% within minutes, so every figure is a ratio of variants
measured side by side in one process, round by round (`measure`). Each facetrain variant hosts a session: one
facetrain.training.trainer.train() run that, at the log point that starts each round, runs the other variants of its
size, batch and mode (and the article's loop), and takes that time out of its own windows. In a round every
variant, facetrain included, runs ``--warmup`` untimed steps (after another model ran) and then ``--steps``
timed ones, seconds apart from the others; a ratio is the median of the per-round ratios (their range is
printed next to it). Variants without a facetrain host run in turn, round after round. The load average
before and after is recorded. Writes its section of bench/RESULTS.md (``--section``) unless --no-write or
--smoke.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
# As facetrain's commands do before torch loads (facetrain/runtime/threads.py): every variant in this process runs under
# the same OpenMP setting, so these ratios compare the loops, not the setting; bench/thread_policy.py runs each
# variant in its own process under each setting, as a user runs them.
from facetrain.runtime import threads  # noqa: E402

os.environ.update(threads.wait_policy())
# A training run uses one input shape; this process interleaves several models, sizes and layouts, whose oneDNN
# kernels would overflow the default cache of 1024 and be rebuilt every round.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch  # noqa: E402
from results_md import RESULTS, machine, write_section  # noqa: E402

ATT_FACES = REPO.parent / "shared" / "data" / "faces" / "att_faces"
M = 4  # images per identity in a batch (the article's m)


@dataclass(frozen=True)
class Mode:
    precision: str  # facetrain's train.mixed_precision: "no" or "bf16"
    channels_last: bool


MODES = {
    "fp32": Mode("no", False),
    "fp32_cl": Mode("no", True),
    "bf16_cl": Mode("bf16", True),
    "bf16": Mode("bf16", False),
}

VARIANTS = ("raw", "raw_guard", "facetrain", "facetrain_w0", "article")

# Full-size defaults and the --smoke ones (timm's tiny test network: exercises every code path in seconds).
DEFAULTS = dict(backbone="tf_efficientnetv2_b0", embedding_dim=512, image_sizes="224", batch_sizes="32",
                steps=10, warmup=2, rounds=3)
SMOKE = dict(backbone="test_efficientnet", embedding_dim=32, image_sizes="32", batch_sizes="16",
             steps=2, warmup=1, rounds=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, mode: Mode):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.precision == "bf16")


# --------------------------------------------------------------------------------------------------------------
# Variants: each has run(warmup, steps) -> (images, seconds) over the timed steps only.


class _TimedSteps:
    """`run`: warm-up steps, then `steps` timed steps (device synchronised around them) -> (images, seconds)."""

    def run(self, warmup: int, steps: int) -> tuple[int, float]:
        for _ in range(warmup):
            self.step()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return self.batch * steps, time.perf_counter() - start


class RawStep(_TimedSteps):
    """facetrain's model and loss on a fixed tensor batch: forward, backward, AdamW (+ the guard if `guard`)."""

    def __init__(self, args, size: int, batch: int, mode: Mode, device: torch.device, guard: bool = False):
        from facetrain.config.schema import LossConfig, ModelConfig
        from facetrain.model.network import create_model
        from facetrain.training.guard import NonFiniteGuard
        from facetrain.training.losses import MetricLoss

        torch.manual_seed(0)
        self.mode, self.device, self.guard, self.batch = mode, device, guard, batch
        self.model = create_model(ModelConfig(backbone=args.backbone, embedding_dim=args.embedding_dim,
                                              pretrained=False, channels_last=mode.channels_last)).to(device)
        self.model.train()
        self.loss_fn = MetricLoss(LossConfig(), num_classes=batch // M, embedding_dim=args.embedding_dim).to(device)
        self.params = list(self.model.parameters())
        # the optimizer facetrain's default config builds (optim.fused): the ratio then measures the pipeline
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-5, eps=1e-8, fused=True)
        images = torch.randn(batch, 3, size, size, device=device)
        self.images = images.contiguous(memory_format=torch.channels_last) if mode.channels_last else images
        self.labels = torch.arange(batch // M, device=device).repeat_interleave(M)
        # facetrain's own guard (facetrain/training/guard.py), on a stand-in for the Accelerator it reads
        stand_in = SimpleNamespace(scaler=None, device=device)
        self.checker = NonFiniteGuard(self.optimizer, self.model, self.params, stand_in, 0.0, 1, print) if guard \
            else None
        self.index = 0

    def step(self) -> None:
        with autocast(self.device, self.mode):
            loss = self.loss_fn(self.model(self.images), self.labels)
        loss.backward()
        if self.checker is not None:
            self.checker.step(loss.detach(), self.index)  # on-device skip decision (fused AdamW): no host sync
            self.index += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)



class FacetrainStep:
    """facetrain.training.trainer.train() as the host of a measurement session (see `measure`).

    One train() run of warmup + rounds x (warmup + steps) optimizer steps, logging every step. After the first
    warm-up steps and then at the end of every round, at the log point (the trainer's public `on_log` hook),
    `between(round)` runs the other variants; the trainer leaves the hook's time out of its img/s windows. Each
    round then has `warmup` untimed facetrain steps (caches and allocator re-warm after the other
    models ran, as the other variants' own warm-up steps do) and `steps` timed ones. Returns facetrain's
    (images, seconds) per round."""

    def __init__(self, args, size: int, batch: int, mode: Mode, device: torch.device, workdir: Path,
                 workers: int):
        self.args, self.size, self.batch, self.mode, self.workdir = args, size, batch, mode, workdir
        self.device, self.workers, self.count = device, workers, 0

    def overrides(self, steps: int, out: Path) -> list[str]:
        a = self.args
        data = ["--data.source", "folder", "--data.root", str(a.data)]
        if a.data == "synthetic":  # rendered on the fly: 64 images per identity, enough identities for 32
            ids = 2 * (self.batch // M) + 8  # steps per epoch at any batch size (epoch starts cost a refill)
            data = ["--data.source", "synthetic", "--data.synthetic_identities", str(ids),
                    "--data.synthetic_images_per_identity", "64"]
        return data + [
            "--data.image_size", str(self.size),
            "--data.val_identities", "4",  # keeps the untrained / final validation (outside the timing) short
            "--model.backbone", a.backbone, "--model.embedding_dim", str(a.embedding_dim),
            "--model.pretrained", "false", "--model.channels_last", str(self.mode.channels_last).lower(),
            "--train.mixed_precision", self.mode.precision,
            "--train.batch_size", str(self.batch), "--train.m", str(M),
            "--train.max_steps", str(steps), "--train.val_every", str(steps), "--train.ckpt_every", str(steps),
            "--train.log_every", "1", "--train.num_workers", str(self.workers),
            "--train.progress", "false", "--train.tensorboard", "true", "--train.output_dir", str(out),
        ]

    def run_session(self, warmup: int, steps: int, rounds: int, between) -> list[tuple[int, float]]:
        from accelerate.state import AcceleratorState

        from facetrain.config.load import load_config
        from facetrain.training.trainer import train

        self.count += 1
        name = f"{self.size}_{self.batch}_{self.mode.precision}_w{self.workers}_{self.count}"
        out = self.workdir / f"facetrain_{name}"
        period = warmup + steps  # a round: warm-up steps after the other variants ran, then the timed ones
        total = warmup + rounds * period
        cfg = load_config(str(REPO / "configs" / "article.yaml"), self.overrides(total, out))
        # One Accelerator per run with this run's precision: accelerate keeps its state in a process-wide
        # singleton that refuses a second, different mixed_precision otherwise.
        AcceleratorState._reset_state(reset_partial_state=True)
        def others(step: int) -> None:  # the trainer's on_log hook: its time is not in facetrain's windows
            if warmup <= step < total and (step - warmup) % period == 0:
                synchronize(self.device)  # facetrain's queued work stays in its own time
                between((step - warmup) // period)

        log_file = out.with_suffix(".log")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as fh, contextlib.redirect_stdout(fh):
            summary = train(cfg, on_log=others)
        windows = {w[0]: (w[1], w[2]) for w in summary["throughput"]}
        if sorted(windows) != list(range(1, total + 1)):
            raise RuntimeError(f"facetrain logged windows {sorted(windows)}, expected 1..{total}; see {log_file}")
        shutil.rmtree(out, ignore_errors=True)
        per_round = []
        for r in range(rounds):
            first = warmup + r * period + warmup + 1  # after the round's warm-up steps
            ws = [windows[first + k] for k in range(steps)]
            per_round.append((sum(w[0] for w in ws), sum(w[1] for w in ws)))
        return per_round


class ArticleLoop(_TimedSteps):
    """The reference article's training loop (see the module docstring), iterator kept across rounds."""

    def __init__(self, args, size: int, batch: int, device: torch.device):
        import timm
        import torchvision
        from pytorch_metric_learning import distances, losses, samplers
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from torchvision import transforms as T

        if args.data == "synthetic":
            raise SystemExit("--variants article needs an image folder (--data DIR), not --data synthetic")
        torch.manual_seed(0)
        transform = T.Compose([
            T.Resize((size, size)),
            T.RandomHorizontalFlip(),
            T.RandomRotation(15),
            T.RandomResizedCrop(size, scale=(0.8, 1.0)),
            T.ColorJitter(0.2, 0.2, 0.2, 0.1),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])
        dataset = torchvision.datasets.ImageFolder(str(args.data), transform=transform)
        sampler = samplers.MPerClassSampler(dataset.targets, m=M, batch_size=batch, length_before_new_iter=100_000)
        self.batches = iter(torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=0))
        backbone = timm.create_model(args.backbone, pretrained=False, num_classes=0)
        self.model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, args.embedding_dim))
        self.model.to(device).train()
        self.loss_fn = losses.TripletMarginLoss(margin=0.1, distance=distances.CosineSimilarity())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-5, eps=1e-8)
        self.device, self.batch, self.running_loss = device, batch, 0.0

    def step(self) -> None:
        images, labels = next(self.batches)
        images, labels = images.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(images), labels)
        loss.backward()
        self.optimizer.step()
        self.running_loss += loss.item()



# --------------------------------------------------------------------------------------------------------------
# Measurement


FACETRAIN = ("facetrain", "facetrain_w0")


@dataclass
class Job:
    variant: str
    mode: str  # a MODES key
    size: int
    batch: int
    runner: object = None
    samples: dict = None  # session -> img/s per round
    peak_gib: float | None = None

    @property
    def ips(self) -> list[float]:
        return [v for values in self.samples.values() for v in values]


def build_jobs(args, device: torch.device, workdir: Path) -> list[Job]:
    jobs = []
    for size in args.image_sizes:
        for batch in args.batch_sizes:
            for variant in args.variants:
                for mode in (["fp32"] if variant == "article" else args.modes):
                    jobs.append(Job(variant, mode, size, batch, samples={}))
    for job in jobs:  # construct lazily in run order would mix set-up into timing; build everything first
        m = MODES[job.mode]
        if job.variant in ("raw", "raw_guard"):
            job.runner = RawStep(args, job.size, job.batch, m, device, guard=job.variant == "raw_guard")
        elif job.variant in FACETRAIN:
            workers = 0 if job.variant == "facetrain_w0" else args.workers
            job.runner = FacetrainStep(args, job.size, job.batch, m, device, workdir, workers)
        else:
            job.runner = ArticleLoop(args, job.size, job.batch, device)
    return jobs


def sessions(jobs: list[Job]) -> list[tuple[Job | None, list[Job]]]:
    """(host, guests): each facetrain job hosts the other variants at its size, batch and mode (the article's
    loop, fp32 only, in every session); variants no facetrain job hosts share one session without a host."""
    hosts = [j for j in jobs if j.variant in FACETRAIN]
    out = [(h, [g for g in jobs if g.variant not in FACETRAIN and (g.size, g.batch) == (h.size, h.batch)
                and (g.mode == h.mode or g.variant == "article")]) for h in hosts]
    hosted = {id(g) for _, guests in out for g in guests}
    rest = [j for j in jobs if j.variant not in FACETRAIN and id(j) not in hosted]
    return out + ([(None, rest)] if rest else [])


def measure(jobs: list[Job], args, device: torch.device) -> None:
    """Every figure is paired: the variants compared are measured in the same session, round by round.

    A session with a facetrain host is one facetrain.training.trainer.train() run; between its rounds of `--steps` steps
    each guest runs `--warmup` untimed and `--steps` timed steps (FacetrainStep.run_session), so all variants see
    the same minutes of a shared machine, facetrain's DataLoader workers stay alive (idle: their prefetch queue
    is full) and facetrain pays its own start-up only once. The guests' order rotates by one each round. A
    session without a host runs its variants in turn, round after round."""
    for s_index, (host, guests) in enumerate(sessions(jobs)):

        def run_guests(r: int, s_index=s_index, guests=guests, host=host) -> None:
            shift = r % len(guests) if guests else 0
            for job in guests[shift:] + guests[:shift]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                images, seconds = job.runner.run(args.warmup, args.steps)
                job.samples.setdefault(s_index, []).append(images / seconds)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
                    job.peak_gib = max(job.peak_gib or 0.0, peak)
                    torch.cuda.reset_peak_memory_stats(device)  # the host's own peak is read at the end
                where = f"session {s_index + 1}, " + (f"host {host.variant} {host.mode}" if host else "no host")
                print(f"round {r + 1}/{args.rounds}  {job.variant:12s} {job.mode:7s} {job.size:4d} px  batch "
                      f"{job.batch:4d}  {images / seconds:8.2f} img/s  ({where}; load {os.getloadavg()[0]:.2f})",
                      file=sys.__stdout__, flush=True)  # inside a host's train(), whose output goes to its log

        if host is None:
            for r in range(args.rounds):
                run_guests(r)
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_round = host.runner.run_session(args.warmup, args.steps, args.rounds, run_guests)
        host.samples[s_index] = [images / seconds for images, seconds in per_round]
        if device.type == "cuda":
            host.peak_gib = max(host.peak_gib or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
        print(f"session {s_index + 1}: {host.variant} {host.mode} {host.size} px batch {host.batch}: "
              + ", ".join(f"{v:.2f}" for v in host.samples[s_index]) + " img/s per round", flush=True)


def paired(num: Job, den: Job) -> list[float]:
    """Per-round ratios num/den over the sessions that measured both."""
    common = [s for s in num.samples if s in den.samples]
    return [a / b for s in common for a, b in zip(num.samples[s], den.samples[s], strict=True)]


def ratio(num: Job, den: Job, jobs: list[Job] = ()) -> tuple[float, float | None, float | None] | None:
    """(median, min, max) of the per-round ratios num/den. If no session measured both (bf16 vs fp32 raw steps:
    each is a guest of its own mode's facetrain run), the ratio goes through a variant measured alongside each
    (the article's loop is in every session): median(num/bridge) / median(den/bridge), without a range. None if
    neither works."""
    per_round = paired(num, den)
    if per_round:
        return statistics.median(per_round), min(per_round), max(per_round)
    for bridge in jobs:
        a, b = paired(num, bridge), paired(den, bridge)
        if a and b and bridge is not num and bridge is not den:
            return statistics.median(a) / statistics.median(b), None, None
    return None


def fmt_ratio(num: Job, den: Job, jobs: list[Job] = ()) -> str:
    r = ratio(num, den, jobs)
    if r is None:
        return "n/a"
    mid, lo, hi = r
    return f"{mid:.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None and lo != hi else "")


def find_job(jobs: list[Job], variant: str, mode: str, size: int, batch: int) -> Job | None:
    return next((j for j in jobs if (j.variant, j.mode, j.size, j.batch) == (variant, mode, size, batch)), None)


def json_ratio(num: Job, den: Job | None, jobs: list[Job]) -> float | None:
    r = ratio(num, den, jobs) if den is not None and den is not num else None
    return None if r is None else r[0]


def report(jobs: list[Job], args, device: torch.device, load: tuple, started: str, elapsed: float) -> str:
    from facetrain.data.dataset import default_num_workers
    from facetrain.runtime.precision import resolve_mixed_precision

    cuda = device.type == "cuda"
    workers = args.workers if args.workers >= 0 else default_num_workers(1)
    lines = [
        f"- date: {started} (UTC), {elapsed / 60:.1f} min",
        f"- machine: {machine()}",
        f"- command: `{' '.join(['python', 'bench/train_throughput.py', *sys.argv[1:]])}`",
        f"- data: {args.data}; backbone {args.backbone} (random weights), {args.embedding_dim}-d; "
        f"{args.rounds} round(s); in each, every variant runs {args.warmup} warm-up + {args.steps} timed steps; "
        f"facetrain DataLoader workers: {workers}",
        "- sessions (paired: the variants of a session alternate round by round in one process): "
        + "; ".join(f"{k + 1}: " + (f"facetrain.train() run, {h.variant} {h.mode}, hosting " if h else "no host, ")
                    + ", ".join(f"{g.variant} {g.mode}" for g in guests)
                    for k, (h, guests) in enumerate(sessions(jobs))),
        f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} (all variants)",
        "- facetrain's `train.mixed_precision: auto` here resolves to: "
        + ", ".join(f"{s} px -> {resolve_mixed_precision('auto', s)}" for s in args.image_sizes),
        "",
        "Ratios: median of the per-round ratios within a session (their range in brackets).",
        "",
        "| px | batch | variant | mode | img/s (median) | per round (by session) | x raw (same mode) "
        "| x article (fp32) |"
        + (" peak GiB |" if cuda else ""),
        "|---:|---:|---|---|---:|---|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for j in jobs:
        raw = find_job(jobs, "raw", j.mode, j.size, j.batch)
        art = find_job(jobs, "article", "fp32", j.size, j.batch)
        row = (f"| {j.size} | {j.batch} | {j.variant} | {j.mode} | {statistics.median(j.ips):.2f} | "
               + "; ".join(f"{k + 1}: " + ", ".join(f"{v:.2f}" for v in vs) for k, vs in j.samples.items())
               + f" | {fmt_ratio(j, raw, jobs) if raw is not None and j is not raw else ''} | "
               f"{fmt_ratio(j, art, jobs) if art is not None and j is not art else ''} |")
        peak = f" {j.peak_gib:.2f} |" if j.peak_gib is not None else " |"
        lines.append(row + (peak if cuda else ""))
    base = args.modes[0]
    others = [(j, find_job(jobs, j.variant, base, j.size, j.batch)) for j in jobs
              if j.variant == "raw" and j.mode != base]
    if any(b is not None for _, b in others):
        lines += ["", f"Raw step speed-up over {base} (same size and batch):", ""]
        lines += [f"- {j.size} px, batch {j.batch}: {j.mode} {fmt_ratio(j, b, jobs)}"
                  for j, b in others if b is not None]
    return "\n".join(lines) + "\n"


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ATT_FACES),
                   help="image folder root/<identity>/<image> (default ../shared/data/faces/att_faces), or "
                        "`synthetic` (facetrain's generator; raw and facetrain variants only)")
    p.add_argument("--variants", type=csv(str), default=["raw", "facetrain", "article"],
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--modes", type=csv(str), default=["fp32", "bf16_cl"], help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--image-sizes", type=csv(int), default=None, help="comma list, px (default 224)")
    p.add_argument("--batch-sizes", type=csv(int), default=None, help="comma list (default 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds; the median is reported (default 3)")
    p.add_argument("--backbone", default=None, help="timm model (default tf_efficientnetv2_b0)")
    p.add_argument("--embedding-dim", type=int, default=None)
    p.add_argument("--workers", type=int, default=-1, help="facetrain's train.num_workers (-1 = its default)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--smoke", action="store_true", help="tiny network, 32 px, 1 round: checks the code paths")
    p.add_argument("--section", default="Training throughput", help="section of bench/RESULTS.md to write")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not update bench/RESULTS.md")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, csv(int)(value) if key in ("image_sizes", "batch_sizes") else value)
    bad = [v for v in args.variants if v not in VARIANTS]
    bad += [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown variant/mode: {', '.join(bad)}")
    if any(b % M or b // M < 2 for b in args.batch_sizes):
        p.error(f"batch sizes must be multiples of {M} with at least 2 identities")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        p.error(f"--data: folder not found: {args.data} (give root/<identity>/<image>, or --data synthetic)")
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":  # facetrain's trainer then picks the CPU too
        os.environ["ACCELERATE_USE_CPU"] = "1"
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        jobs = build_jobs(args, device, Path(tmp))
        measure(jobs, args, device)
    load_after = os.getloadavg()[0]
    text = report(jobs, args, device, (load_before, load_after), started, time.perf_counter() - t0)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine(), "date": started, "args": {k: v for k, v in vars(args).items()},
            "load_before": load_before, "load_after": load_after,
            "jobs": [{"variant": j.variant, "mode": j.mode, "image_size": j.size, "batch": j.batch,
                      "img_per_s": j.ips, "median": statistics.median(j.ips), "peak_gib": j.peak_gib,
                      "x_raw": json_ratio(j, find_job(jobs, "raw", j.mode, j.size, j.batch), jobs),
                      "x_article": json_ratio(j, find_job(jobs, "article", "fp32", j.size, j.batch), jobs)}
                     for j in jobs]}, indent=2))
    if args.write and not args.smoke:
        write_section(args.section, text)
        print(f"wrote section '## {args.section}' of {RESULTS}")


if __name__ == "__main__":
    main()
