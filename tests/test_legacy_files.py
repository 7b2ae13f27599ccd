"""Files written by facetrain commit 1c7a548 (2026-12-07) still load: a mid-run checkpoint resumes, the bundle
evaluates and verifies, the exported ONNX file verifies, a pack trains. The gallery's version-1 enrolment caches
(size + mtime keys, inside the gallery) are no longer trusted (issue 26 item 12): identify embeds the gallery again
into its new cache and answers the same, leaving the old files where they are.

Only the command-line entry points are used (`python -m facetrain.<cmd>` in a subprocess), never facetrain's
modules: their import paths may change, the commands and the files on disk must not. The files and how they were
made are described in data/legacy/SOURCE.md. Every run is tiny (timm's test_efficientnet, 32 px, 16-d, fp32).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# each check starts a fresh interpreter on purpose (the files must load through the commands as users run them)
pytestmark = pytest.mark.slow

LEGACY = Path(__file__).parent / "data" / "legacy"
REPO = Path(__file__).resolve().parents[1]

# What the 1c7a548 code printed for these files (SOURCE.md): the loaded models must give the same answers.
SIM_SAME = 0.9250  # person_00/img_0.png vs person_00/img_1.png (bundle, checkpoint and ONNX agree to 1e-6)
THRESHOLD = 0.841525  # calibrated into the bundle (and the ONNX metadata) by facetrain.eval --target-far 0.1
EVAL_AUC = 0.6975  # facetrain.eval of the bundle on gallery/ (all pairs: 36 genuine, 240 impostor)
TOL = 5e-3  # fp32 on another machine (e.g. TF32 convolutions on a GPU) moves cosines by far less
PAIR_SAME = ("person_00/img_0.png", "person_00/img_1.png")
CHECKPOINT_STEP = 2  # the checkpoint is step 2 of a 4-step run (debug.stop_at_step 2)
CACHES = {"bundle": "gallery-ecf0255fcf0eb441", "onnx": "gallery-5bd563bac69e9c70"}  # .facetrain-cache/<name>.*


def facetrain(cmd: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m facetrain.<cmd> args...` with this checkout first on the path; fails the test on a non-zero exit."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400"})  # rich: no line wrapping
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    proc = subprocess.run([sys.executable, "-m", f"facetrain.{cmd}", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"facetrain.{cmd} failed ({proc.returncode}):\nSTDOUT\n{proc.stdout[-4000:]}\n"
                                  f"STDERR\n{proc.stderr[-4000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the legacy files, with the gallery images' mtimes as the caches' manifests record
    them (a git checkout or a copy does not keep mtimes; the cache is valid only for the exact size + mtime)."""
    assert LEGACY.is_dir(), f"legacy files missing: {LEGACY}"
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    gallery = root / "gallery"
    for manifest in sorted((gallery / ".facetrain-cache").glob("*.json")):
        for rel, size, mtime_ns in json.loads(manifest.read_text())["files"]:
            path = gallery / rel
            assert path.stat().st_size == size, f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
            os.utime(path, ns=(mtime_ns, mtime_ns))
    return root


def test_checkpoint_resumes_at_its_step(legacy: Path, tmp_path: Path):
    """checkpoint/ is a run folder (config.yaml + checkpoints/step_00000002/): resume auto continues at step 2 and
    trains the remaining 2 of the run's 4 steps."""
    run = legacy / "checkpoint"
    proc = facetrain("train", "--config", run / "config.yaml", "--train.output_dir", run, "--train.resume", "auto",
                     cwd=tmp_path)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "resumed from" in out and f"at step {CHECKPOINT_STEP}" in out, out[-3000:]
    assert "untrained model:" not in out  # the loop state (untrained metrics, best step) came from the checkpoint
    done = json.loads((run / "done.json").read_text())
    assert done["step"] == done["max_steps"] == 4 and not done["stopped"]
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert done["untrained"]["auc"] == pytest.approx(0.7057, abs=1e-3)  # measured by the 1c7a548 run at step 0


def test_bundle_evaluates(legacy: Path, tmp_path: Path):
    out = tmp_path / "eval"
    facetrain("eval", "--model", legacy / "bundle", "--data", legacy / "gallery", "--output", out, "--no-calibrate",
              "--no-plots", "--num-workers", "0", "--mixed-precision", "no", cwd=tmp_path)
    report = json.loads((out / "metrics.json").read_text())
    assert report["model_step"] == CHECKPOINT_STEP
    assert (report["n_images"], report["n_identities"]) == (24, 6)
    m = report["metrics"]
    assert (m["n_genuine"], m["n_impostor"]) == (36, 240)
    assert m["auc"] == pytest.approx(EVAL_AUC, abs=TOL)


def test_onnx_verifies(legacy: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="needs the serve extras (pip install -e '.[serve]')")
    a, b = (legacy / "gallery" / name for name in PAIR_SAME)
    result = last_json(facetrain("verify", "--backend", "onnxruntime", "--model", legacy / "model.onnx", a, b,
                                 "--json", cwd=tmp_path))
    assert result["similarity"] == pytest.approx(SIM_SAME, abs=TOL)
    assert result["threshold"] == pytest.approx(THRESHOLD, abs=1e-6)  # from the file's metadata
    assert result["threshold_far"] == pytest.approx(0.1) and result["same"] is True


def test_pack_trains(legacy: Path, tmp_path: Path):
    """gallery.ftpack (6 identities x 4 images, 32 px) as training data: 2 identities held out for validation."""
    out = tmp_path / "packrun"
    facetrain("train", "--data.source", "packed", "--data.root", legacy / "gallery.ftpack", "--data.image_size", "32",
              "--data.val_identities", "2", "--model.backbone", "test_efficientnet", "--model.embedding_dim", "16",
              "--model.channels_last", "false", "--train.batch_size", "8", "--train.m", "2", "--train.max_steps", "2",
              "--train.val_every", "2", "--train.ckpt_every", "2", "--train.num_workers", "0",
              "--train.progress", "false", "--train.mixed_precision", "no", "--train.tensorboard", "false",
              "--train.output_dir", out, cwd=tmp_path)
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == 2 and not done["stopped"]
    # 2 validation identities x 4 images: the pack's labels were read as written
    assert (done["final"]["n_genuine"], done["final"]["n_impostor"]) == (2 * 6, 4 * 4)
    assert (out / "bundle" / "model.safetensors").is_file()


@pytest.mark.parametrize("backend", ["bundle", "onnx"])
def test_identify_rebuilds_over_a_legacy_gallery_cache(legacy: Path, tmp_path: Path, backend: str):
    if backend == "onnx":
        pytest.importorskip("onnxruntime", reason="needs the serve extras (pip install -e '.[serve]')")
        model_args = ["--backend", "onnxruntime", "--model", legacy / "model.onnx"]
    else:
        model_args = ["--model", legacy / "bundle", "--mixed-precision", "no"]  # the precision is in the key
    gallery = legacy / "gallery"
    cache = gallery / ".facetrain-cache" / f"{CACHES[backend]}.safetensors"
    before = cache.read_bytes()
    probe = gallery / "person_02" / "img_1.png"
    proc = facetrain("identify", *model_args, "--gallery", gallery, probe, "--top-k", "3", "--num-workers", "0",
                     "--json", "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    result = last_json(proc)
    assert result["cache"] == "built", proc.stderr[-2000:]  # the legacy cache is not read, not trusted
    assert cache.read_bytes() == before  # ... and not removed either
    assert len(list((tmp_path / "cache").glob("gallery-*.safetensors"))) == 1
    top = result["probes"][0]["matches"][0]
    assert top["identity"] == "person_02" and top["score"] == pytest.approx(1.0, abs=1e-4)  # the probe is enrolled
    assert result["probes"][0]["match"] is True and result["threshold"] == pytest.approx(THRESHOLD, abs=1e-6)
