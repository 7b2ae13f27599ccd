"""facetrain.eval: the all-pairs and pairs-file protocols, reports, calibration, errors, DDP and the trainer.

Tiny models (timm's `test_efficientnet`, random weights, 32 px) on synthetic faces written as image folders;
the pairs-file protocol runs on the shared AT&T faces when present. Commands are called in-process through
`run_cli` (what the console scripts run), except where a real process is the point (`accelerate launch` with
2 processes, training).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import FACES, NO_SHARED_REASON, run_module, run_train, tiny_train_config
from PIL import Image
from safetensors.torch import load_file

from facetrain import eval as eval_cli
from facetrain.cli import run_cli
from facetrain.config.schema import DataConfig, ModelConfig
from facetrain.data.synthetic import render
from facetrain.evaluation.metrics import ScoreHistogram, kfold_accuracy, roc_exact, verification_metrics
from facetrain.evaluation.pictures import WORST_PAIRS, grid_size
from facetrain.evaluation.scoring import all_pair_scores, all_pairs_roc, pair_scores
from facetrain.model.bundle import load_bundle, write_bundle
from facetrain.model.files import read_bundle_meta
from facetrain.model.network import create_model, resolve_preprocess

# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process command creates its own Accelerator, as a fresh process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_bundle(directory: Path, seed: int = 0, dim: int = 16) -> Path:
    """A random-weight tiny model saved as a bundle (what training would export)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=dim)
    model = create_model(cfg)
    directory.mkdir(parents=True)
    write_bundle(directory, model, cfg, resolve_preprocess(DataConfig(image_size=32), model), {"step": 7})
    return directory


def write_faces(root: Path, counts: list[int], seed: int = 0, size: int = 40) -> Path:
    """root/<identity>/<image>.png with counts[k] synthetic images of person k."""
    for ident, count in enumerate(counts):
        folder = root / f"person{ident:02d}"
        folder.mkdir(parents=True)
        for index in range(count):
            render(seed, ident, index).resize((size, size)).save(folder / f"{index:03d}.png")
    return root


def eval_main(*args) -> int:
    return eval_cli.main([str(a) for a in args])


def cli_error(main, argv: list, capsys) -> str:
    """Run a command as its console script does; return stderr after checking it is one error line, exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("facetrain: error: "), err
    assert "Traceback" not in err
    return err


def reference_embeddings(bundle: Path, files: list[str]) -> torch.Tensor:
    """Embeddings computed independently of facetrain's data path: PIL -> RGB -> torchvision's resize,
    ToTensor and Normalize with the bundle's stored preprocessing."""
    from torchvision import transforms as T

    from facetrain.data.images import to_rgb

    model, pre, _ = load_bundle(bundle)
    transform = T.Compose([T.Resize((pre.image_size, pre.image_size), antialias=True), T.ToTensor(),
                           T.Normalize(pre.mean, pre.std)])
    batch = torch.stack([transform(to_rgb(Image.open(f))) for f in files])
    with torch.no_grad():
        return model(batch)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    # 7 people x 7 images = 49 images: 147 genuine and 1029 impostor pairs, so FAR 1e-3 is resolvable.
    return write_faces(tmp_path_factory.mktemp("faces") / "heldout", [7] * 7)


# ------------------------------------------------------------------------------------------- all pairs


def test_all_pairs_report_plots_embeddings_and_calibration(tmp_path, faces, capsys):
    bundle = make_bundle(tmp_path / "run" / "bundle")
    out = tmp_path / "eval"
    assert eval_main("--model", bundle, "--data", faces, "--output", out, "--num-workers", 0,
                     "--save-embeddings") == 0
    printed = capsys.readouterr().out
    assert "ROC AUC" in printed and "TAR @ FAR=1e-03" in printed and "all_pairs, exact ROC" in printed

    report = json.loads((out / "metrics.json").read_text())
    saved = load_file(str(out / "embeddings.safetensors"))
    files = [str(p) for p in sorted(faces.glob("*/*.png"))]
    assert report["n_images"] == 49 and report["n_identities"] == 7 and report["protocol"] == "all_pairs"

    # the embeddings are the model's on the bundle's preprocessing, in folder order
    emb, labels = saved["embeddings"], saved["labels"]
    torch.testing.assert_close(emb, reference_embeddings(bundle, files), rtol=0, atol=1e-5)
    assert labels.tolist() == [k for k in range(7) for _ in range(7)]

    # the metrics are metrics.py's on those embeddings; 1e-3 is resolvable, so it is the calibration FAR
    expected = verification_metrics(all_pairs_roc(emb, labels), target_far=1e-3)
    assert report["metrics"] == json.loads(json.dumps({**expected, "fta_rate": 0.0}))
    m = report["metrics"]
    assert (m["n_genuine"], m["n_impostor"], m["mode"]) == (147, 1029, "exact")
    assert m["tar@far=1e-04"] is None and "tar@far=1e-04" in m["tar_unavailable"][0]

    # the bundle gained the threshold for FAR 1e-3, and it keeps FAR <= 1e-3 on the raw impostor scores
    meta = read_bundle_meta(bundle)
    assert meta["threshold_far"] == 1e-3 and meta["threshold"] == m["threshold_at_target_far"]
    assert meta["threshold_calibration"]["n_impostor"] == 1029
    scores = np.concatenate([s for s, _ in all_pair_scores(emb, labels)])
    genuine = np.concatenate([g for _, g in all_pair_scores(emb, labels)])
    assert np.mean(scores[~genuine] >= meta["threshold"]) <= 1e-3
    assert np.mean(scores[genuine] >= meta["threshold"]) == pytest.approx(m["tar_at_target_far"])

    # bootstrap intervals over the 7 identities, seeded: in metrics.json, the table and next to the threshold
    iv = report["intervals"]
    assert (iv["unit"], iv["units"], iv["replicates"], iv["level"], iv["seed"]) == ("identity", 7, 1000, 0.95, 0)
    assert iv["tar_at_far"]["1e-04"] is None  # not resolvable, as its point value
    for key, (lo, hi) in [("auc", iv["auc"]), ("eer", iv["eer"]), ("tar@far=1e-03", iv["tar_at_far"]["1e-03"])]:
        assert 0.0 <= lo <= m[key] <= hi <= 1.0
    cal = meta["threshold_calibration"]
    assert cal["far_measured"] == pytest.approx(np.mean(scores[~genuine] >= meta["threshold"]))
    assert cal["far_interval"] == iv["delivered_far"] and cal["tar_interval"] == iv["tar_at_threshold"]
    assert cal["ci_level"] == 0.95 and report["calibration"]["far_interval"] == iv["delivered_far"]
    assert "95% interval" in printed and "FAR delivered" in printed

    for name in ("roc.png", "far_frr.png", "scores.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    # errors.png: the 8 worst pairs of each kind, which are the truly worst of all 1176 scores
    with Image.open(out / "errors.png") as im:
        assert im.format == "PNG" and im.size == grid_size(WORST_PAIRS, WORST_PAIRS)
    worst, t = report["worst_pairs"], meta["threshold"]
    assert worst["threshold"] == t
    i, j = np.triu_indices(49, 1)  # all_pair_scores' order: row-major upper triangle (one block)
    for kind, mask, worst_first in (("genuine", genuine, scores), ("impostor", ~genuine, -scores)):
        pick = np.argsort(worst_first[mask], kind="stable")[:WORST_PAIRS]
        assert [p["rows"] for p in worst[kind]] == np.stack([i[mask][pick], j[mask][pick]], 1).tolist()
        assert [p["score"] for p in worst[kind]] == pytest.approx(scores[mask][pick].tolist(), abs=1e-6)
        assert all(p["a"] == files[p["rows"][0]] and p["b"] == files[p["rows"][1]] for p in worst[kind])
    assert all(p["wrong"] == (p["score"] < t) for p in worst["genuine"])
    assert all(p["wrong"] == (p["score"] >= t) for p in worst["impostor"])
    args = json.loads((out / "args.json").read_text())
    assert args["data"] == str(faces) and args["calibrate"] is True

    # --no-calibrate leaves the bundle byte-identical; without --output the run goes next to the bundle
    before = (bundle / "facetrain.json").read_bytes()
    assert eval_main("--model", bundle, "--data", faces, "--num-workers", 0, "--no-calibrate",
                     "--target-far", 1e-2, "--no-plots", "--bootstrap", 0) == 0
    assert (bundle / "facetrain.json").read_bytes() == before
    (default_out,) = (tmp_path / "run").glob("eval-*-heldout")
    second = json.loads((default_out / "metrics.json").read_text())
    assert second["calibration"]["far"] == 1e-2 and second["calibration"]["written_to_bundle"] is False
    assert second["intervals"] is None and second["calibration"]["far_interval"] is None  # --bootstrap 0
    assert not list(default_out.glob("*.png"))


def test_small_sets_fall_back_to_the_smallest_resolvable_far(tmp_path, capsys):
    data = write_faces(tmp_path / "small", [4, 4, 4])  # 18 genuine, 48 impostor pairs
    bundle = make_bundle(tmp_path / "bundle")
    err = cli_error(eval_cli.main, ["--model", bundle, "--data", data, "--target-far", 1e-3], capsys)
    assert "--target-far 0.001" in err and "1,000 impostor pairs" in err and "48" in err

    assert eval_main("--model", bundle, "--data", data, "--output", tmp_path / "out", "--num-workers", 0) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["calibration"]["far"] == 1e-1 and "smallest resolvable" in report["calibration"]["far_source"]
    assert read_bundle_meta(bundle)["threshold_far"] == 1e-1
    assert [report["metrics"][f"tar@far={f:.0e}"] is None for f in (1e-1, 1e-2, 1e-3)] == [False, True, True]
    assert "n/a (< 100 impostor pairs)" in capsys.readouterr().out


def test_histogram_mode_is_reported_and_matches_the_exact_binning(tmp_path, faces, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert eval_main("--model", bundle, "--data", faces, "--output", out, "--num-workers", 0, "--roc-mode",
                     "histogram", "--no-plots", "--no-calibrate") == 0
    assert "all_pairs, histogram ROC (bin width 3.05e-05)" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["mode"] == "histogram" and m["bin_width"] == 2**-15 and m["n_impostor"] == 1029

    # The streaming kernel behind histogram mode gives exactly the counts of ScoreHistogram.add over
    # all_pair_scores: unsorted labels, uneven blocks, a duplicated image (score 1.0, the top bin edge).
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 40, (1500,), generator=gen)
    emb = torch.randn(40, 24, generator=gen)[labels] + torch.randn(1500, 24, generator=gen)
    emb[9] = emb[3]
    for block in (4096, 333):
        fast = all_pairs_roc(emb, labels, mode="histogram", block_size=block)
        hist = ScoreHistogram()
        for scores, genuine in all_pair_scores(emb, labels, block):
            hist.add(scores, genuine)
        slow = hist.roc()
        for key in ("far", "tar", "thresholds"):
            np.testing.assert_array_equal(getattr(fast, key), getattr(slow, key))


def test_metrics_and_roc_figure_go_to_tensorboard(tmp_path, faces):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle = make_bundle(tmp_path / "bundle")
    out, tb = tmp_path / "out", tmp_path / "tb"
    assert eval_main("--model", bundle, "--data", faces, "--output", out, "--num-workers", 0, "--tensorboard",
                     tb, "--no-plots") == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    for key in ("auc", "eer", "tar@far=1e-03"):
        (event,) = acc.Scalars(f"eval/{key}")
        assert event.step == 7 and event.value == pytest.approx(m[key], rel=1e-6)
    assert "eval/roc" in acc.Tags()["images"]
    # the projector: every image (49 <= PROJECTOR_MAX) with its identity and file, and a sprite of thumbnails
    assert '"eval:00007"' in (tb / "projector_config.pbtxt").read_text()
    files = tb / "00007" / "eval"
    assert len((files / "tensors.tsv").read_text().splitlines()) == 49
    metadata = (files / "metadata.tsv").read_text().splitlines()
    assert len(metadata) == 1 + 49 and metadata[1] == "person00\tperson00/000.png"
    with Image.open(files / "sprite.png") as sprite:
        assert sprite.size == (7 * 32, 7 * 32)


# ------------------------------------------------------------------------------------------ pairs file


def write_lfw_pairs(faces_root: Path, lfw_root: Path, pairs_file: Path, folds: int = 10, per_class: int = 30):
    """An LFW-layout view (symlinks <root>/<name>/<name>_0001.png) of a folder of numbered images, and a
    pairs.txt over it: `folds` folds of `per_class` genuine then `per_class` impostor lines."""
    names = sorted(p.name for p in faces_root.iterdir() if p.is_dir())
    counts = {}
    for name in names:
        files = sorted((faces_root / name).glob("*.png"), key=lambda p: int(p.stem))
        (lfw_root / name).mkdir(parents=True)
        for k, f in enumerate(files, start=1):
            (lfw_root / name / f"{name}_{k:04d}.png").symlink_to(f)
        counts[name] = len(files)
    rng = np.random.default_rng(0)
    lines, truth = [f"{folds} {per_class}"], []
    for _ in range(folds):
        for _ in range(per_class):
            name = names[rng.integers(len(names))]
            i, j = rng.choice(counts[name], 2, replace=False) + 1
            lines.append(f"{name}\t{i}\t{j}")
            truth.append((name, i, name, j, True))
        for _ in range(per_class):
            a, b = rng.choice(len(names), 2, replace=False)
            i, j = rng.integers(counts[names[a]]) + 1, rng.integers(counts[names[b]]) + 1
            lines.append(f"{names[a]}\t{i}\t{names[b]}\t{j}")
            truth.append((names[a], i, names[b], j, False))
    pairs_file.write_text("\n".join(lines) + "\n")
    return truth


@pytest.mark.faces
@pytest.mark.skipif(not FACES.is_dir(), reason=NO_SHARED_REASON)
def test_lfw_pairs_protocol_on_att_faces(tmp_path, capsys):
    lfw, pairs = tmp_path / "lfw", tmp_path / "pairs.txt"
    truth = write_lfw_pairs(FACES / "att_faces", lfw, pairs)
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert eval_main("--model", bundle, "--data", lfw, "--pairs", pairs, "--output", out, "--num-workers", 0,
                     "--save-embeddings") == 0
    assert "10-fold accuracy" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"] == "pairs_file"
    assert (report["metrics"]["n_genuine"], report["metrics"]["n_impostor"]) == (300, 300)
    assert report["intervals"]["unit"] == "pair" and report["intervals"]["units"] == 600

    # Recompute from the saved embeddings with the pairs taken from the test's own list: the CLI must have
    # mapped every line to the right two images and the right fold.
    saved = load_file(str(out / "embeddings.safetensors"))
    from safetensors import safe_open

    with safe_open(str(out / "embeddings.safetensors"), "pt") as f:
        row = {Path(p).name: k for k, p in enumerate(json.loads(f.metadata()["files"]))}
    emb = saved["embeddings"]
    ia = [row[f"{a}_{i:04d}.png"] for a, i, _, _, _ in truth]
    ib = [row[f"{b}_{j:04d}.png"] for _, _, b, j, _ in truth]
    scores = pair_scores(emb[ia], emb[ib])
    genuine = np.array([t[4] for t in truth])
    folds = np.repeat(np.arange(10), 60)
    expected = kfold_accuracy(scores, genuine, folds)
    k = report["kfold"]
    assert len(k["fold_accuracies"]) == 10
    assert k["fold_accuracies"] == pytest.approx(expected["fold_accuracies"], abs=1e-12)
    assert k["accuracy_mean"] == pytest.approx(expected["accuracy_mean"], abs=1e-12)
    assert k["accuracy_std"] == pytest.approx(expected["accuracy_std"], abs=1e-12)
    assert report["metrics"]["auc"] == pytest.approx(verification_metrics(roc_exact(scores, genuine))["auc"],
                                                     abs=1e-12)
    # the worst listed pairs, by the test's own scores
    worst = report["worst_pairs"]
    low, high = np.argsort(np.where(genuine, scores, np.inf))[:WORST_PAIRS], np.argsort(-np.where(genuine, -np.inf,
                                                                                                  scores))[:WORST_PAIRS]
    assert [p["score"] for p in worst["genuine"]] == pytest.approx(scores[low].tolist(), abs=1e-9)
    assert [p["score"] for p in worst["impostor"]] == pytest.approx(scores[high].tolist(), abs=1e-9)
    assert (out / "errors.png").is_file()
    # every image embedded once: the unique images of the pairs, no more
    assert emb.shape[0] == len({(a, i) for a, i, *_ in truth} | {(b, j) for _, _, b, j, _ in truth})


# ---------------------------------------------------------------------------------------------- errors


def test_user_errors_are_one_line_messages(tmp_path, faces, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    # a pairs file naming a missing image: a failure to acquire; under --fta error the expected path is named
    lfw = tmp_path / "lfw"
    (lfw / "ann").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(lfw / "ann" / "ann_0001.png")
    Image.new("RGB", (8, 8)).save(lfw / "ann" / "ann_0002.png")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nann 1 2\nann 1 bob 3\n")
    err = cli_error(eval_cli.main, ["--model", bundle, "--data", lfw, "--pairs", pairs, "--fta", "error"], capsys)
    assert str(lfw / "bob" / "bob_0003") in err and "(missing)" in err and "--fta nonmatch" in err
    # by default it is a failure to acquire, but the scored pairs must still hold both classes: none is left here
    err = cli_error(eval_cli.main, ["--model", bundle, "--data", lfw, "--pairs", pairs], capsys)
    assert "1 image(s) failed to acquire" in err and "too few to evaluate" in err

    # one identity: no impostor pairs
    single = tmp_path / "single"
    shutil.copytree(faces / "person00", single / "person00")
    err = cli_error(eval_cli.main, ["--model", bundle, "--data", single], capsys)
    assert "only one identity" in err and "no impostor pairs" in err

    # an image that cannot be decoded, under --fta error: named before the model loads, still one line
    broken = tmp_path / "broken"
    shutil.copytree(faces, broken)
    (broken / "person03" / "002.png").write_bytes(b"not a png at all")
    err = cli_error(eval_cli.main, ["--model", bundle, "--data", broken, "--num-workers", 1, "--output",
                                    tmp_path / "out", "--fta", "error"], capsys)
    assert f"{broken / 'person03' / '002.png'} (not_an_image)" in err and "--fta exclude" in err

    # not a model
    err = cli_error(eval_cli.main, ["--model", single, "--data", faces], capsys)
    assert "--model" in err and "not a facetrain bundle" in err


# ------------------------------------------------------------------------------- processes and training


@pytest.mark.slow
def test_two_processes_give_the_one_process_result_on_an_odd_image_count(tmp_path, capsys):
    data = write_faces(tmp_path / "odd", [7, 7, 7, 7, 9])  # 37 images: ranks embed 19 and 18
    bundle = make_bundle(tmp_path / "bundle")
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", bundle, "--data", data, "--num-workers", 0, "--save-embeddings", "--no-calibrate",
              "--batch-size", 8]
    proc = run_module("facetrain.eval", common + ["--output", two], procs=2, timeout=300)
    assert "ROC AUC" in proc.stdout and proc.stdout.count("ROC AUC") == 1  # rank 0 reports, once
    assert eval_main(*common, "--output", one) == 0

    r1, r2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
    assert r1["n_images"] == r2["n_images"] == 37
    e1, e2 = (load_file(str(d / "embeddings.safetensors")) for d in (one, two))
    assert e2["embeddings"].shape == (37, 16)
    torch.testing.assert_close(e2["embeddings"], e1["embeddings"], rtol=0, atol=1e-5)  # none dropped/duplicated
    for key, value in r1["metrics"].items():
        if isinstance(value, float):
            assert r2["metrics"][key] == pytest.approx(value, abs=1e-6), key
        else:
            assert r2["metrics"][key] == value, key


@pytest.mark.slow
@pytest.mark.parametrize("optim", [{}, {"preset": "schedulefree_adamw"}], ids=["adamw", "schedulefree"])
def test_trainer_validation_metrics_equal_eval_on_the_same_identities(tmp_path, optim):
    # schedule-free: validation scores the averaged weights (with BatchNorm statistics recomputed for them), and
    # the bundle must hold exactly those, not the training sequence the optimizer switches back to
    run = tmp_path / "run"
    run_train(["--config", tiny_train_config(tmp_path, {"optim": optim}), "--train.output_dir", run,
               "--train.max_steps", 3], timeout=300)
    meta = read_bundle_meta(run / "bundle")
    logged = meta["val_metrics"]

    # the run's identity split, from its saved config, and its validation images as files in the same order
    from facetrain.config.load import config_from_dict
    from facetrain.data.faceset import build_faceset, split_identities

    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()), "config.yaml")
    faceset = build_faceset(cfg.data)
    _, val_ids = split_identities(faceset, cfg.data)
    idx, _ = faceset.subset(val_ids)
    heldout = tmp_path / "val"
    for i in idx:
        folder = heldout / f"{int(faceset.labels[i]):04d}"
        folder.mkdir(parents=True, exist_ok=True)
        faceset.loader(int(i)).save(folder / f"{int(i):06d}.png")  # PNG: the same pixels

    out = tmp_path / "eval"
    assert eval_main("--model", run / "bundle", "--data", heldout, "--output", out, "--num-workers", 0,
                     "--batch-size", cfg.train.val_batch_size, "--no-calibrate") == 0
    report = json.loads((out / "metrics.json").read_text())
    reported = report["metrics"]
    assert reported["n_genuine"] + reported["n_impostor"] == len(idx) * (len(idx) - 1) // 2
    # the final validation's worst pairs (the bundle's step) are eval's, with the same verdicts
    validation = json.loads((run / "validation" / "worst_pairs.json").read_text())
    assert validation["threshold"] == pytest.approx(report["worst_pairs"]["threshold"], abs=1e-6)
    for kind in ("genuine", "impostor"):
        assert [(p["score"], p["wrong"]) for p in validation[kind]] == [
            (pytest.approx(p["score"], abs=1e-6), p["wrong"]) for p in report["worst_pairs"][kind]]
    for key, value in logged.items():
        assert key in reported
        if isinstance(value, float):
            assert reported[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert reported[key] == value, key


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
