"""distill.targets: cached (training/target_cache.py, issue 25's "cached-target" baseline): the teacher-target
cache is filled once, reused, invalidated by what changes a target (an image's pixels, the teacher file, its input
spec, the image size) and by nothing else (a rename), rebuilt with a warning when corrupt; in training the
targets of a dataset position stay fixed while the student's views change, a tiny run trains and resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import (
    TinyTeacher,
    assert_same_checkpoint,
    in_process_trainer,
    run_train,
    tb_scalars,
    tiny_teacher_file,
    tiny_train_config,
    use_tiny_teachers,
)
from PIL import Image

from facetrain.config.load import load_config
from facetrain.config.schema import DistillConfig
from facetrain.data.dataset import FaceDataset
from facetrain.data.faceset import folder_faceset
from facetrain.data.images import Preprocess
from facetrain.data.transforms import eval_transform
from facetrain.errors import UserError
from facetrain.runtime import distributed
from facetrain.training import target_cache
from facetrain.training.target_cache import CacheId, fill, read_cache

SIZE = 16  # px: the un-augmented view the teacher embeds in these tests


class CountingTeacher(TinyTeacher):
    """A TinyTeacher that counts the images it embeds."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.images = 0

    def embed(self, images):
        self.images += len(images)
        return super().embed(images)


def _faces(root: Path, identities: int = 3, per_identity: int = 4) -> Path:
    """A folder of small random RGB images, one sub-folder per identity."""
    rng = np.random.default_rng(0)
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True)
        for k in range(per_identity):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"id{i}" / f"{k}.png")
    return root


def _dataset(root: Path, size: int = SIZE) -> FaceDataset:
    faceset = folder_faceset(str(root))
    idx = np.arange(len(faceset))
    return FaceDataset(faceset, idx, faceset.labels[idx], eval_transform(Preprocess(size, [0.5] * 3, [0.5] * 3)))


def _id(teacher_sha: str = "a" * 64, spec: str = "size=24,order=rgb,range=0-1", size: int = SIZE) -> CacheId:
    return CacheId(teacher_sha, spec, size)


def test_the_first_fill_embeds_every_image_once_and_a_second_none(tmp_path):
    data, cache_id = _faces(tmp_path / "faces"), _id()
    path = cache_id.file(tmp_path / "cache")
    teacher = CountingTeacher()
    first, report = fill(teacher, _dataset(data), path, cache_id)
    assert (report.cached, report.computed, teacher.images) == (0, 12, 12) and path.is_file()
    assert report.line() == f"teacher targets: 0 cached, 12 computed (cache file {path})"
    # the targets are the teacher's embeddings of the un-augmented views, in dataset order
    views = torch.stack([item[0] for item in _dataset(data)]).float() / 255
    np.testing.assert_allclose(first, TinyTeacher().embed(views).numpy(), atol=1e-6)
    again = CountingTeacher()
    second, report = fill(again, _dataset(data), path, cache_id)
    assert (report.cached, report.computed, again.images, again.calls) == (12, 0, 0, 0)
    np.testing.assert_array_equal(second, first)


def test_a_renamed_image_hits_and_an_edited_one_is_recomputed_alone(tmp_path):
    data, cache_id = _faces(tmp_path / "faces"), _id()
    path = cache_id.file(tmp_path / "cache")
    before, _ = fill(CountingTeacher(), _dataset(data), path, cache_id)
    (data / "id0" / "0.png").rename(data / "id0" / "renamed.png")  # same pixels, another path: a hit
    edited = data / "id2" / "3.png"
    pixels = np.asarray(Image.open(edited)).copy()
    pixels[5, 5] ^= 255  # one pixel changed: a miss
    Image.fromarray(pixels).save(edited)
    teacher = CountingTeacher()
    after, report = fill(teacher, _dataset(data), path, cache_id)
    assert (report.cached, report.computed, teacher.images) == (11, 1, 1)
    assert not np.array_equal(after[-1], before[-1])  # the edited image's target (last in scan order) is new
    np.testing.assert_array_equal(after[:4], before[[1, 2, 3, 0]])  # renamed.png now sorts after 3.png
    np.testing.assert_array_equal(after[4:-1], before[4:-1])


@pytest.mark.parametrize("other", [_id(teacher_sha="b" * 64), _id(spec="size=24,order=bgr,range=0-1"),
                                   _id(size=SIZE + 4)], ids=["teacher", "spec", "image_size"])
def test_another_teacher_spec_or_image_size_misses_and_keeps_the_first_file(tmp_path, other):
    data, cache_id = _faces(tmp_path / "faces"), _id()
    path = cache_id.file(tmp_path / "cache")
    fill(CountingTeacher(), _dataset(data), path, cache_id)
    written = path.read_bytes()
    teacher = CountingTeacher()
    _, report = fill(teacher, _dataset(data, other.image_size), other.file(tmp_path / "cache"), other)
    assert other.file(tmp_path / "cache") != path and (report.computed, teacher.images) == (12, 12)
    assert path.read_bytes() == written
    # a file made for another teacher, read under this one's name (a collision), is not taken for a hit
    assert read_cache(path, other, teacher.dim) == ({}, "made for another teacher, input spec or image size")


def test_the_key_names_the_teacher_by_its_file_content(tmp_path):
    """The trainer's key: the teacher file's sha256 (another file, another cache), the canonical spec text of an
    ONNX teacher (two spellings of one spec, one cache), data.image_size."""
    from facetrain.deploy.input_spec import parse_input_spec

    a, b = tiny_teacher_file(tmp_path, seed=0), tiny_teacher_file(tmp_path, seed=1)
    ids = [CacheId(target_cache.teacher_sha256(p), "", SIZE).file(tmp_path) for p in (a, b)]
    assert ids[0] != ids[1]

    class Spec:
        spec = parse_input_spec("size=112,order=rgb,range=0-255")

    assert target_cache.spec_text(Spec(), "size=112 , order=rgb,range=0-255") == Spec.spec.describe()
    assert target_cache.spec_text(TinyTeacher(), "") == ""


@pytest.mark.parametrize("garbage", [b"", b"not a safetensors file at all", b"\xff" * 64],
                         ids=["empty", "text", "bytes"])
def test_a_corrupt_cache_file_is_a_one_line_warning_and_rebuilt(tmp_path, garbage):
    data, cache_id = _faces(tmp_path / "faces"), _id()
    path = cache_id.file(tmp_path / "cache")
    path.parent.mkdir()
    path.write_bytes(garbage)
    teacher = CountingTeacher()
    _, report = fill(teacher, _dataset(data), path, cache_id)
    assert report.stale.startswith("unreadable (") and report.computed == teacher.images == 12
    known, reason = read_cache(path, cache_id, teacher.dim)
    assert reason is None and len(known) == 12  # rebuilt: readable again


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_an_unwritable_cache_dir_is_one_line_naming_the_key(tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    cache_id = _id()
    with pytest.raises(UserError, match="set distill.cache_dir to a writable folder") as err:
        fill(CountingTeacher(), _dataset(_faces(tmp_path / "faces")), cache_id.file(tmp_path / where), cache_id)
    assert "\n" not in str(err.value) and str(tmp_path / where) in str(err.value)


def test_the_trainer_reports_a_rebuilt_cache_in_one_warning_line(tmp_path, monkeypatch):
    """Through `cached_targets` (what the trainer calls): the one-line warning, then the report line."""
    from accelerate import Accelerator

    data, lines = _faces(tmp_path / "faces"), []
    cfg = DistillConfig(teacher=str(tiny_teacher_file(tmp_path)), targets="cached", cache_dir=str(tmp_path / "c"))
    faceset = folder_faceset(str(data))
    idx = np.arange(len(faceset))
    pre = Preprocess(SIZE, [0.5] * 3, [0.5] * 3)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    try:
        args = (cfg, TinyTeacher(), faceset, idx, faceset.labels, pre, "error", acc, 0, lines.append)
        target_cache.cached_targets(*args)
        path = next(Path(cfg.cache_dir).glob("teacher-targets-*.safetensors"))
        path.write_bytes(path.read_bytes()[:40])  # truncated
        cached = target_cache.cached_targets(*args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert lines[0] == f"teacher targets: 0 cached, 12 computed (cache file {path})"
    assert lines[1].startswith("[yellow]warning:[/] teacher-target cache ") and "; rebuilt" in lines[1]
    assert all("\n" not in line for line in lines) and lines[2] == lines[0]
    assert cached.lookup(torch.tensor([3, 0])).shape == (2, 16)


def test_the_default_cache_dir_is_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert target_cache.cache_dir_of(DistillConfig(teacher="t")) == tmp_path / "xdg" / "facetrain"
    assert target_cache.cache_dir_of(DistillConfig(teacher="t", cache_dir="here")) == Path("here")


def test_config_names_the_target_source(tmp_path):
    teacher = str(tiny_teacher_file(tmp_path))
    assert load_config(None, ["--distill.teacher", teacher]).distill.targets == "online"
    for args, message in [(["--distill.targets", "fixed"], "distill.targets: unknown value 'fixed'"),
                          (["--distill.cache_dir", "x"], "distill.cache_dir: used only with distill.targets cached"),
                          (["--distill.targets", "cached", "--distill.cosine_weight", "0",
                            "--distill.relational_weight", "0"],
                           "distill.targets cached: distill.cosine_weight and distill.relational_weight are 0")]:
        with pytest.raises(UserError, match=message) as err:
            load_config(None, ["--distill.teacher", teacher, *args])
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ training


def _cached_config(tmp_path, train: dict, **distill):
    return tiny_train_config(tmp_path, {"distill": {"teacher": str(tiny_teacher_file(tmp_path)), "targets": "cached",
                                                    "cache_dir": str(tmp_path / "cache"), **distill},
                                        "train": train})


def test_cached_targets_stay_fixed_while_the_students_views_change(tmp_path, monkeypatch):
    """Two epochs: every position's target is the same each time it is drawn, though the student's augmented
    input differs; the teacher is never called during training (only to fill the cache, once per image)."""
    use_tiny_teachers(monkeypatch)
    with in_process_trainer(_cached_config(tmp_path, {}), tmp_path / "run") as trainer:
        assert trainer.cfg.data.augment.enabled
        trainer.setup()
        teacher = trainer.distiller.teacher
        assert teacher.calls == math.ceil(len(trainer.train_idx) / target_cache.EMBED_BATCH)
        seen_targets, seen_inputs = {}, {}
        lookup = trainer.distiller.cached.lookup
        monkeypatch.setattr(trainer.distiller.cached, "lookup", lambda pos: record(pos, lookup(pos)))
        inputs = []
        trainer.net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))

        def record(positions, targets):
            for p, t, x in zip(positions.tolist(), targets, inputs[-1], strict=True):
                seen_targets.setdefault(p, []).append(t.clone())
                seen_inputs.setdefault(p, []).append(x)
            return targets

        calls = teacher.calls
        for epoch in range(2):
            trainer.sampler.set_epoch(epoch)
            batches = iter(trainer.loader)
            for _ in range(trainer.steps_per_epoch):
                trainer.train_step(batches)
        assert teacher.calls == calls and set(trainer.step_terms) == {"train/loss_distill_cos",
                                                                      "train/loss_distill_rel"}
        repeated = [p for p, ts in seen_targets.items() if len(ts) > 1]
        assert len(repeated) >= 10
        for p in repeated:
            assert all(torch.equal(t, seen_targets[p][0]) for t in seen_targets[p])
            assert not torch.equal(seen_inputs[p][0], seen_inputs[p][1])  # another augmented view
        # and it is the teacher's embedding of *that* image's un-augmented view (positions index train_idx)
        plain = FaceDataset(trainer.faceset, trainer.train_idx, trainer.train_labels, eval_transform(trainer.pre),
                            "error")
        for p in repeated[:4]:
            rgb = (plain[p][0].float() / 255.0).unsqueeze(0).expand(-1, 3, -1, -1)
            want = torch.as_tensor(np.asarray(teacher.embed(rgb), dtype=np.float32))[0]
            torch.testing.assert_close(seen_targets[p][0].float().cpu(), want, rtol=1e-5, atol=1e-5)


def test_cached_targets_with_mixed_views_send_only_the_mixes_to_the_teacher(tmp_path, monkeypatch):
    """Cached targets + distill.mix (refused before): the labelled rows' targets come from the cache, the mixed
    rows' from the teacher on that very input, so per step the teacher embeds the mixes alone."""
    from facetrain.training.distill import teacher_view

    use_tiny_teachers(monkeypatch)
    cfg = _cached_config(tmp_path, {}, mix="cutmix", mix_images=3)
    with in_process_trainer(cfg, tmp_path / "run") as trainer:
        trainer.setup()
        teacher = trainer.distiller.teacher
        sizes, pairs = [], []
        embed, targets = teacher.embed, trainer.distiller.targets
        monkeypatch.setattr(teacher, "embed", lambda x: sizes.append(len(x)) or embed(x))

        def record(images, positions=None):
            out = targets(images, positions)
            pairs.append((images.detach().clone(), positions.clone(), out))
            return out

        monkeypatch.setattr(trainer.distiller, "targets", record)
        batches = iter(trainer.loader)
        for _ in range(3):
            trainer.train_step(batches)
    assert sizes == [3, 3, 3] and trainer.step_terms["train/extra_images"] == 3
    for images, positions, out in pairs:
        labelled = len(positions)
        assert len(images) == labelled + 3
        torch.testing.assert_close(out[:labelled], trainer.distiller.cached.lookup(positions).float())
        want = torch.as_tensor(np.asarray(embed(teacher_view(images[labelled:], trainer.pre)), dtype=np.float32))
        torch.testing.assert_close(out[labelled:], want, rtol=1e-5, atol=1e-5)


def test_a_fill_that_fails_on_rank_0_stops_every_rank_with_its_line(tmp_path, monkeypatch):
    """Rank 0 fills the cache while the others wait in the broadcast: its error is broadcast too, so every rank
    raises the same one line instead of waiting for a collective timeout."""
    sent = []

    class Rank0:
        is_main_process, device = True, torch.device("cpu")

    def broadcast(value, accelerator):
        sent.append(value)
        return value

    def fail(*args, **kwargs):
        raise UserError("distill.cache_dir: cannot write /x/y.safetensors (read-only file system)")

    monkeypatch.setattr(distributed, "broadcast_object", broadcast)  # main_process_result's collective
    monkeypatch.setattr(target_cache, "fill", fail)
    monkeypatch.setattr(target_cache, "FaceDataset", lambda *args: None)
    monkeypatch.setattr(target_cache, "teacher_sha256", lambda path: "a" * 64)
    cfg = DistillConfig(teacher="t.onnx", targets="cached", cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="^distill.cache_dir: cannot write"):
        target_cache.cached_targets(cfg, TinyTeacher(), None, np.arange(2), np.zeros(2), Preprocess(32, [0.5] * 3,
                                    [0.5] * 3), "error", Rank0(), 0, print)
    assert sent == [(False, "distill.cache_dir: cannot write /x/y.safetensors (read-only file system)")]


def test_a_tiny_cached_run_trains_reuses_its_cache_and_resumes_exactly(tmp_path, monkeypatch):
    """A 4-step run fills the cache (its one log line), trains (finite loss, the terms logged); a run stopped at
    step 2 and resumed reuses the cache and ends with the same weights and projection."""
    use_tiny_teachers(monkeypatch)
    cfg = _cached_config(tmp_path, {"max_steps": 4, "val_every": 4, "ckpt_every": 100, "log_every": 2,
                                    "tensorboard": True})
    full, part = tmp_path / "full", tmp_path / "part"
    first = run_train(["--config", cfg, "--train.output_dir", full])
    cache_file = next((tmp_path / "cache").glob("teacher-targets-*.safetensors"))
    assert f"teacher targets: 0 cached, 144 computed (cache file {cache_file})" in " ".join(first.stdout.split())
    losses = tb_scalars(full, "train/loss")
    assert sorted(losses) == [2, 4] and all(math.isfinite(v) for v in losses.values())
    assert sorted(tb_scalars(full, "train/loss_distill_cos")) == [2, 4]
    assert json.loads((full / "done.json").read_text())["step"] == 4
    stopped = run_train(["--config", cfg, "--train.output_dir", part, "--debug.stop_at_step", "2"])
    assert "teacher targets: 144 cached, 0 computed" in stopped.stdout
    run_train(["--config", cfg, "--train.output_dir", part, "--train.resume", "auto"])
    assert_same_checkpoint(full, part, 4)
