"""Shared helpers for the test-suite: tiny run settings, real subprocess launches, face-data location."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FACES = SHARED / "data" / "faces"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
NO_SHARED_REASON = f"shared face data not found at {FACES} (only present inside the facetrain workplace)"

# A run small enough for a 2-core CPU: 24 synthetic people, 32 px, timm's tiny test network, fp32.
TINY = {
    "data": {"source": "synthetic", "synthetic_identities": 24, "synthetic_images_per_identity": 8,
             "image_size": 32, "val_identities": 6},
    "model": {"backbone": "test_efficientnet", "embedding_dim": 32, "channels_last": False},
    "optim": {"lr": 3e-3},
    "train": {"batch_size": 16, "m": 4, "max_steps": 6, "val_every": 3, "ckpt_every": 3,
              "num_workers": 0, "progress": False, "mixed_precision": "no", "tensorboard": False},
}


# Exactness settings: no augmentation, no dropout, fp32, and plain SGD so that any error in the gradient scale
# would change the weights (Adam would hide a constant factor). The backbone is the test's choice: GroupNorm
# (per-sample statistics) or BatchNorm with model.sync_bn.
EXACT = {"data": {"augment": {"enabled": False}},
         "model": {"backbone": "test_efficientnet_gn"},
         "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "scheduler": "constant", "weight_decay": 0.0},
         "train": {"max_steps": 4, "val_every": 4, "ckpt_every": 4, "log_every": 1, "tensorboard": True},
         "debug": {"record_samples": True}}


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """TensorBoard scalars `tag` of a run, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in (Path(run_dir) / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def train_one_and_many(cfg: Path, tmp_path: Path, global_batch: int, procs: int) -> tuple[Path, Path]:
    """Train `cfg` (with debug.record_samples) on 1 process and on `procs` real processes with the same global
    batch; check that the ranks drew disjoint images and together exactly the 1-process batches, every step.
    Returns the two run directories."""
    return train_one_and_many_runs({"run": cfg}, tmp_path, global_batch, procs)["run"]


def train_one_and_many_runs(cfgs: dict[str, Path | tuple[Path, Path]], tmp_path: Path, global_batch: int,
                            procs: int) -> dict[str, tuple[Path, Path]]:
    """train_one_and_many for several configs (by name): the 1-process runs in this process, the `procs`-process
    runs one after the other in ONE launch (tests/scripts/train_configs.py: the ranks start and import once).
    A config may be a pair (1-process config, multi-process config), for settings counted per process other
    than the batch size. Returns (1-process run, multi-process run) by name."""
    runs = {name: (Path(tmp_path) / name / "one", Path(tmp_path) / name / f"procs{procs}") for name in cfgs}
    script_args = []
    for name, cfg in cfgs.items():
        one, many = runs[name]
        cfg_one, cfg_many = cfg if isinstance(cfg, tuple) else (cfg, cfg)
        run_train(["--config", cfg_one, "--train.output_dir", one, "--train.batch_size", str(global_batch)])
        script_args += [cfg_many, many, str(global_batch // procs)]
    script = str(REPO / "tests" / "scripts" / "train_configs.py")
    proc = subprocess.run(launch_cmd("unused", procs)[:-2] + [script, *map(str, script_args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300 + 300 * len(cfgs),
                          env=subprocess_env(ACCELERATE_USE_CPU="1"))
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    assert proc.stdout.count(f"{procs} process(es)") == len(cfgs), proc.stdout[-4000:]
    for one, many in runs.values():
        assert_same_samples(one, many, procs)
    return runs


def assert_same_samples(one: Path, many: Path, procs: int) -> None:
    """The ranks of `many` drew disjoint images and together exactly the batches of `one`, every step."""
    def samples(run: Path, rank: int) -> list[list[int]]:
        lines = (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(line)["positions"] for line in lines]

    single, ranks = samples(one, 0), [samples(many, r) for r in range(procs)]
    assert single and all(len(r) == len(single) for r in ranks)
    for step, want in enumerate(single):
        parts = [r[step] for r in ranks]
        assert len(set().union(*parts)) == sum(len(p) for p in parts)  # disjoint
        assert sum(parts, []) == want, step


def assert_same_logged_loss(one: Path, many: Path, steps: int, tag: str = "train/loss") -> None:
    """The loss TensorBoard logged at every step (`tag`: the total or one of its terms) is the same for the
    1-process and the multi-process run: the global-batch loss, not world_size times it."""
    import pytest

    l1, ln = tb_scalars(one, tag), tb_scalars(many, tag)
    assert sorted(l1) == sorted(ln) == list(range(1, steps + 1))
    for step in l1:
        assert ln[step] == pytest.approx(l1[step], rel=1e-4, abs=1e-6), step


def deep_merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_train_config(tmp_path: Path, extra: dict | None = None, name: str = "tiny.yaml") -> Path:
    """Write the tiny config (plus `extra`, nested like the YAML) to tmp_path and return its path."""
    path = Path(tmp_path) / name
    path.write_text(yaml.safe_dump(deep_merge(TINY, extra or {})))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    env.update(extra)
    return env


def launch_cmd(module: str, procs: int) -> list[str]:
    """`python -m module` for 1 process, real multi-process DDP over gloo on the CPU otherwise."""
    if procs == 1:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--main_process_port", str(free_port()), "-m", module]


def run_module(module: str, args: list[str], procs: int = 1, timeout: float = 600, check: bool = True,
               env: dict | None = None, subprocess_only: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m module args`: in this process when it can (one process, no environment of its own), as
    a real process (or `procs` DDP processes) otherwise. `subprocess_only`: the test is about the process."""
    if procs == 1 and not env and not subprocess_only:
        proc = run_in_process(module, args)
    else:
        extra = {"ACCELERATE_USE_CPU": "1"} if procs > 1 else {}
        proc = subprocess.run(launch_cmd(module, procs) + [str(a) for a in args], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, env=subprocess_env(**extra, **(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\nSTDOUT\n{proc.stdout[-4000:]}\n"
                             f"STDERR\n{proc.stderr[-6000:]}")
    return proc


def _reset_accelerate() -> None:
    """accelerate keeps its state in process-wide singletons: each in-process command starts from none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m module args` without a new interpreter (each one costs 3-6 s of imports on a 2-core CPU): the
    command's `main` under `cli.run_cli`, with stdout/stderr captured, the exit code from its SystemExit, and
    the working directory, environment, signal handlers and RNG state it may change put back afterwards."""
    import contextlib
    import importlib
    import io
    import signal
    import traceback

    import torch

    from facetrain.cli import run_cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, rng = dict(os.environ), os.getcwd(), torch.get_rng_state()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        os.chdir(REPO)
        _reset_accelerate()
        main = importlib.import_module(module).main
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(main, argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:  # what an uncaught error does to a real process: traceback, exit code 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_rng_state(rng)
        _reset_accelerate()
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code, out.getvalue(), err.getvalue())


def run_train(args: list[str], procs: int = 1, **kw) -> subprocess.CompletedProcess:
    return run_module("facetrain.train", args, procs=procs, **kw)


def random_bundle(directory: Path, backbone: str, embedding_dim: int, image_size: int) -> Path:
    """A bundle of a timm model with seeded random weights (seed 0), written into `directory` (created): a model
    file in a fraction of a second, for tests that need one but not a trained one."""
    from facetrain.model.bundle import write_random_bundle

    return write_random_bundle(directory, backbone, embedding_dim, image_size, channels_last=False)


def load_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


# Formats facetrain refuses, by the name its message gives -> the first bytes of such a file (tests/test_images.py,
# tests/test_serve_inputs.py)
REFUSED_SIGNATURES = {
    "HEIC/HEIF": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
    "AVIF": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
    "PDF": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    "SVG/XML": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
}


def fake_ghostscript(directory: Path, monkeypatch) -> Path:
    """Put a `gs` first on PATH that logs its arguments to the returned file (Pillow's EPS plugin renders with
    Ghostscript): a test asserts the log never appears."""
    from PIL import EpsImagePlugin

    bin_dir, log = Path(directory) / "bin", Path(directory) / "gs_called.log"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where it found gs
    return log


@contextmanager
def running_service(args: list[str], log: Path, start_timeout_s: float):
    """`python -m facetrain.serve ARGS` in its own process (a real socket, real uvicorn), its output in `log`;
    yields (proc, url) once GET /health answers 200, and stops it afterwards."""
    import httpx

    port = next(a for k, a in zip(args, args[1:], strict=False) if k == "--port")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "facetrain.serve", *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, env=subprocess_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"facetrain.serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"facetrain.serve not up after {start_timeout_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------------------
# A tiny teacher for distillation tests (facetrain/training/distill.py's `Teacher`), from a small JSON file


class TinyTeacher:
    """A frozen, randomly initialised conv net standing in for a face model: RGB [0, 1] images (N, 3, H, W) of
    any size in (resized to its own `size`), L2-normalised float32 (N, dim) out; its weights follow from `seed`."""

    def __init__(self, seed: int = 0, dim: int = 16, size: int = 24):
        import torch
        from torch import nn

        self.dim, self.size, self.image_size = dim, size, size
        self.path, self.notes = Path(f"tiny-teacher-{seed}"), []  # what describe() reports of a teacher
        with torch.random.fork_rng(devices=[]):  # the run's own random streams stay untouched
            torch.manual_seed(seed)
            # a smooth function of the image (a random linear map of its 6 x 6 thumbnail, standardised): learnable
            # in a few dozen steps, and spread out (mean cosine to the embeddings' mean well below 1, so that a
            # constant direction does not pass for agreement)
            self.net = nn.Sequential(nn.AdaptiveAvgPool2d(6), nn.Flatten(), nn.Linear(108, dim, bias=False)).eval()
        self.net.requires_grad_(False)
        self.calls = 0

    def embed(self, images):
        import torch.nn.functional as F

        self.calls += 1
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True).clamp(min=1e-3)
        return F.normalize(self.net(x), dim=1)


def write_faces(folder: Path, count: int, size: int = 40) -> list[Path]:
    """`count` small noise PNGs under folder/a and folder/a/b (nested, as a user's folder of unlabelled faces may
    be), seeded."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (Path(folder) / "a" / "b").mkdir(parents=True, exist_ok=True)
    paths = [Path(folder) / ("a/b" if k % 2 else "a") / f"face_{k}.png" for k in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


def tiny_teacher_file(directory: Path, seed: int = 0, dim: int = 16) -> Path:
    """The file distill.teacher names for a TinyTeacher (read by the builder `use_tiny_teachers` installs)."""
    path = Path(directory) / f"tiny_teacher_{seed}_{dim}.json"
    path.write_text(json.dumps({"seed": seed, "dim": dim}))
    return path


def use_tiny_teachers(monkeypatch=None) -> None:
    """Make training build a TinyTeacher from the JSON file of distill.teacher (tiny_teacher_file) instead of
    loading a face model (facetrain/deploy/teacher.py): on `monkeypatch`, or for good in a test script."""
    from facetrain.training import distill

    def build(cfg, device="cpu"):
        return TinyTeacher(**json.loads(Path(cfg.teacher).read_text()))

    if monkeypatch is not None:
        monkeypatch.setattr(distill, "build_teacher", build)
    else:
        distill.build_teacher = build


def assert_same_checkpoint(a: Path, b: Path, step: int) -> None:
    """Two runs' checkpoints at `step` hold the same weights and distillation projection (exact resume: to 1e-6)."""
    import torch

    name = f"step_{step:08d}"
    sa, sb = (torch.load(Path(d) / "checkpoints" / name / "train_state.pt", weights_only=True) for d in (a, b))
    torch.testing.assert_close(sb["distill"], sa["distill"], rtol=0, atol=1e-6)
    wa, wb = (load_weights(Path(d) / "checkpoints" / name) for d in (a, b))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6, msg=key)


@contextmanager
def in_process_trainer(config: Path, run_dir: Path):
    """A `Trainer` of `config` writing to `run_dir`, its data set up (the caller builds the rest: `setup()` or
    one part), in this process; accelerate's process-wide state is reset before and after."""
    from accelerate.state import AcceleratorState

    from facetrain.config.load import load_config
    from facetrain.training.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps a process-wide singleton
    trainer = Trainer(load_config(str(config), ["--train.output_dir", str(run_dir)]))
    try:
        trainer.out.mkdir(parents=True)
        trainer.setup_data()
        yield trainer
    finally:
        trainer.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
