"""Extra views for distillation (issue 25): faces mixed between identities (distill.mix) and faces without labels
(distill.unlabelled*) -- the mixers, the unlabelled pool and its order, the config's one-line errors, and tiny
in-process runs: the distillation terms see the labelled batch plus the extra images, the metric loss the batch
alone, and a run resumes exactly. Three processes = one: tests/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    assert_same_checkpoint,
    in_process_trainer,
    run_train,
    tb_scalars,
    tiny_teacher_file,
    tiny_train_config,
    use_tiny_teachers,
    write_faces,
)
from PIL import Image

from facetrain.config.load import load_config
from facetrain.config.schema import DistillConfig
from facetrain.data.unlabelled import PoolOrder, UnlabelledBatches, pool_positions, scan_unlabelled, unsampled_positions
from facetrain.errors import UserError
from facetrain.training.distill import teacher_view
from facetrain.training.extra_views import ExtraViews, cutmix, cutmix_boxes, draw_pairs, mix_rng, mixup

LEGACY_TEACHER = Path(__file__).parent / "data" / "legacy" / "model.onnx"  # a tiny facetrain export


# ------------------------------------------------------------------------------------------------ the mixers


def test_pairs_are_of_different_identities_and_follow_the_seed():
    labels = np.repeat(np.arange(4), 4)  # P = 4 identities x m = 4
    first, second = draw_pairs(labels, 500, np.random.default_rng(1))
    assert (labels[first] != labels[second]).all()
    assert set(first) == set(second) == set(range(16))  # every image can be either side
    again = draw_pairs(labels, 500, np.random.default_rng(1))
    assert (again[0] == first).all() and (again[1] == second).all()
    assert (draw_pairs(labels, 500, np.random.default_rng(2))[0] != first).any()


def test_mixup_blends_pixels_by_lambda():
    a, b = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)
    lam = np.array([0.0, 0.25, 1.0])
    out = mixup(a, b, lam, np.random.default_rng(0))
    torch.testing.assert_close(out[0], b[0])
    torch.testing.assert_close(out[1], 0.25 * a[1] + 0.75 * b[1])
    torch.testing.assert_close(out[2], a[2])


def test_cutmix_pastes_a_box_of_area_one_minus_lambda():
    lam = np.random.default_rng(0).beta(1.0, 1.0, size=200)
    boxes = cutmix_boxes(lam, 32, 32, np.random.default_rng(1))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    side = np.sqrt(1 - lam) * 32
    assert np.abs(h - side).max() <= 0.5 and np.abs(w - side).max() <= 0.5  # whole pixels
    # the pasted fraction of pixels is 1 - lambda up to the rounding of the sides
    a, b = torch.zeros(200, 3, 32, 32), torch.ones(200, 3, 32, 32)
    pasted = cutmix(a, b, lam, np.random.default_rng(1)).mean(dim=(1, 2, 3)).numpy()
    assert np.allclose(pasted, h * w / 32**2) and np.abs(pasted - (1 - lam)).max() < 2 * 33 / 32**2
    assert abs((pasted - (1 - lam)).mean()) < 0.005  # no bias: on average the area is 1 - lambda


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_extra_views_append_mixes_of_the_labelled_rows_by_seed(mix):
    cfg = DistillConfig(teacher="t", mix=mix, mix_images=5, mix_alpha=0.5, unlabelled_images=2)
    views = ExtraViews(cfg, seed=3, rank=1)
    images, labels = torch.rand(10, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, -1])
    out, labelled = views.inputs(images, labels, step=7, micro=0)
    assert labelled == 8 and out.shape == (15, 3, 8, 8) and torch.equal(out[:10], images)
    rng = mix_rng(3, 7, 0, 1)  # what the views drew: pairs among the 8 labelled rows, then lambda
    first, second = draw_pairs(labels[:8].numpy(), 5, rng)
    lam = rng.beta(0.5, 0.5, size=5)
    want = {"mixup": mixup, "cutmix": cutmix}[mix](images[first], images[second], lam, rng)
    torch.testing.assert_close(out[10:], want)
    torch.testing.assert_close(views.inputs(images, labels, 7, 0)[0], out)  # same seed, step, rank: same mixes
    other_rank, other_step = ExtraViews(cfg, seed=3, rank=0), views
    for other in (other_rank.inputs(images, labels, 7, 0)[0], other_step.inputs(images, labels, 8, 0)[0]):
        assert not torch.equal(other[10:], out[10:])
    assert ExtraViews(DistillConfig(), 0, 0).inputs(images, labels, 0, 0)[0] is images  # off: untouched


# ------------------------------------------------------------------------------------------------ the pool


def test_the_folder_scan_takes_every_image_at_any_depth(tmp_path):
    faces = write_faces(tmp_path / "u", 5)
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    (tmp_path / "u" / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "u" / ".hidden" / "x.png")
    assert scan_unlabelled(tmp_path / "u") == sorted(map(str, faces))


def test_unsampled_images_are_those_of_identities_below_m():
    from facetrain.data.sampler import MPerClassBatchSampler

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    m3, m1 = MPerClassBatchSampler(labels, 3, 3), MPerClassBatchSampler(labels, 1, 1)
    assert unsampled_positions(labels, m3.identities).tolist() == [3, 4, 9]
    assert pool_positions(2, labels, m3, unsampled=True).tolist() == [3, 4, 9, 10, 11]  # then the folder's
    assert pool_positions(2, labels, m3, unsampled=False).tolist() == [10, 11]
    with pytest.raises(UserError, match="distill.unlabelled_unsampled: every training identity") as err:
        pool_positions(0, labels, m1, unsampled=True)
    assert "\n" not in str(err.value)


def test_the_pool_order_shows_every_image_once_per_pool_epoch():
    order = PoolOrder(7, seed=5)
    items, seeds = order.slots(0, 21)
    for epoch in range(3):
        assert sorted(items[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert items[:7] != items[7:14]  # a new permutation each pool epoch
    assert PoolOrder(7, seed=5).slots(9, 4) == (items[9:13], seeds[9:13])  # a pure function of (seed, slot)
    assert PoolOrder(7, seed=6).slots(0, 7)[0] != items[:7]


class _Sampler:
    """The P x m sampler's interface as UnlabelledBatches reads it: epoch, start, steps_per_epoch, batches."""

    def __init__(self, steps: int):
        self.steps_per_epoch, self.epoch, self.start = steps, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        for step in range(self.start, self.steps_per_epoch):
            yield [(1000 * self.epoch + step, 0)]


def _extras(world: int, rank: int, per_rank: int, epochs: int = 2, steps: int = 3) -> list[list[tuple[int, int]]]:
    sampler = _Sampler(steps)
    batches = UnlabelledBatches(sampler, np.arange(100, 111), per_rank, world, rank, seed=0)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [batch[1:] for batch in batches]
    return out


def test_ranks_share_the_one_process_order_and_a_resume_continues_it():
    one = _extras(1, 0, 6)
    ranks = [_extras(3, r, 2) for r in range(3)]
    for step, want in enumerate(one):
        assert sum((r[step] for r in ranks), []) == want  # rank r takes slots [2r, 2r + 2) of each step
    assert all(100 <= pos <= 110 for batch in one for pos, _ in batch)
    sampler = _Sampler(3)  # resumed at epoch 1, micro-step 2: the same extras as the uninterrupted run's
    sampler.set_epoch(1, start=2)
    assert [b[1:] for b in UnlabelledBatches(sampler, np.arange(100, 111), 6, 1, 0, seed=0)] == one[5:]


# ------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("overrides, message", [
    (["--distill.mix", "cutmix"], "distill.mix ('cutmix') and distill.mix_images (0): set both"),
    (["--distill.mix_images", "4"], "distill.mix ('none') and distill.mix_images (4): set both"),
    (["--distill.mix", "blend", "--distill.mix_images", "4"], "distill.mix: unknown mixer 'blend'"),
    (["--distill.mix", "mixup", "--distill.mix_images", "4", "--distill.mix_alpha", "0"],
     "distill.mix_alpha: must be > 0"),
    (["--distill.mix_alpha", "0.4"], "distill.mix_alpha: used only with distill.mix"),
    (["--distill.unlabelled_images", "3"], "distill.unlabelled_images (3): set it > 0 together with"),
    (["--distill.unlabelled_unsampled", "true"], "distill.unlabelled_images (0): set it > 0 together with"),
    (["--distill.unlabelled", "{tmp}/none", "--distill.unlabelled_images", "2"],
     "distill.unlabelled: folder not found: {tmp}/none"),
    (["--distill.unlabelled", "{tmp}/empty", "--distill.unlabelled_images", "2"],
     "distill.unlabelled: no image files under {tmp}/empty"),
    (["--distill.unlabelled", "{tmp}/faces", "--distill.unlabelled_images", "2", "--data.source", "packed",
      "--data.root", "{tmp}/x.pack"], "set data.augment.on_device false"),
    (["--distill.mix", "mixup", "--distill.mix_images", "4", "--distill.cosine_weight", "0",
      "--distill.relational_weight", "0"], "extra images feed only the distillation terms"),
])
def test_config_errors_are_one_line(tmp_path, overrides, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no faces here")
    write_faces(tmp_path / "faces", 1)
    args = ["--distill.teacher", str(tiny_teacher_file(tmp_path)), *(a.format(tmp=tmp_path) for a in overrides)]
    with pytest.raises(UserError) as err:
        load_config(None, args)
    assert message.format(tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_extra_views_need_a_teacher():
    with pytest.raises(UserError, match="distill.mix: set only with distill.teacher"):
        load_config(None, ["--distill.mix", "mixup", "--distill.mix_images", "2"])
    with pytest.raises(UserError, match="distill.unlabelled_images: set only with distill.teacher"):
        load_config(None, ["--distill.unlabelled_images", "2"])


def test_help_lists_the_new_keys():
    from facetrain.config.help import describe_keys

    text = describe_keys()
    for key in ("mix", "mix_images", "mix_alpha", "unlabelled", "unlabelled_unsampled", "unlabelled_images"):
        assert f"--distill.{key}:" in text, key


# ------------------------------------------------------------------------------------------------ training


EXTRA = {"mix": "cutmix", "mix_images": 3, "unlabelled_images": 2}


def _config(tmp_path, teacher: Path, train: dict, **distill) -> Path:
    write_faces(tmp_path / "faces", 3)
    return tiny_train_config(tmp_path, {"distill": {"teacher": str(teacher), "unlabelled": str(tmp_path / "faces"),
                                                    **EXTRA, **distill}, "train": train,
                                        "debug": {"record_samples": True}})


def test_the_distillation_terms_see_the_batch_and_its_extra_views(tmp_path, monkeypatch):
    """One step of a tiny run with 2 unlabelled and 3 cutmix images per micro-step: one student forward of 16 + 5
    rows, the teacher embeds exactly those rows, the metric loss gets the 16 labelled ones, the distillation
    terms all 21; the unlabelled rows are the folder's images, in the sample log."""
    use_tiny_teachers(monkeypatch)
    with in_process_trainer(_config(tmp_path, tiny_teacher_file(tmp_path), {}), tmp_path / "run") as trainer:
        trainer.setup()
        trainer.sampler.set_epoch(0)
        seen = {"student": [], "teacher": [], "metric": [], "terms": []}
        trainer.net.register_forward_pre_hook(lambda module, args: seen["student"].append(args[0].detach().clone()))
        teacher = trainer.distiller.teacher
        embed, metric, terms = teacher.embed, trainer.loss_fn.forward, trainer.distiller.forward
        monkeypatch.setattr(teacher, "embed", lambda images: seen["teacher"].append(images.clone()) or embed(images))
        monkeypatch.setattr(trainer.loss_fn, "forward", lambda e, lab: seen["metric"].append(lab) or metric(e, lab))
        monkeypatch.setattr(trainer.distiller, "forward", lambda s, t: seen["terms"].append((s, t)) or terms(s, t))
        trainer.train_step(iter(trainer.loader))
        (student,), (taught,), (labels,), ((s, t),) = seen["student"], seen["teacher"], seen["metric"], seen["terms"]
        assert student.shape[0] == 21 and labels.shape == (16,) and s.shape[0] == t.shape[0] == 21
        torch.testing.assert_close(taught, teacher_view(student, trainer.pre))
        assert trainer.step_terms["train/extra_images"].item() == 5
        record = json.loads((trainer.out / "samples" / "rank0.jsonl").read_text().splitlines()[0])
        assert len(record["positions"]) == 16 and len(record["unlabelled"]) == 2
        assert all(p >= len(trainer.train_idx) for p in record["unlabelled"])  # folder images follow the training set


@pytest.mark.parametrize("policy", ["error", "skip", "skip_all"])
def test_a_corrupt_unlabelled_face_is_found_before_the_first_step(tmp_path, monkeypatch, policy):
    """distill.unlabelled's files go through the pre-flight's decode check when the loaders are built: a
    truncated file stops the run with one line naming it (data.bad_images error), or is left out of the pool and
    listed in preflight_unlabelled.txt (skip); without the check it would stop the run when first drawn."""
    use_tiny_teachers(monkeypatch)
    cfg = _config(tmp_path, tiny_teacher_file(tmp_path), {})
    broken = tmp_path / "faces" / "a" / "broken.png"
    broken.write_bytes((tmp_path / "faces" / "a" / "face_0.png").read_bytes()[:80])
    if policy == "skip_all":  # every file refused: one line, not an empty pool
        for good in (tmp_path / "faces").rglob("face_*.png"):
            good.write_bytes(b"")
    cfg = tiny_train_config(tmp_path, {**yaml.safe_load(cfg.read_text()), "data": {
        **yaml.safe_load(cfg.read_text())["data"], "bad_images": policy.removesuffix("_all")}}, name="bad.yaml")
    with in_process_trainer(cfg, tmp_path / "run") as trainer:
        if policy == "skip_all":
            with pytest.raises(UserError, match=rf"^distill\.unlabelled: no usable image under {tmp_path / 'faces'} "):
                trainer.setup()
            return
        if policy == "error":
            with pytest.raises(UserError, match=rf"^distill\.unlabelled: 1 image\(s\) cannot be used: {broken} "):
                trainer.setup()
            return
        trainer.setup()
        folder = trainer.loader.dataset.folder
        assert len(folder) == 3 and str(broken) not in folder.faceset.paths
        assert str(broken) in (trainer.out / "preflight_unlabelled.txt").read_text()


def test_resume_is_exact_with_mixing_and_unlabelled_faces(tmp_path):
    """The tiny ONNX teacher (tests/data/legacy/model.onnx), cutmix + unlabelled faces: 4 steps in one go equal
    2 steps, a stop and a resume (weights, projection, the unlabelled images drawn); the extra count is logged."""
    cfg = _config(tmp_path, LEGACY_TEACHER, {"max_steps": 4, "val_every": 4, "ckpt_every": 100, "log_every": 2,
                                             "tensorboard": True}, agreement_images=0)
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(["--config", cfg, "--train.output_dir", full])
    run_train(["--config", cfg, "--train.output_dir", part, "--debug.stop_at_step", "2"])
    run_train(["--config", cfg, "--train.output_dir", part, "--train.resume", "auto"])
    assert_same_checkpoint(full, part, 4)
    drawn = [[json.loads(line)["unlabelled"] for line in (d / "samples" / "rank0.jsonl").read_text().splitlines()]
             for d in (full, part)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 4 and all(len(u) == 2 for u in drawn[0])
    assert tb_scalars(full, "train/extra_images") == {2: 5.0, 4: 5.0}


def test_unsampled_faces_of_a_pack_are_augmented_on_the_device_like_the_batch(tmp_path):
    """data.source packed with on-device augmentation: the unsampled images (identities with fewer than m) come
    from the pack after the P x m batch, and each is augmented by its own seed as it would be alone."""
    from facetrain.config.schema import Config
    from facetrain.data.device_augment import training_input
    from facetrain.data.faceset import packed_faceset
    from facetrain.data.images import Preprocess
    from facetrain.data.packer import pack_folder
    from facetrain.data.sampler import MPerClassBatchSampler
    from facetrain.data.synthetic import render
    from facetrain.data.unlabelled import unlabelled_input

    for person, count in enumerate((4, 4, 2, 1)):  # persons 2 and 3: fewer than m = 3 images, never sampled
        (tmp_path / "faces" / f"p{person}").mkdir(parents=True)
        for i in range(count):
            render(1, person, i, 24).save(tmp_path / "faces" / f"p{person}" / f"{i}.png")
    pack = pack_folder(tmp_path / "faces", tmp_path / "faces.ftpack", 16, progress=False)
    cfg = Config()
    cfg.data.source, cfg.data.root, cfg.data.image_size = "packed", str(pack), 16
    cfg.train.m, cfg.distill.unlabelled_unsampled, cfg.distill.unlabelled_images = 3, True, 2
    faceset = packed_faceset(pack, 16)
    positions, labels = np.arange(len(faceset)), faceset.labels
    pre = Preprocess(16, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    dataset, collate, to_input = training_input(faceset, positions, labels, pre, cfg.data, "cpu", False)
    sampler = MPerClassBatchSampler(labels, 3, 6)
    dataset, batches, pool = unlabelled_input(cfg, dataset, sampler, labels, pre, 1, 0)
    assert pool == 3 and type(dataset).__name__ == "PackedBatches"  # the pack itself holds them
    images, got_labels, got_positions, seeds = collate(dataset.__getitems__(next(iter(batches))))
    assert len(images) == 8 and set(got_labels[:6].tolist()) == {0, 1} and set(got_labels[6:].tolist()) <= {2, 3}
    model_input = to_input(images, seeds)
    torch.testing.assert_close(model_input[6:], to_input(images[6:], seeds[6:]))
