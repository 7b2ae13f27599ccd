"""The fast paths must not cost correctness: bf16 autocast + channels_last give the fp32 embeddings (cosine >= 0.99
per image), `train.mixed_precision: auto` picks them where they are faster, augmenting at the image's own
resolution gives the same augmentation, and the other switches (DataLoader prefetch, the OpenMP wait policy,
torch.compile on a machine that cannot compile) work or fail with one line.

    python -m pytest -q tests/test_precision.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import FACES, REPO, WEIGHTS, run_train, subprocess_env, tiny_train_config

from facetrain.config.schema import AugmentConfig, ModelConfig
from facetrain.data.dataset import FaceDataset
from facetrain.data.faceset import folder_faceset, synthetic_faceset
from facetrain.data.images import Preprocess, to_rgb
from facetrain.data.transforms import ToModelInput, collate, eval_transform, train_transform
from facetrain.evaluation.embedding import embed_dataset
from facetrain.model.network import create_model, resolve_preprocess
from facetrain.runtime import precision

FACE_SIZE = 224  # tf_efficientnet_lite0's own input size, and the size where bf16 is used on CPUs


@pytest.fixture
def fresh_accelerator():
    """Accelerators of different precisions in one process: accelerate keeps a process-wide singleton."""
    AcceleratorState._reset_state(reset_partial_state=True)

    def make(precision: str) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=precision, cpu=True)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)


def face_batch(model) -> tuple[FaceDataset, Preprocess]:
    """8 fixed images, 2 of each of 4 people: real faces when ../shared exists, else built-in synthetic ones."""
    from facetrain.config.schema import DataConfig

    pre = resolve_preprocess(DataConfig(image_size=FACE_SIZE), model)
    att = FACES / "att_faces"
    faceset = folder_faceset(str(att)) if att.is_dir() else synthetic_faceset(4, 2, seed=0)
    idx = np.concatenate([np.flatnonzero(faceset.labels == ident)[:2] for ident in range(4)])
    return FaceDataset(faceset, idx, faceset.labels[idx], eval_transform(pre)), pre


def lite0(channels_last: bool):
    """tf_efficientnet_lite0 with the offline ImageNet weights when present (real features), else random ones."""
    weights = str(WEIGHTS) if WEIGHTS.is_file() else ""
    torch.manual_seed(0)
    return create_model(ModelConfig(backbone="tf_efficientnet_lite0", embedding_dim=512, pretrained=bool(weights),
                                    pretrained_file=weights, channels_last=channels_last))


def test_bf16_channels_last_embeddings_match_fp32(fresh_accelerator):
    reference = lite0(channels_last=False)
    fast = lite0(channels_last=True)
    fast.load_state_dict(reference.state_dict())  # same weights (the head is random when weights are absent)
    data, pre = face_batch(reference)

    emb32 = embed_dataset(reference, data, pre, batch_size=8, accelerator=fresh_accelerator("no"))
    emb16 = embed_dataset(fast, data, pre, batch_size=8, accelerator=fresh_accelerator("bf16"), channels_last=True)

    assert not torch.equal(emb32, emb16), "the bf16 path produced fp32's exact bits: autocast did not run"
    cosine = (emb32 * emb16).sum(1)  # both L2-normalised
    assert cosine.min() >= 0.99, f"bf16 + channels_last embeddings drift from fp32: cosine {cosine.tolist()}"
    # what verification uses: the pairwise scores agree too
    assert (emb32 @ emb32.T - emb16 @ emb16.T).abs().max() < 0.02


def test_bf16_channels_last_training_forward_matches_fp32(fresh_accelerator):
    """The trainer's own forward (train mode, under the accelerator's autocast). BatchNorm on batch statistics
    subtracts the batch mean, so bf16's relative rounding (2^-8) grows on the small residuals of similar faces:
    measured 0.973-0.987 on this batch (eval mode: >= 0.995). 0.95 still catches a broken path (fp32 parts
    run in bf16, an overflow), which lands far lower."""
    reference = lite0(channels_last=False).train()
    fast = lite0(channels_last=True).train()
    fast.load_state_dict(reference.state_dict())
    data, pre = face_batch(reference)
    images = ToModelInput(pre, "cpu")(collate([data[i][0] for i in range(len(data))]))

    emb32 = reference(images)
    accelerator = fresh_accelerator("bf16")
    with accelerator.autocast():
        emb16 = fast(images.contiguous(memory_format=torch.channels_last))

    assert emb16.dtype == torch.float32  # normalised in fp32 (model.py): the loss sees fp32 similarities
    cosine = (emb32 * emb16).sum(1)
    assert cosine.min() >= 0.95, f"bf16 training forward drifts from fp32: cosine {cosine.tolist()}"


@pytest.mark.parametrize("cpu_bf16, size, expected", [
    (True, precision.CPU_BF16_MIN_IMAGE_SIZE, "bf16"),  # large images on a bf16 CPU: the fast path
    (True, 224, "bf16"),
    (True, precision.CPU_BF16_MIN_IMAGE_SIZE - 1, "no"),  # small images: bf16 measured slower there
    (False, 224, "no"),  # no bf16 instructions: emulated bf16 would be slow
])
def test_auto_precision_on_cpu(monkeypatch, cpu_bf16, size, expected):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: cpu_bf16)
    assert precision.resolve_mixed_precision("auto", size) == expected


def test_explicit_or_launcher_precision_wins(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_mixed_precision("no", 224) == "no"  # an explicit setting is never overridden
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch --mixed_precision bf16`
    assert precision.resolve_mixed_precision("auto", 32) == "bf16"


def test_workers_with_prefetch_train_and_report_throughput(tmp_path):
    cfg = tiny_train_config(tmp_path, {"train": {"num_workers": 1, "prefetch_factor": 3, "max_steps": 4,
                                                 "log_every": 1, "val_every": 4, "ckpt_every": 4}})
    run_train(["--config", cfg, "--train.output_dir", tmp_path / "run"])
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["step"] == 4
    assert done["img_per_s"] > 0  # steady-state training img/s, warm-up window excluded


@pytest.mark.slow
def test_compile_without_a_compiler_fails_in_one_line(tmp_path):
    """model.compile on a machine whose compiler does not work: one line naming the switch, no traceback."""
    cfg = tiny_train_config(tmp_path, {"model": {"compile": True}, "train": {"max_steps": 2}})
    proc = run_train(["--config", cfg, "--train.output_dir", tmp_path / "run"], check=False,
                     env={"CXX": str(tmp_path / "no-such-compiler")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("facetrain: error:")]
    assert len(error) == 1 and "model.compile" in error[0] and "compiler" in error[0], proc.stderr[-3000:]


@pytest.mark.parametrize("module", ["train", "eval", "verify", "identify", "align", "export", "pack", "serve"])
@pytest.mark.parametrize("given, expected", [({}, ("PASSIVE", "-")), ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", "-")),
                                             ({"GOMP_SPINCOUNT": "1000"}, ("-", "1000"))])
def test_every_cli_sets_the_openmp_wait_policy_before_torch_loads(module, given, expected):
    """OpenMP reads its wait policy once, when torch loads it: every command sets PASSIVE (facetrain/runtime/threads.py:
    idle threads sleep; 25-30% faster beside another busy process, 18x on a loaded CPU) before anything imports
    torch, or it would silently do nothing. A policy the user set (OMP_WAIT_POLICY or GOMP_SPINCOUNT) wins."""
    env = subprocess_env()
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    env.update(given)
    code = (f"import os, sys; import facetrain.{module}; print(os.environ.get('OMP_WAIT_POLICY', '-'), "
            "os.environ.get('GOMP_SPINCOUNT', '-'), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*expected, "False"]  # set, and torch not loaded yet


def one_face():
    att = FACES / "att_faces"
    faceset = folder_faceset(str(att)) if att.is_dir() else synthetic_faceset(2, 2, seed=0)
    return to_rgb(faceset.loader(0))


@pytest.mark.parametrize("crop_scale_min", [0.8, 1.0])
@pytest.mark.parametrize("native", [True, False])
def test_train_images_have_the_model_input_size(native, crop_scale_min):
    small = one_face()  # 92 x 112 (96 x 96 synthetic): smaller than the input
    pre = Preprocess(FACE_SIZE, [0.5] * 3, [0.5] * 3)
    tf = train_transform(pre, AugmentConfig(native_resolution=native, crop_scale_min=crop_scale_min))
    for img in (small, small.resize((400, 480))):
        assert tf(img).shape == (3, FACE_SIZE, FACE_SIZE)


@pytest.mark.slow
def test_native_resolution_augmentation_matches_enlarging_first():
    """Augmenting before the enlargement (data.augment.native_resolution) draws the same augmentations: over 64
    draws of one face, the mean image and the pixel spread agree with the enlarge-first order."""
    img = one_face()
    pre = Preprocess(FACE_SIZE, [0.5] * 3, [0.5] * 3)
    draws = {}
    for native in (True, False):
        tf = train_transform(pre, AugmentConfig(native_resolution=native))
        torch.manual_seed(0)
        draws[native] = torch.stack([tf(img) for _ in range(64)]).float() / 127.5 - 1  # as mean = std = 0.5
    fast, reference = draws[True], draws[False]
    mean_cos = torch.nn.functional.cosine_similarity(fast.mean(0).flatten(), reference.mean(0).flatten(), dim=0)
    assert mean_cos >= 0.98
    assert abs(fast.mean() - reference.mean()) < 0.05  # normalised units (std 0.5): < 0.025 of full scale
    assert abs(fast.std() - reference.std()) < 0.05


def _random_bn_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # far from identity, as after training
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model


@pytest.mark.parametrize("backbone,freeze_stages", [("test_efficientnet", 0), ("test_resnet", 0),
                                                    ("test_efficientnet", 2)])
def test_folded_batchnorm_gives_the_same_embeddings(backbone, freeze_stages):
    from facetrain.model.network import FOLD_MIN_IMAGES, fold_batchnorm, inference_model

    torch.manual_seed(0)
    model = _random_bn_stats(create_model(ModelConfig(backbone=backbone, embedding_dim=32,
                                                      freeze_stages=freeze_stages)))
    model.train()
    folded = fold_batchnorm(model, 64)
    assert folded is not model and model.training  # a copy; the model itself is untouched
    count = lambda m: sum("BatchNorm" in type(x).__name__ for x in m.modules())  # noqa: E731
    # conv -> BatchNorm siblings are folded, frozen ones too; test_resnet's deep stem ends its Sequential in a
    # conv whose BatchNorm sits in the parent: that one stays (a pair is only folded between siblings)
    assert count(folded) == (1 if backbone == "test_resnet" else 0) < count(model)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected, got = model.eval()(x), folded(x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert inference_model(model, 64, FOLD_MIN_IMAGES - 1) is model  # too few images to repay the copy
    assert inference_model(model, 64, FOLD_MIN_IMAGES, fold=False) is model  # model.fold_batchnorm: false


def test_batchnorm_not_fed_by_the_conv_before_it_is_not_folded():
    from facetrain.model.network import fold_batchnorm

    class Crossed(torch.nn.Module):  # registered conv, bn; but the BatchNorm normalises the *input*
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)
            self.head = torch.nn.Linear(3, 4)  # facetrain's embed path reads head.out_features

        def forward(self, x):
            return self.head(self.conv(self.bn(x)).mean(dim=(2, 3)))

    model = _random_bn_stats(Crossed())
    assert fold_batchnorm(model, 16) is model  # the check caught the misplaced fold: kept as it is
