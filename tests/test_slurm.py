"""Slurm integration: slurm/train.sh, slurm/node_launch.sh, slurm/eval.sh.

Fast tests (no Slurm needed) check the per-node `accelerate launch` command of a simulated 2-node
allocation in dry-run mode, and the scripts' syntax and argument checks.

Tests marked `slurm` submit real jobs to a running Slurm (one node is enough; `scripts/start_slurm.sh`
sets one up on this machine) and train the tiny synthetic model with 2 CPU processes:

    bash scripts/start_slurm.sh && python -m pytest tests/test_slurm.py -m slurm -v

They are skipped when `sbatch` is missing or `sinfo` does not answer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SCRIPTS = [SLURM_DIR / "train.sh", SLURM_DIR / "node_launch.sh", SLURM_DIR / "eval.sh",
           REPO / "scripts" / "start_slurm.sh"]


# ----------------------------------------------------------------------------------------------------------
# Fast: node_launch.sh in dry-run mode for a simulated allocation of 2 nodes.

def simulated_step_env(node_id: int, **overrides: str) -> dict[str, str]:
    """What Slurm (srun, one task per node) plus train.sh's exports look like on node `node_id` of job 4242."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node_id),
        # Exported by train.sh (it computes the head with `scontrol show hostnames`).
        "MAIN_PROCESS_IP": "node01",
        "CONFIG": "configs/exp.yaml",
        "OUTPUT_DIR": "runs/4242",
        "GPUS_PER_NODE": "4",
        "FACETRAIN_DRY_RUN": "1",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def dry_run(node_id: int, **overrides: str) -> list[str]:
    proc = subprocess.run(["bash", str(SLURM_DIR / "node_launch.sh")], env=simulated_step_env(node_id, **overrides),
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"dry run must print exactly one line, got: {proc.stdout!r}"
    return shlex.split(lines[0])


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} expected once in {argv}"
    return argv[argv.index(name) + 1]


def launch_args(argv: list[str]) -> list[str]:
    """The arguments after `accelerate launch` (dropping an `env VAR=...` prefix)."""
    i = argv.index("accelerate")
    assert argv[i + 1] == "launch"
    return argv[i + 2:]


def test_two_gpu_nodes_get_distinct_ranks_and_one_rendezvous():
    node0, node1 = dry_run(0), dry_run(1)
    assert option(node0, "--machine_rank") == "0"
    assert option(node1, "--machine_rank") == "1"
    for argv in (node0, node1):
        assert option(argv, "--num_machines") == "2"
        assert option(argv, "--num_processes") == "8"  # total: 2 nodes x 4 GPUs
        assert "--multi_gpu" in argv
        assert "ACCELERATE_USE_CPU=1" not in argv
        assert option(argv, "--rdzv_backend") == "static"
        assert "--same_network" in argv
        # The trainer part: module, config, run directory, always resume.
        assert option(argv, "-m") == "facetrain.train"
        assert option(argv, "--config") == "configs/exp.yaml"
        assert option(argv, "--train.output_dir") == "runs/4242"
        assert option(argv, "--train.resume") == "auto"
    assert option(node0, "--main_process_ip") == option(node1, "--main_process_ip") == "node01"
    assert option(node0, "--main_process_port") == option(node1, "--main_process_port")
    # Only the machine rank differs between the nodes.
    i = node0.index("--machine_rank") + 1
    assert node0[:i] + node0[i + 1:] == node1[:i] + node1[i + 1:]


def test_two_cpu_nodes_use_procs_per_node_and_cpu_ddp():
    for node in (0, 1):
        argv = dry_run(node, GPUS_PER_NODE="0", PROCS_PER_NODE="3")
        assert argv[:2] == ["env", "ACCELERATE_USE_CPU=1"]
        assert option(argv, "--num_processes") == "6"
        assert option(argv, "--num_machines") == "2"
        assert option(argv, "--machine_rank") == str(node)
        assert "--multi_gpu" in argv and "--cpu" not in argv  # --cpu --num_processes N runs one process


def test_port_is_derived_from_the_job_id_and_overridable():
    port_a = int(option(dry_run(0), "--main_process_port"))
    port_b = int(option(dry_run(0, SLURM_JOB_ID="4243"), "--main_process_port"))
    assert port_a != port_b and 20000 <= min(port_a, port_b) and max(port_a, port_b) < 40000
    assert option(dry_run(1, MAIN_PROCESS_PORT="31234"), "--main_process_port") == "31234"


def test_single_process_has_no_multi_gpu_and_extra_args_come_last():
    argv = dry_run(0, SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node01", GPUS_PER_NODE="1",
                   EXTRA_ARGS="--train.max_steps 7 --optim.lr 0.5")
    assert option(argv, "--num_processes") == "1" and option(argv, "--num_machines") == "1"
    assert "--multi_gpu" not in argv and "--rdzv_backend" not in argv
    assert argv[-4:] == ["--train.max_steps", "7", "--optim.lr", "0.5"]


def test_accelerate_config_file_decides_the_distributed_type():
    argv = dry_run(0, ACCELERATE_CONFIG="accelerate_configs/fsdp.yaml")
    assert option(argv, "--config_file") == "accelerate_configs/fsdp.yaml"
    assert "--multi_gpu" not in argv  # it would override the file's distributed_type (FSDP, DeepSpeed, ...)


def test_paths_with_spaces_survive_quoting():
    argv = dry_run(1, OUTPUT_DIR="runs/my run", CONFIG="configs/a b.yaml")
    assert option(argv, "--train.output_dir") == "runs/my run"
    assert option(argv, "--config") == "configs/a b.yaml"


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (expands SLURM_JOB_NODELIST)")
def test_head_node_defaults_to_first_host_of_the_nodelist():
    for node in (0, 1):
        assert option(dry_run(node, MAIN_PROCESS_IP=None), "--main_process_ip") == "node01"


def test_accelerate_reads_the_command_as_a_two_node_static_rendezvous():
    """Feed node 1's command to accelerate's own parser and multi-GPU environment builder."""
    launch = pytest.importorskip("accelerate.commands.launch")
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = launch_args(dry_run(1, MAIN_PROCESS_PORT="29533"))
    args = launch.launch_command_parser().parse_args(argv)
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 8)
    assert args.multi_gpu and args.module and args.training_script == "facetrain.train"
    assert args.training_script_args[:2] == ["--config", "configs/exp.yaml"]
    validate = getattr(launch, "_validate_launch_command", None)  # fills defaults; private, hence the guard
    if validate is None:
        pytest.skip("this accelerate version has no _validate_launch_command")
    validate(args)
    prepare_multi_gpu_env(args)  # what accelerate hands to torchrun
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert (args.master_addr, args.master_port) == ("node01", "29533")


def test_scripts_parse():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_eval_sh_explains_a_missing_run_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("RUN_DIR", None)
    proc = subprocess.run(["bash", str(SLURM_DIR / "eval.sh")], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "RUN_DIR is not set" in proc.stderr
    (tmp_path / "run").mkdir()
    env.update(RUN_DIR=str(tmp_path / "run"), DATA=str(tmp_path))
    proc = subprocess.run(["bash", str(SLURM_DIR / "eval.sh")], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "bundle not found" in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# Real Slurm.

JOB_TIMEOUT_S = 900  # one tiny CPU training job, generous for 2 shared cores
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}

# The tiny synthetic experiment, a few seconds of training on 2 CPU processes. 12 steps with checkpoints
# every 4 leave room for a stop request to land mid-run.
TINY_TRAIN_CONFIG = {
    "data": {"source": "synthetic", "synthetic_identities": 16, "synthetic_images_per_identity": 8,
             "image_size": 32},
    "model": {"backbone": "test_efficientnet", "embedding_dim": 32},
    "train": {"batch_size": 8, "m": 2, "max_steps": 12, "val_every": 6, "ckpt_every": 4, "num_workers": 0},
}


def write_tiny_train_config(directory: Path) -> Path:
    """The tiny experiment as a YAML file in `directory`: the trainer tests' shared helper when there is one
    (so both suites train the same model), with this suite's step counts on top."""
    try:
        from helpers import tiny_train_config
    except ImportError:
        tiny_train_config = None
    if tiny_train_config is not None:
        steps = {key: TINY_TRAIN_CONFIG["train"][key] for key in ("max_steps", "val_every", "ckpt_every")}
        return Path(tiny_train_config(directory, extra={"train": steps}))
    lines = []
    for section, values in TINY_TRAIN_CONFIG.items():
        lines.append(f"{section}:")
        lines += [f"  {key}: {json.dumps(value)}" for key, value in values.items()]
    path = directory / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def max_steps_of(config: Path) -> int:
    import yaml

    return int(yaml.safe_load(config.read_text())["train"]["max_steps"])


def slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (run scripts/start_slurm.sh as root to set up a local Slurm)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer ({exc}); run scripts/start_slurm.sh"
    if proc.returncode != 0 or "up" not in proc.stdout:
        return f"no Slurm partition up (sinfo: {(proc.stdout + proc.stderr).strip()!r}); run scripts/start_slurm.sh"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


class Job:
    def __init__(self, job_id: str, log: Path):
        self.id, self.log = job_id, log

    def info(self) -> dict[str, str]:
        proc = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else f"(no log at {self.log})"

    def fail(self, message: str):
        info = self.info()
        state = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime"))
        pytest.fail(f"{message}\n--- scontrol: {state}\n--- job log {self.log}:\n{self.log_text()[-20000:]}")

    def wait_until(self, what: str, predicate, timeout: float = JOB_TIMEOUT_S, poll: float = 1.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if predicate(info):
                return info
            if info.get("JobState") in TERMINAL_STATES:
                self.fail(f"job {self.id} ended ({info.get('JobState')}) before: {what}")
            time.sleep(poll)
        subprocess.run(["scancel", self.id], capture_output=True)
        self.fail(f"timed out after {timeout:.0f}s waiting for job {self.id}: {what} (job cancelled)")

    def wait_finished(self, timeout: float = JOB_TIMEOUT_S) -> dict:
        info = self.wait_until("the end", lambda i: i.get("JobState") in TERMINAL_STATES, timeout)
        if info["JobState"] != "COMPLETED" or info.get("ExitCode") != "0:0":
            self.fail(f"job {self.id} ended {info['JobState']} with ExitCode {info.get('ExitCode')}")
        return info


def submit(script: str, log_dir: Path, **env: str) -> Job:
    """sbatch from the repository root, like a user; the log goes to log_dir instead of logs/."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", f"slurm/{script}"],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    name = "facetrain-eval" if script == "eval.sh" else "facetrain"
    return Job(job_id, log_dir / f"{name}-{job_id}.out")


def cpu_job_env(config: Path, output_dir: Path) -> dict[str, str]:
    return {"CONFIG": str(config), "OUTPUT_DIR": str(output_dir), "GPUS_PER_NODE": "0", "PROCS_PER_NODE": "2"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_train_config(tmp_path_factory.mktemp("slurm_config"))


@pytest.fixture(scope="module")
def finished_run(slurm, tiny_config, tmp_path_factory) -> tuple[Path, Job]:
    """One uninterrupted training job (2 CPU processes); shared by the training, requeue and eval tests."""
    base = tmp_path_factory.mktemp("slurm_plain")
    job = submit("train.sh", base / "logs", **cpu_job_env(tiny_config, base / "run"))
    job.wait_finished()
    return base / "run", job


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 120)  # includes the shared training job
def test_train_job_trains_with_two_processes_and_exports_a_bundle(finished_run, tiny_config):
    run, job = finished_run
    log = job.log_text()
    assert "--num_processes 2" in log and "--multi_gpu" in log, log[-5000:]
    done = json.loads((run / "done.json").read_text())
    assert done["step"] == max_steps_of(tiny_config), done
    assert any((run / "checkpoints").iterdir()), "no checkpoint written"
    assert (run / "bundle").is_dir() and any((run / "bundle").iterdir()), "no bundle/"
    assert not (run / "STOP").exists()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 300)
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_step(finished_run, tiny_config, tmp_path):
    plain_run, _ = finished_run
    run = tmp_path / "run"
    job = submit("train.sh", tmp_path / "logs", **cpu_job_env(tiny_config, run))
    job.wait_until("running", lambda i: i.get("JobState") == "RUNNING", poll=0.5)
    # Mid-run warning, as Slurm sends it 180 s before the time limit: batch shell only. Early on
    # purpose: the trainer is still starting up, which also exercises train.sh keeping STOP alive.
    time.sleep(3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=30)
    signalled = time.monotonic()

    job.wait_until("requeue (restart count 1)", lambda i: i.get("Restarts") == "1", poll=0.5)
    requeued = time.monotonic()
    # The first attempt is over and the second cannot start before BeginTime: the state on disk now is
    # what the stop left behind.
    if (run / "done.json").exists():
        job.fail("the run finished before the stop request took effect")
    if not (run / "checkpoints").is_dir() or not any((run / "checkpoints").iterdir()):
        job.fail("no checkpoint written on the stop request")

    job.wait_until("restart", lambda i: i.get("JobState") in TERMINAL_STATES | {"RUNNING"}, poll=0.5)
    restarted = time.monotonic()
    info = job.wait_finished()
    print(f"job {job.id}: USR1 -> checkpoint + requeue {requeued - signalled:.0f}s, "
          f"requeue -> running again {restarted - requeued:.0f}s")
    assert info["Restarts"] == "1"
    log = job.log_text()
    assert "received USR1" in log and f"requeueing job {job.id}" in log
    assert f"job {job.id} restart 1 on" in log  # SLURM_RESTART_COUNT as seen by the requeued job
    done = json.loads((run / "done.json").read_text())
    plain = json.loads((plain_run / "done.json").read_text())
    assert done["step"] == plain["step"] == max_steps_of(tiny_config), (done, plain)
    assert (run / "bundle").is_dir()


def write_heldout_folder(root: Path, identities: int = 4, per_identity: int = 4, size: int = 32) -> Path:
    """A small held-out set in the folder layout facetrain reads: root/<identity>/<image>.png."""
    from PIL import Image

    try:  # the built-in synthetic faces, from a seed the training run did not use
        from facetrain.data.synthetic import render

        def image(identity, index):
            return render(seed=12345, identity=identity, index=index).resize((size, size))
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)

        def image(identity, index):
            return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))

    for identity in range(identities):
        folder = root / f"person_{identity:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_identity):
            image(identity, index).convert("RGB").save(folder / f"{index}.png")
    return root


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)  # may include the shared training job
@pytest.mark.parametrize("procs", [1, 2])
def test_eval_job_writes_metrics(finished_run, tmp_path, procs):
    run, _ = finished_run
    data = write_heldout_folder(tmp_path / "heldout")
    env = {"RUN_DIR": str(run), "DATA": str(data), "GPUS_PER_NODE": "0", "PROCS_PER_NODE": str(procs)}
    if procs == 1:
        output = run / "eval"  # the default
        shutil.rmtree(output, ignore_errors=True)
    else:
        output = tmp_path / "eval"
        env["OUTPUT"] = str(output)
    job = submit("eval.sh", tmp_path / "logs", **env)
    job.wait_finished()
    if not (output / "metrics.json").is_file():
        job.fail(f"no {output}/metrics.json")
    assert json.loads((output / "metrics.json").read_text())
