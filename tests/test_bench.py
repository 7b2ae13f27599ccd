"""The training benchmark's pairing: the raw step runs inside facetrain's own training run, between its rounds,
and every facetrain ratio comes from rounds measured side by side (bench/train_throughput.py). The figures
themselves are never asserted: they depend on the machine (bench/RESULTS.md has them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env


@pytest.mark.slow
def test_train_throughput_pairs_facetrain_with_the_raw_step(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--smoke", "--data", "synthetic",
           "--variants", "raw,raw_guard,facetrain", "--modes", "fp32,bf16_cl", "--rounds", "2", "--device", "cpu",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    jobs = {(j["variant"], j["mode"]): j for j in result["jobs"]}
    assert set(jobs) == {(v, m) for v in ("raw", "raw_guard", "facetrain") for m in ("fp32", "bf16_cl")}
    for job in jobs.values():
        assert len(job["img_per_s"]) == 2 and all(v > 0 for v in job["img_per_s"])  # one figure per round
    for mode in ("fp32", "bf16_cl"):
        # paired in its own mode's session: the median of the per-round ratios
        ft, raw = jobs[("facetrain", mode)], jobs[("raw", mode)]
        per_round = sorted(a / b for a, b in zip(ft["img_per_s"], raw["img_per_s"], strict=True))
        assert ft["x_raw"] == pytest.approx(sum(per_round) / 2)
        assert jobs[("raw_guard", mode)]["x_raw"] > 0
    # the report names each session's host and guests; the rounds of the guests printed as they ran
    assert "1: facetrain.train() run, facetrain fp32, hosting raw fp32, raw_guard fp32" in proc.stdout
    assert proc.stdout.count("round 2/2") == 4


def test_warp_cost_times_the_same_warp_in_c_as_grid_sample(tmp_path):
    """bench/warp_cost.py's comparison is like for like: its C loop computes grid_sample's warp (the device
    path's rotation + crop + flip) to float rounding, on colour and gray batches, zeros outside included."""
    import importlib.util
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on PATH for bench/warp_cost.py's C loop")
    spec = importlib.util.spec_from_file_location("warp_cost", REPO / "bench" / "warp_cost.py")
    warp_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warp_cost)
    fn, reason = warp_cost.compile_scalar_c(tmp_path)
    assert fn is not None, reason
    for channels in (1, 3):
        row = warp_cost.measure(24, channels, rounds=1, fn_c=fn)
        assert row["scalar_c_max_abs_diff"] < 0.05  # pixel units (0-255): the same warp
        assert all(row[f"{k}_ns"] > 0 for k in ("device_augment", "grid_sample", "scalar_c"))


@pytest.mark.slow
def test_gpu_check_distill_part_runs_here_at_smoke_size(tmp_path):
    """bench/gpu_check.sh --smoke --parts distill on this CPU: only that part runs (the others say so), with a
    random-weights bundle teacher on synthetic faces (the device has neither ../shared nor onnxruntime), and
    the summary gives both step times."""
    env = {**subprocess_env(), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--parts", "distill"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert result["plain_s"][0] > 0 and result["distill_s"][0] > 0 and "on cpu" in result["student"]
    assert "no training figures (not in --parts)" in proc.stdout and "== train" not in proc.stdout
    assert "distillation step: test_efficientnet at 32 px, batch 16, on cpu; teacher " in proc.stdout


@pytest.mark.slow
def test_gpu_check_data_path_comparison_runs_here_at_smoke_size(tmp_path):
    """bench/gpu_check.sh's data-path part (bench/data_path.py --parts gpu) on this CPU at tiny sizes: every
    path trains and reports a rate, so a bug shows here and not first during a scarce GPU lease."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "data_path.py"), "--parts", "gpu", "--smoke", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["gpu"]
    assert row["device"] == "cpu"  # no GPU here: the smoke run takes what there is
    assert all(row[path] > 0 for path in ("raw", "pil_folder", "pil_packed", "device_packed")), row


@pytest.mark.slow
def test_serve_hostile_load_runs_at_smoke_size(tmp_path):
    """bench/serve_hostile.py (issue 26's load test) at smoke size: the good callers are answered, every kind of
    attack gets its answer, no 5xx, and the server's peak memory is measured."""
    out = tmp_path / "hostile.json"
    cmd = [sys.executable, str(REPO / "bench" / "serve_hostile.py"), "--smoke", "--no-write", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    status = result["status"]
    assert set(status["good /verify"]) == {"200"} and status["good /verify"]["200"] > 5, status
    assert set(status["6300x6300 RGBA PNG"]) == {"413"}, status  # refused on its header
    assert set(status.get("1 GB Content-Length", {"413": 1})) == {"413"}, status
    assert not [(kind, s) for kind, counts in status.items() for s in counts if s.startswith("5")], status
    assert result["vm_hwm"] > result["rss_idle"] > 0 and result["log_tracebacks"] == 0
