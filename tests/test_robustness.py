"""Robustness: bad images during training, non-finite steps, kill -9 and a full disk during checkpoints, files
that are not facetrain's, user errors through the real CLI, and one failing rank of two.

Every training run here is `python -m facetrain.train` on the CPU with the tiny settings of tests/helpers.py
(32 px, timm's test network, fp32, no DataLoader workers unless a test needs them): in pytest's process where
the test is not about the process (run_train), a real subprocess for kill -9 and the failing rank.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import FACES, REPO, launch_cmd, load_weights, run_train, subprocess_env, tiny_train_config

from facetrain.config.load import to_dict
from facetrain.config.schema import Config, ModelConfig
from facetrain.data import synthetic
from facetrain.data.images import Preprocess
from facetrain.errors import UserError
from facetrain.model.bundle import load_bundle, write_bundle
from facetrain.model.network import create_model
from facetrain.training import checkpoint as ckpt
from facetrain.training.guard import NonFiniteGuard

DETERMINISTIC = {"data": {"augment": {"enabled": False}}, "train": {"num_workers": 0, "mixed_precision": "no"}}


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's one line: stderr must end with it and hold no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("facetrain: error: "), proc.stderr[-3000:]
    return lines[-1]


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: model weights and the optimizer/loss state (read without unpickling code)."""
    out = {f"model/{k}": v for k, v in load_weights(directory).items()}
    state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)

    def walk(obj, prefix: str) -> None:
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}/{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}/{i}")

    walk(state, "state")
    return out


def assert_all_finite(directory: Path) -> None:
    for name, t in checkpoint_tensors(directory).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{directory.name}: {name} is not finite"


def fake_checkpoint(directory: Path, embedding_dim: int = 8, train_state: object | None = None) -> Path:
    """A complete-looking checkpoint directory of the tiny backbone, with any object as train_state.pt."""
    directory.mkdir(parents=True)
    cfg = Config()
    cfg.model = ModelConfig(backbone="test_efficientnet", embedding_dim=embedding_dim, channels_last=False)
    write_bundle(directory, create_model(cfg.model), cfg.model, Preprocess(32, [0.5] * 3, [0.5] * 3),
                 {"step": 2, "config": to_dict(cfg)})
    torch.save(train_state if train_state is not None else {"state_json": "{}"}, directory / "train_state.pt")
    (directory / ckpt.MARKER).write_text("ok\n")
    return directory


class CodeOnLoad:
    """Unpickling this runs a shell command (creates `marker`): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------------------
# 2. Bad images that slip past the pre-flight (changed on disk later) inside DataLoader workers


def _faces_with_bad_files(root: Path) -> list[str]:
    """Ten identities (real faces when ../shared is present) with one truncated image in each."""
    src = FACES / "att_faces"
    for k in range(10):
        ident = root / f"id{k}"
        if src.is_dir():
            shutil.copytree(src / f"s{k + 1}", ident)
        else:
            ident.mkdir(parents=True)
            for j in range(10):
                synthetic.render(0, k, j, size=64).save(ident / f"{j + 1}.png")
    broken = []
    for ident in sorted(root.iterdir()):
        path = ident / "7.png"
        path.write_bytes(path.read_bytes()[:300])
        broken.append(str(path))
    return broken


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_image_inside_a_dataloader_worker(tmp_path, policy):
    """With the pre-flight off (as if files changed after it ran), a worker meets the truncated files:
    `error` gives the one-line message naming the file and exit 2; `skip` substitutes and finishes."""
    broken = _faces_with_bad_files(tmp_path / "faces")
    cfg = tiny_train_config(tmp_path, {"data": {"source": "folder", "root": str(tmp_path / "faces"),
                                                "val_identities": 2, "preflight": False, "bad_images": policy},
                                       "train": {"num_workers": 1, "max_steps": 3, "val_every": 3}})
    out = tmp_path / "run"
    # a real process: the worker's warning goes to the inherited stdout, which pytest's process cannot capture
    proc = run_train(["--config", cfg, "--train.output_dir", out], check=False, timeout=600, subprocess_only=True)
    if policy == "error":
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc)
        named = re.match(r"facetrain: error: (\S+): cannot decode image", line)
        assert named and named.group(1) in broken, line
        assert "data.bad_images: skip" in line
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        warned = set(re.findall(r"warning: (\S+): cannot decode, used another image", proc.stdout + proc.stderr))
        assert warned and warned <= set(broken)
        assert (out / "done.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# 2. Non-finite steps never reach the weights or a checkpoint


def test_nan_step_is_skipped_and_never_reaches_a_checkpoint(tmp_path):
    cfg = tiny_train_config(tmp_path, {"debug": {"inject_nan_at": 2},
                                       "train": {"max_steps": 4, "ckpt_every": 1, "keep_last": 10, "val_every": 4}})
    out = tmp_path / "run"
    proc = run_train(["--config", cfg, "--train.output_dir", out], timeout=600)
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row" in proc.stdout
    dirs = ckpt.checkpoint_dirs(out)
    assert [d.name for d in dirs] == [f"step_{s:08d}" for s in range(1, 5)]
    for d in dirs:
        assert_all_finite(d)
    params = [k for k, _ in create_model(ModelConfig(backbone="test_efficientnet", embedding_dim=32,
                                                     channels_last=False)).named_parameters()]
    w1, w2, w3 = (load_weights(out / "checkpoints" / f"step_{s:08d}") for s in (1, 2, 3))
    assert any(not torch.equal(w1[k], w2[k]) for k in params)  # a normal step moves the weights
    assert all(torch.equal(w2[k], w3[k]) for k in params)  # the NaN step (step index 2, the third) did not


@pytest.mark.parametrize("fused", [True, False])
def test_guard_skips_nonfinite_steps_with_and_without_a_host_sync(fused):
    """Fused optimizers skip a bad step inside their kernel (no host sync per step: reported and enforced at the
    loop's next sync point); others skip it after one bool() per step. Either way the weights, moments and step
    count never see the bad gradients, and train.max_bad_steps in a row stops the run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    accelerator = SimpleNamespace(scaler=None, device=torch.device("cpu"))
    warnings: list[str] = []
    guard = NonFiniteGuard(optimizer, model, list(model.parameters()), accelerator, grad_clip=0.0,
                           max_bad_steps=2, warn=warnings.append)
    assert guard.on_device == fused

    def step(index: int, bad: bool) -> None:
        loss = model(torch.randn(8, 3)).square().mean() * (float("nan") if bad else 1.0)
        loss.backward()
        guard.step(loss.detach(), index)
        optimizer.zero_grad(set_to_none=True)

    step(0, bad=False)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    moments = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    step(1, bad=True)
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())
    assert all(torch.equal(moments[k], v) for k, v in optimizer.state[model[0].weight].items())
    assert len(warnings) == (0 if fused else 1)  # fused: nothing read on the host yet
    guard.check()
    assert warnings == ["step 1: non-finite loss or gradient, step skipped (1 in a row, limit "
                        "train.max_bad_steps=2)"] and guard.bad_steps == 1
    step(2, bad=False)
    step(3, bad=True)
    with pytest.raises(UserError, match="training diverged: 2 consecutive non-finite steps at step 4"):
        step(4, bad=True)
        guard.check()  # fused: the next sync point
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_consecutive_nan_steps_stop_the_run(tmp_path):
    cfg = tiny_train_config(tmp_path, {"debug": {"inject_nan_at": 2},
                                       "train": {"max_bad_steps": 1, "ckpt_every": 1, "keep_last": 10}})
    out = tmp_path / "run"
    proc = run_train(["--config", cfg, "--train.output_dir", out], check=False, timeout=600)
    assert proc.returncode == 2
    assert "training diverged: 1 consecutive non-finite steps at step 2" in error_line(proc)
    dirs = ckpt.checkpoint_dirs(out)
    assert [d.name for d in dirs] == ["step_00000001", "step_00000002"]
    for d in dirs:
        assert_all_finite(d)
    assert not (out / "done.json").exists()


def test_divergence_that_poisons_batchnorm_stops_at_once(tmp_path):
    """lr 1e30: the first step succeeds, the next forward pass overflows and writes NaN into BatchNorm's
    running statistics. Skipping cannot undo that, so the run stops before any checkpoint holds it."""
    cfg = tiny_train_config(tmp_path, {"optim": {"lr": 1e30}, "train": {"ckpt_every": 1, "keep_last": 10}})
    out = tmp_path / "run"
    proc = run_train(["--config", cfg, "--train.output_dir", out], check=False, timeout=600)
    assert proc.returncode == 2
    assert "non-finite values reached the model's normalisation statistics" in error_line(proc)
    dirs = ckpt.checkpoint_dirs(out)
    assert dirs
    for d in dirs:
        assert_all_finite(d)


def test_nonfinite_state_is_named():
    good, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    assert ckpt.nonfinite_tensors({"a": good, "n": torch.tensor(3)}, {"b": bad}) == ["b"]


# ----------------------------------------------------------------------------------------------------------
# 3. Checkpoints: kill -9 mid-step and mid-save, resume exactly


def _popen_train(args: list, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd("facetrain.train", 1) + [str(a) for a in args], cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=subprocess_env(**env))


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"training ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"kill point not reached:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_kill9_mid_step_and_mid_save_then_resume_is_exact(tmp_path):
    extra = {**DETERMINISTIC, "train": {**DETERMINISTIC["train"], "max_steps": 8, "ckpt_every": 2,
                                        "val_every": 4}}
    cfg = tiny_train_config(tmp_path, extra)
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_train(["--config", cfg, "--train.output_dir", ref], timeout=600)

    # (a) kill -9 as soon as checkpoint 2 is published: the process is inside step 3
    log = tmp_path / "a.log"
    proc = _popen_train(["--config", cfg, "--train.output_dir", run], log)
    _kill_when(proc, lambda: ckpt.latest_checkpoint(run) is not None, log)
    assert ckpt.latest_checkpoint(run).name == "step_00000002"

    # (b) resume, and kill -9 inside the save of step 4 (debug.slow_save_s: sleeps before COMPLETE and the rename)
    log = tmp_path / "b.log"
    partial = ckpt.tmp_dir_for(run, 4)
    proc = _popen_train(["--config", cfg, "--train.output_dir", run, "--train.resume", "auto",
                         "--debug.slow_save_s", "120"], log)
    _kill_when(proc, lambda: (partial / "train_state.pt").is_file() and (partial / "model.safetensors").is_file(),
               log)
    assert "resumed from" in log.read_text()
    assert ckpt.latest_checkpoint(run).name == "step_00000002"  # the half-written one is not "latest"
    assert not (partial / ckpt.MARKER).exists()

    # resume again to the end: same weights as the uninterrupted run
    proc = run_train(["--config", cfg, "--train.output_dir", run, "--train.resume", "auto"], timeout=600)
    assert re.search(r"resumed from\s.*?step_00000002\s+at\s+step\s+2", proc.stdout, re.S), proc.stdout[-3000:]
    assert not partial.exists()  # the leftover was replaced when step 4 was saved again
    for sub in ("checkpoints/step_00000008", "bundle"):
        a, b = load_weights(ref / sub), load_weights(run / sub)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{sub}: {k}")


def test_partial_checkpoints_are_ignored(tmp_path):
    root = tmp_path / ckpt.CHECKPOINTS
    fake_checkpoint(root / "step_00000002")
    fake_checkpoint(root / "step_00000004.tmp")  # killed before the rename
    fake_checkpoint(root / "step_00000006")
    (root / "step_00000006" / ckpt.MARKER).unlink()  # killed before COMPLETE
    fake_checkpoint(root / "step_00000008")
    (root / "step_00000008" / "model.safetensors").unlink()  # weights missing
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_00000002"
    with pytest.raises(UserError, match="not a complete facetrain checkpoint"):
        ckpt.load_train_state(root / "step_00000006", 0)


def test_resaving_a_step_keeps_a_complete_copy_at_every_moment(tmp_path):
    """A stop request right after a periodic save writes the same step again: the old copy is set aside, not
    deleted, until the new one is in place, so a kill between the two renames still resumes from that step."""
    root = tmp_path / ckpt.CHECKPOINTS
    fake_checkpoint(root / "step_00000002")
    fake_checkpoint(root / "step_00000004")
    tmp = root / "step_00000004.tmp"
    fake_checkpoint(tmp)
    (tmp / ckpt.MARKER).unlink()  # finalize writes it
    assert ckpt.finalize(tmp, keep_last=3) == root / "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]
    # the moment between the renames: step_4 set aside, the new copy not yet renamed
    os.rename(root / "step_00000004", root / "step_00000004.old")
    fake_checkpoint(root / "step_00000004.tmp")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_00000004.old"
    fake_checkpoint(root / "step_00000004")  # once both exist, the new copy wins
    assert ckpt.checkpoint_dirs(tmp_path) == [root / "step_00000002", root / "step_00000004"]


# ----------------------------------------------------------------------------------------------------------
# 3. A full disk at save time


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_full_disk_at_save_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: the run directory on a 2.6 MB tmpfs holds the bundle and one checkpoint (~1.8 MB),
    not a second one. The run stops with a one-line error and checkpoint 3 stays complete and loadable."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2600k"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_save_errors_are_explained covers the messages")
    try:
        out = disk / "run"
        cfg = tiny_train_config(tmp_path, {"train": {"max_steps": 6, "ckpt_every": 3, "val_every": 3}})
        proc = run_train(["--config", cfg, "--train.output_dir", out], check=False, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc)
        assert f"cannot write {ckpt.tmp_dir_for(out, 6)} (No space left on device" in line, line
        assert f"the previous checkpoint {out / 'checkpoints' / 'step_00000003'} is kept" in line
        assert ckpt.latest_checkpoint(out).name == "step_00000003"
        assert not ckpt.tmp_dir_for(out, 6).exists()
        weights, state, _ = ckpt.load_train_state(ckpt.latest_checkpoint(out), 0)  # intact
        assert '"step": 3' in state["state_json"] and weights
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_save_errors_are_explained(tmp_path, monkeypatch):
    """The errors a full disk really raises (seen on a full tmpfs: safetensors' SafetensorError, and torch.save's
    RuntimeError that does not mention the disk) are explained as a full disk; other errors keep their text."""
    from safetensors import SafetensorError

    reason = ckpt.write_error_reason
    assert reason(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                  tmp_path).startswith("No space left on device")
    assert reason(OSError(28, "No space left on device"), tmp_path) == "No space left on device"
    torch_err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert reason(torch_err, tmp_path).startswith("RuntimeError: [enforce fail")  # this disk has room
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    assert reason(torch_err, tmp_path) == "No space left on device (4096 bytes free)"


# ----------------------------------------------------------------------------------------------------------
# 3. Loading never unpickles code; foreign files are refused with a clear message


def test_pickle_bomb_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bomb = fake_checkpoint(tmp_path / "step_00000002", train_state={"optimizer": CodeOnLoad(marker)})
    with pytest.raises(UserError, match=r"train.resume: cannot read checkpoint .*step_00000002"):
        ckpt.load_train_state(bomb, 0)
    assert not marker.exists()
    torch.save({"state_json": "{}"}, bomb / "train_state.pt")  # now harmless, but each rank's RNG file is not
    torch.save({"cpu": CodeOnLoad(marker)}, bomb / "rng_0.pt")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ckpt.load_train_state(bomb, 0)
    assert not marker.exists()


def test_foreign_files_are_not_bundles(tmp_path):
    marker = tmp_path / "pwned"
    random_dir = tmp_path / "photos"
    random_dir.mkdir()
    (random_dir / "a.txt").write_text("hi")
    pth = tmp_path / "resnet50.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, pth)
    for path in (random_dir, pth, tmp_path / "missing"):
        with pytest.raises(UserError, match="not a facetrain bundle|not found"):
            load_bundle(path)
    bundle = fake_checkpoint(tmp_path / "bundle")
    torch.save({"w": CodeOnLoad(marker)}, bundle / "model.safetensors")  # a pickle under the weights' name
    with pytest.raises(UserError, match="cannot load weights"):
        load_bundle(bundle)
    assert not marker.exists()
    (bundle / "facetrain.json").write_text('{"model": {}}')
    with pytest.raises(UserError, match="not a facetrain bundle"):
        load_bundle(bundle)


# ----------------------------------------------------------------------------------------------------------
# 4. User errors through the real CLI: exit 2, one line naming the key or path, no traceback


def _cli_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    (tmp_path / "broken.yaml").write_text("train:\n  m: [4\n")
    (tmp_path / "types.yaml").write_text("train:\n  batch_size: many\n")
    (tmp_path / "a_file").write_text("")
    return {
        "bad_yaml": (["--config", tmp_path / "broken.yaml"], r"broken\.yaml line \d+: not valid YAML"),
        "wrong_type_yaml": (["--config", tmp_path / "types.yaml"], "train.batch_size: expected an integer"),
        "wrong_type_cli": (["--train.max_steps", "ten"], "train.max_steps: expected an integer"),
        "not_an_override": (["max_steps=10"], "expected --section.key value"),
        "fp16_on_cpu": (["--train.mixed_precision", "fp16"], r"train\.mixed_precision: fp16 needs a GPU"),
        "output_dir_is_a_file": (["--train.output_dir", tmp_path / "a_file"], "train.output_dir: cannot create"),
        "resume_other_settings": (["--train.resume", fake_checkpoint(tmp_path / "ck" / "step_00000002")],
                                  r"train\.resume: .*step_00000002 was written with other settings "
                                  r"\(model\.embedding_dim: 8 -> 32\)"),
    }


CLI_CASES = ["bad_yaml", "wrong_type_yaml", "wrong_type_cli", "not_an_override", "fp16_on_cpu",
             "output_dir_is_a_file", "resume_other_settings"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_user_error_is_one_line(tmp_path, case):
    args, needle = _cli_cases(tmp_path)[case]
    base = ["--config", tiny_train_config(tmp_path)] if "--config" not in args else []
    if "--train.output_dir" not in args:
        args = args + ["--train.output_dir", tmp_path / "run"]
    proc = run_train(base + args, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(needle, error_line(proc)), proc.stderr[-2000:]


def test_debug_flag_shows_the_traceback(tmp_path):
    (tmp_path / "broken.yaml").write_text("train:\n  m: [4\n")
    proc = run_train(["--config", tmp_path / "broken.yaml", "--debug"], check=False, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# 5. One failing rank of two: everyone exits promptly, non-zero, and the error is shown


@pytest.mark.slow
def test_failing_rank_stops_all_ranks_promptly(tmp_path):
    cfg = tiny_train_config(tmp_path, {"train": {"max_steps": 6}})
    start = time.monotonic()
    proc = run_train(["--config", cfg, "--train.output_dir", tmp_path / "run", "--debug.fail_rank", "1",
                      "--debug.fail_step", "2"], procs=2, check=False, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 2" in proc.stderr, proc.stderr[-4000:]
    assert elapsed < 120, f"took {elapsed:.0f} s (a hang would last until the 30 min collective timeout)"
    assert not (tmp_path / "run" / "done.json").exists()


def test_a_kill_between_the_bundle_swap_renames_is_recovered(tmp_path, monkeypatch):
    """bundle -> bundle.old, then bundle.tmp -> bundle: a kill between the two leaves only bundle.old, which every
    place that resolves a bundle renames back."""
    import os

    from facetrain.config.schema import ModelConfig
    from facetrain.data.images import Preprocess
    from facetrain.model.bundle import write_bundle
    from facetrain.model.files import read_bundle_meta, resolve_model_path
    from facetrain.model.network import create_model
    from facetrain.runtime.atomic_dir import replace_dir

    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=8, channels_last=False)
    model = create_model(mcfg)
    run = tmp_path / "run"

    def written(step: int) -> Path:
        tmp = run / "bundle.tmp"
        tmp.mkdir(parents=True)
        write_bundle(tmp, model, mcfg, Preprocess(32, [0.5] * 3, [0.5] * 3), {"step": step})
        return tmp

    replace_dir(written(1), run / "bundle")
    real_rename, calls = os.rename, []

    def killed_after_first_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    tmp = written(2)
    monkeypatch.setattr(os, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(tmp, run / "bundle")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (run / "bundle").exists() and (run / "bundle.old").is_dir()
    assert resolve_model_path(run) == run / "bundle"  # a run directory means its bundle: recovered
    assert read_bundle_meta(run / "bundle")["step"] == 1 and not (run / "bundle.old").exists()
    os.rename(run / "bundle", run / "bundle.old")
    assert read_bundle_meta(run / "bundle")["step"] == 1  # the bundle path itself, as verify / eval get it
