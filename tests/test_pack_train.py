"""Training on a pack with augmentation on the device: resume and 2-process DDP are exact, as for folders."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import EXACT, deep_merge, load_weights, run_train, tiny_train_config, train_one_and_many

from facetrain.alignment.recipe import MARKER_FILE, MARKER_FORMAT, recipe_of_folder
from facetrain.data.packer import pack_folder
from facetrain.data.synthetic import render


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """24 synthetic colour identities x 8 images at 32 px, packed (the tiny config's data as files)."""
    root = tmp_path_factory.mktemp("packed")
    for k in range(24):
        folder = root / "faces" / f"person_{k:02d}"
        folder.mkdir(parents=True)
        for i in range(8):
            render(3, k, i, 40).save(folder / f"{i}.jpg", quality=90)
    # as facetrain.align leaves it: the bundle must record the recipe whether trained on the folder or the pack
    (root / "faces" / MARKER_FILE).write_text(json.dumps({"format": MARKER_FORMAT, "recipe": {}}))
    return pack_folder(root / "faces", root / "faces.ftpack", 32, progress=False,
                       alignment=recipe_of_folder(root / "faces"))


def packed_config(tmp_path, pack, extra: dict | None = None):
    base = {"data": {"source": "packed", "root": str(pack), "image_size": 32,
                     "augment": {"on_device": True, "hue": 0.1, "grayscale": 0.2}}}
    return tiny_train_config(tmp_path, deep_merge(base, extra or {}))


@pytest.mark.slow
def test_packed_resume_matches_uninterrupted_run_and_same_seed_same_weights(tmp_path, pack):
    # 144 training images in batches of 16: 9 steps per epoch. The run stops at step 10, in the second epoch,
    # so the resumed run must rebuild epoch 1's plan (order and augmentation seeds), not only epoch 0's.
    cfg = packed_config(tmp_path, pack, {"model": {"drop_rate": 0.2},
                                         "train": {"max_steps": 12, "val_every": 6, "ckpt_every": 100}})
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_train(["--config", cfg, "--train.output_dir", full])
    assert "18 train / 6 val identities, 144 / 48 images" in proc.stdout
    run_train(["--config", cfg, "--train.output_dir", part, "--debug.stop_at_step", "10"])
    proc = run_train(["--config", cfg, "--train.output_dir", part, "--train.resume", "auto"])
    assert "resumed from" in proc.stdout and "at step 10" in proc.stdout
    assert json.loads((full / "bundle" / "facetrain.json").read_text())["alignment"] == recipe_of_folder(
        pack.parent / "faces")
    a = load_weights(full / "checkpoints" / "step_00000012")
    b = load_weights(part / "checkpoints" / "step_00000012")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # DataLoader worker processes (each maps the pack itself) load the same batches as the main process
    workers = tmp_path / "workers"
    run_train(["--config", cfg, "--train.output_dir", workers, "--train.num_workers", "2"])
    w = load_weights(workers / "checkpoints" / "step_00000012")
    for key in a:
        torch.testing.assert_close(w[key], a[key], rtol=0, atol=1e-6, msg=key)
    # the device augmentation is on and matters: without it the weights differ
    plain = tmp_path / "plain"
    run_train(["--config", cfg, "--train.output_dir", plain, "--data.augment.enabled", "false"])
    c = load_weights(plain / "checkpoints" / "step_00000012")
    assert max((c[k].float() - a[k].float()).abs().max().item() for k in a if a[k].is_floating_point()) > 1e-3


@pytest.mark.slow
def test_packed_two_process_ddp_equals_one_process(tmp_path, pack):
    # test_train's exactness settings, but with the device augmentation on: it follows the per-slot seeds
    extra = deep_merge(EXACT, {"data": {"augment": {"enabled": True}}})
    cfg = packed_config(tmp_path, pack, extra)
    one, two = train_one_and_many(cfg, tmp_path, 16, 2)
    w1, w2 = load_weights(one / "bundle"), load_weights(two / "bundle")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    d1, d2 = (json.loads((d / "done.json").read_text()) for d in (one, two))
    assert d2["final"]["auc"] == pytest.approx(d1["final"]["auc"], abs=1e-4)
