"""Distillation from a teacher (issue 25): the losses on hand-made embeddings, their DDP exactness on a simulated
split of the batch, the teacher's view of the student's input, the config's one-line errors, and tiny in-process
runs that learn from a tiny teacher and resume exactly. The 3-process test is in tests/test_distributed.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from helpers import (
    TinyTeacher,
    assert_same_checkpoint,
    in_process_trainer,
    load_weights,
    run_train,
    tb_scalars,
    tiny_teacher_file,
    tiny_train_config,
    use_tiny_teachers,
)

from facetrain.config.load import load_config
from facetrain.config.schema import DistillConfig
from facetrain.data.images import Preprocess
from facetrain.data.transforms import ToModelInput
from facetrain.errors import UserError
from facetrain.runtime.distributed import gather_for_loss
from facetrain.training.distill import Distiller, teacher_view
from facetrain.training.losses import cosine_regression_loss, relational_loss

PRE = Preprocess(32, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])


def _unit(*degrees: float) -> torch.Tensor:
    """2-D unit vectors at the given angles."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def _distiller(cosine: float = 1.0, relational: float = 1.0, student_dim: int = 8, teacher_dim: int = 5,
               projection: str = "auto") -> Distiller:
    cfg = DistillConfig(teacher="unused", cosine_weight=cosine, relational_weight=relational, projection=projection)
    return Distiller(cfg, TinyTeacher(dim=teacher_dim), student_dim, PRE)


# ------------------------------------------------------------------------------------------------ the losses


def test_cosine_regression_is_one_minus_the_cosine():
    a = _unit(0, 0, 0, 0)
    assert cosine_regression_loss(a, a).item() == pytest.approx(0.0, abs=1e-12)
    # 0, 60, 90 and 180 degrees apart: 1 - cos = 0, 0.5, 1, 2
    assert cosine_regression_loss(a, _unit(0, 60, 90, 180)).item() == pytest.approx(3.5 / 4)
    assert cosine_regression_loss(3 * a, _unit(60, 60, 60, 60)).item() == pytest.approx(0.5)  # direction only


def test_relational_compares_the_off_diagonal_similarities():
    s = _unit(0, 90, 180)  # pair similarities 0, -1, 0
    assert relational_loss(s, s).item() == pytest.approx(0.0, abs=1e-12)
    # teacher: 0.5, -0.5, 0.5; each pair off by 0.5 -> squared 0.25
    assert relational_loss(s, _unit(0, 60, 120)).item() == pytest.approx(0.25)
    # the same geometry in a larger space (zero-padded, then rotated) matches exactly: sizes may differ
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert relational_loss(s, F.pad(s, (0, 3)) @ q).item() == pytest.approx(0.0, abs=1e-12)


class _Rank:
    """What gather_for_loss needs of an Accelerator, for rank `rank` of `world`: gathers give the full batch."""

    def __init__(self, emb: torch.Tensor, labels: torch.Tensor, rank: int, world: int):
        self.emb, self.labels, self.process_index, self.num_processes = emb, labels, rank, world

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.emb.detach() if t.is_floating_point() else self.labels


def test_distillation_on_a_split_batch_equals_the_full_batch():
    """Three simulated ranks, each back-propagating through its own slice of the gathered global batch (scaled
    by the world size, then averaged as DDP does) give the full batch's loss and gradients."""
    torch.manual_seed(0)
    world, per_rank = 3, 4
    emb = F.normalize(torch.randn(world * per_rank, 8), dim=1)
    targets = F.normalize(torch.randn(world * per_rank, 5), dim=1)
    labels = torch.arange(world * per_rank) // 2
    distiller = _distiller(cosine=1.0, relational=0.5)
    full = emb.clone().requires_grad_()
    loss, _ = distiller(full, targets)
    loss.backward()
    full_projection_grad = distiller.projection.weight.grad.clone()
    slices = []
    for rank in range(world):
        distiller.zero_grad()
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        local = emb[part].clone().requires_grad_()
        all_emb, _ = gather_for_loss(local, labels[part], _Rank(emb, labels, rank, world))
        value, _ = distiller(all_emb, targets)
        assert value.item() == loss.item()  # every rank computes the global-batch loss itself
        value.backward()
        slices.append(local.grad / world)  # DDP averages the ranks' gradients
        # the projection (not in DDP's model) gets the full gradient on every rank: average_gradients keeps it
        torch.testing.assert_close(distiller.projection.weight.grad, full_projection_grad)
    torch.testing.assert_close(torch.cat(slices), full.grad)


def test_terms_are_fp32_under_autocast_and_a_zero_weight_drops_its_term():
    distiller = _distiller(cosine=0.0, relational=2.0)
    assert list(distiller.terms) == ["relational"] and distiller.active
    assert not _distiller(cosine=0.0, relational=0.0).active  # no term: the trainer never calls the teacher
    emb = F.normalize(torch.randn(6, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = distiller.targets(ToModelInput(PRE, "cpu")(torch.randint(0, 256, (6, 3, 32, 32),
                                                                          dtype=torch.uint8)))
        total, values = distiller(emb.bfloat16(), targets)
    assert targets.dtype == torch.float32 and not targets.requires_grad and targets.shape == (6, 5)
    assert total.dtype == torch.float32 and list(values) == ["train/loss_distill_rel"]
    assert total.item() == pytest.approx(2 * relational_loss(emb.bfloat16().float(), targets).item(), rel=1e-6)


def test_projection_follows_the_sizes():
    assert isinstance(_distiller(student_dim=5).projection, torch.nn.Identity)  # auto, equal sizes
    assert _distiller(student_dim=8).projection.weight.shape == (5, 8)
    assert _distiller(student_dim=5, projection="linear").projection.weight.shape == (5, 5)
    with pytest.raises(UserError, match=r"distill.projection: 'none' needs model.embedding_dim \(8\)") as err:
        _distiller(student_dim=8, projection="none")
    assert "\n" not in str(err.value)


def test_the_teacher_sees_the_students_input_as_rgb_in_0_1():
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    seen = teacher_view(ToModelInput(PRE, "cpu", channels_last=True)(pixels), PRE)
    torch.testing.assert_close(seen, pixels.float() / 255, atol=1e-5, rtol=0)
    gray = Preprocess(32, [0.5], [0.25])
    seen = teacher_view((torch.full((1, 1, 4, 4), 0.2) - 0.5) / 0.25, gray)  # gray input: three equal channels
    assert seen.shape == (1, 3, 4, 4) and torch.allclose(seen, torch.full_like(seen, 0.2))


# ------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("overrides, message", [
    (["--distill.cosine_weight", "2"], "distill.cosine_weight: set only with distill.teacher"),
    (["--distill.teacher", "/nonexistent/sface.onnx"], "distill.teacher: not found: /nonexistent/sface.onnx"),
    (["--distill.projection", "pca"], "distill.projection: unknown projection 'pca'"),
    (["--distill.relational_weight", "-1"], "distill.relational_weight: must be >= 0"),
    (["--distill.metric_weight", "0", "--distill.cosine_weight", "0", "--distill.relational_weight", "0"],
     "all 0 leaves nothing to train"),
])
def test_config_errors_are_one_line(tmp_path, overrides, message):
    if "--distill.teacher" not in overrides and "--distill.cosine_weight" not in overrides[:1]:
        overrides = ["--distill.teacher", str(tiny_teacher_file(tmp_path)), *overrides]
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_distillation_is_off_by_default():
    cfg = load_config(None, [])
    assert cfg.distill == DistillConfig() and not cfg.distill.teacher


# ------------------------------------------------------------------------------------------------ training


def _distill_config(tmp_path, train: dict, **distill):
    return tiny_train_config(tmp_path, {"distill": {"teacher": str(tiny_teacher_file(tmp_path)), **distill},
                                        "train": train})


def test_the_teacher_embeds_the_very_view_the_student_trains_on(tmp_path, monkeypatch):
    """Function matching: with augmentation on, the teacher's input is the student's input of the same step
    (unnormalised to RGB [0, 1]); with every distillation weight 0 the teacher is not called."""
    use_tiny_teachers(monkeypatch)
    with in_process_trainer(_distill_config(tmp_path, {}), tmp_path / "run") as trainer:
        assert trainer.cfg.data.augment.enabled
        trainer.setup()
        trainer.sampler.set_epoch(0)
        student_in, teacher_in = [], []
        trainer.net.register_forward_pre_hook(lambda module, args: student_in.append(args[0].detach().clone()))
        teacher = trainer.distiller.teacher
        embed = teacher.embed
        monkeypatch.setattr(teacher, "embed", lambda images: teacher_in.append(images.clone()) or embed(images))
        batches = iter(trainer.loader)
        trainer.train_step(batches)
        assert len(student_in) == len(teacher_in) == 1
        torch.testing.assert_close(teacher_in[0], teacher_view(student_in[0], trainer.pre))
        assert set(trainer.step_terms) == {"train/loss_distill_cos", "train/loss_distill_rel"}
        trainer.distiller.terms = {}  # as with distill.cosine_weight and distill.relational_weight 0
        trainer.train_step(batches)
        assert len(teacher_in) == 1 and trainer.step_terms == {}


@pytest.mark.slow
def test_a_tiny_run_learns_its_teacher_on_held_out_images(tmp_path, monkeypatch):
    """40 steps of a 32 px student distilled alone (no metric loss) from a tiny teacher: the mean cosine between
    the projected student and the teacher on the held-out identities' images rises; the terms are logged; the
    bundle is the student's."""
    use_tiny_teachers(monkeypatch)
    cfg = _distill_config(tmp_path, {"max_steps": 40, "val_every": 40, "ckpt_every": 40, "log_every": 20,
                                     "tensorboard": True}, metric_weight=0.0)
    run = tmp_path / "run"
    run_train(["--config", cfg, "--train.output_dir", run])
    done = __import__("json").loads((run / "done.json").read_text())
    before, after = done["untrained"]["teacher_agreement"], done["final"]["teacher_agreement"]
    # measured: -0.2 -> 0.68; a constant direction (the teacher's mean embedding) scores 0.49 on these faces
    assert after > before + 0.4 and after > 0.6, (before, after)
    for tag in ("train/loss_distill_cos", "train/loss_distill_rel"):
        assert sorted(tb_scalars(run, tag)) == [20, 40], tag
    assert not any("projection" in key for key in load_weights(run / "bundle"))  # the student alone
    state = torch.load(run / "checkpoints" / "step_00000040" / "train_state.pt", weights_only=True)
    assert state["distill"]["projection.weight"].shape == (16, 32)


def test_resume_restores_the_projection_exactly(tmp_path, monkeypatch):
    use_tiny_teachers(monkeypatch)
    cfg = _distill_config(tmp_path, {"max_steps": 4, "val_every": 4, "ckpt_every": 100})
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(["--config", cfg, "--train.output_dir", full])
    run_train(["--config", cfg, "--train.output_dir", part, "--debug.stop_at_step", "2"])
    proc = run_train(["--config", cfg, "--train.output_dir", part, "--train.resume", "auto"])
    assert "step_00000002" in proc.stdout  # (rich may cut the line short of "at step 2" on a long path)
    assert_same_checkpoint(full, part, 4)


def test_a_distillation_checkpoint_adds_its_projection_after_the_usual_parts(tmp_path, monkeypatch):
    """Older checkpoints resume (the parts of a run without distillation are unchanged: test_trainer_parts.py);
    a distillation run saves its projection as one more part, which a resume then requires."""
    use_tiny_teachers(monkeypatch)
    with in_process_trainer(_distill_config(tmp_path, {}), tmp_path / "run") as trainer:
        trainer.setup_model()
        parts = trainer.stateful_parts()
        assert list(parts) == ["model", "optimizer", "scheduler", "loss", "ema", "scaler", "distill"]
        assert parts["distill"] is trainer.distiller and not getattr(trainer.distiller, "optional", False)
        assert list(trainer.distiller.state_dict()) == ["projection.weight"]  # the teacher is not saved


@pytest.mark.slow
def test_a_tiny_run_learns_a_teacher_exported_from_a_tiny_bundle(tmp_path):
    """The whole path without the shared face model: distill.teacher names a real file, the ONNX export of a
    tiny bundle (tests/data/legacy/model.onnx), loaded by deploy.teacher.load_teacher and run in onnxruntime on
    the student's own augmented views. Its agreement with the student rises, and the bundle's model card names
    the teacher by file and sha256 and says its licence is not recorded."""
    import hashlib
    import json

    teacher = Path(__file__).parent / "data" / "legacy" / "model.onnx"
    cfg = tiny_train_config(tmp_path, {"distill": {"teacher": str(teacher), "metric_weight": 0.0},
                                       "train": {"max_steps": 40, "val_every": 40, "ckpt_every": 40}})
    run = tmp_path / "run"
    run_train(["--config", cfg, "--train.output_dir", run])
    done = json.loads((run / "done.json").read_text())
    before, after = done["untrained"]["teacher_agreement"], done["final"]["teacher_agreement"]
    assert after > before + 0.2, (before, after)
    card = json.loads((run / "bundle" / "facetrain.json").read_text())["model_card"]["teacher"]
    assert card["file"] == "model.onnx" and card["sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert card["licence"].startswith("not recorded")
    assert "model.onnx" in (run / "bundle" / "MODEL_CARD.md").read_text()


def test_a_malformed_teacher_input_is_one_line_before_training(tmp_path):
    """distill.teacher_input is parsed by the teacher's own parser right after the config loads, before any
    data is read or model built."""
    from helpers import run_in_process

    done = run_in_process("facetrain.train", ["--distill.teacher", tiny_teacher_file(tmp_path),
                                              "--distill.teacher_input", "size=112,colour=rgb",
                                              "--train.output_dir", tmp_path / "run"])
    assert done.returncode == 2
    assert done.stderr.startswith("facetrain: error: distill.teacher_input: 'colour=rgb' is not KEY=VALUE")
    assert not (tmp_path / "run").exists()


def test_a_bundle_teacher_trains_and_a_folder_that_is_not_one_is_one_line(tmp_path):
    """A facetrain bundle (a folder) is a teacher for training too, not only for the loader: the config accepts
    it, the run says which teacher it uses and where, and learns from it; a folder that is no bundle is one line
    naming distill.teacher before any data is read."""
    import json

    from helpers import run_in_process

    bundle = Path(__file__).parent / "data" / "legacy" / "bundle"
    cfg = tiny_train_config(tmp_path, {"distill": {"teacher": str(bundle)},
                                       "train": {"max_steps": 2, "val_every": 2, "ckpt_every": 2}})
    done = run_in_process("facetrain.train", ["--config", cfg, "--train.output_dir", tmp_path / "run"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"teacher: {bundle}: size=" in done.stdout
    assert "teacher_agreement" in json.loads((tmp_path / "run" / "done.json").read_text())["final"]
    (tmp_path / "empty").mkdir()
    done = run_in_process("facetrain.train", ["--config", cfg, "--distill.teacher", tmp_path / "empty",
                                              "--train.output_dir", tmp_path / "run2"])
    assert done.returncode == 2 and done.stderr.startswith(f"facetrain: error: distill.teacher: {tmp_path / 'empty'}")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run2").exists()
    with pytest.raises(UserError, match=r"^distill.teacher_input: .* is a facetrain bundle, which states its own "):
        load_config(str(cfg), ["--distill.teacher_input", "size=112"])


def test_a_run_directory_names_its_bundle_as_teacher(tmp_path):
    """A run directory (runs/<name>, holding bundle/) is a teacher as its bundle is: the model card's sha256 is
    that bundle's weights file's, as for the bundle folder itself."""
    import hashlib
    import shutil

    from facetrain.training.distill import teacher_provenance

    shutil.copytree(Path(__file__).parent / "data" / "legacy" / "bundle", tmp_path / "run" / "bundle")
    got = teacher_provenance(tmp_path / "run")
    assert got["sha256"] == hashlib.sha256((tmp_path / "run" / "bundle" / "model.safetensors").read_bytes()).hexdigest()
    assert got["sha256"] == teacher_provenance(tmp_path / "run" / "bundle")["sha256"] and got["file"] == "run"


def test_the_card_names_a_bundle_teacher_by_its_weights(tmp_path):
    """A bundle teacher is a folder: its sha256 is its weights file's (as facetrain.audit records it); a licence
    line in <file>.SOURCE.txt is carried."""
    import hashlib
    import shutil

    from facetrain.training.distill import teacher_provenance

    bundle = tmp_path / "teacher_bundle"
    shutil.copytree(Path(__file__).parent / "data" / "legacy" / "bundle", bundle)
    (tmp_path / "teacher_bundle.SOURCE.txt").write_text("Made here.\nLicence: CC0-1.0, no conditions.\n")
    got = teacher_provenance(bundle)
    assert got["sha256"] == hashlib.sha256((bundle / "model.safetensors").read_bytes()).hexdigest()
    assert got["file"] == "teacher_bundle" and got["licence"] == "Licence: CC0-1.0, no conditions."


def test_distill_step_bench_has_people_for_the_gpu_checks_batch(tmp_path, monkeypatch):
    """bench/gpu_check.sh's distill part asks for batches of 256 on synthetic faces: enough identities for
    64 per batch remain after the validation split (its sampler refuses the batch otherwise)."""
    import importlib.util

    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("distill_step", REPO / "bench" / "distill_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--data", "synthetic", "--backbone", "test_efficientnet", "--image-size", "32",
                             "--batch", "256"])
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = bench.build(args, tmp_path / "plain", "")
        assert len(set(trainer.train_labels.tolist())) >= 256 // bench.M
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_distill_step_bench_runs_at_smoke_size(tmp_path, monkeypatch):
    """bench/distill_step.py at its smoke size (tiny student, the tiny ONNX teacher of tests/data/legacy): the
    three variants (plain, distillation, distillation + mixed images) train and their ratios are reported."""
    import importlib.util
    import json

    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as `python bench/distill_step.py` finds results_md
    spec = importlib.util.spec_from_file_location("distill_step", REPO / "bench" / "distill_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step.json"
    try:
        bench.main(["--smoke", "--no-write", "--json", str(out), "--mix", "mixup", "--mix-images", "4"])
    finally:  # the bench's two trainers share accelerate's process-wide state: leave none behind
        AcceleratorState._reset_state(reset_partial_state=True)
    result = json.loads(out.read_text())
    assert len(result["plain_s"]) == len(result["distill_s"]) == len(result["ratio"]) == 1
    assert result["plain_s"][0] > 0 and result["distill_s"][0] > 0 and "model.onnx" in result["teacher"]
    assert result["extra_s"][0] > 0 and len(result["extra_ratio"]) == 1  # the third variant: + 4 mixed images
