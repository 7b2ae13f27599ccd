"""Recipes benchmark: train on a few dozen to a few hundred identities, verify people never seen in training.

    python bench/recipes.py                                   # the full table: 10 min per run, 2 runs at once
    python bench/recipes.py --direction wild --rows "$(python bench/recipes.py --list-rows wild)"   # in the wild
    python bench/recipes.py --rows imagenet_112,article,facetrain --seeds 0 1 --budget-min 10
    python bench/recipes.py --rows facetrain,facetrain_no_freeze --seeds 0 --budget-min 2.5   # quick look
    python bench/recipes.py --direction att2yale --rows imagenet_112,facetrain --seeds 0       # the reverse
    python bench/recipes.py --steps article=160 facetrain=600    # pin steps measured in earlier real runs

This is a benchmark, not a test: it trains real models from ImageNet weights and takes about an hour.

Protocol (cross-dataset, never the test set for model selection):
* `yale2att` (default): train on ext_yale_b_cropped + yalefaces (53 identities, 2579 gray images; merged
  through a folder of symlinks under --work, nothing is copied), evaluate every pair of att_faces (40 other
  people, another capture: 1,800 genuine / 78,000 impostor pairs).
* `att2yale` (the reverse): train on att_faces, evaluate every pair of the merged Yale folder.
* `wild`: raw in-the-wild colour photos. ../shared/data/faces_wild/celeba_299 (299 identities, 6,300 photos) is
  aligned once with `facetrain.align` (--align-size px, 224 by default so that 224 px rows get full-resolution
  crops; reused on later runs), then split by identity with a fixed seed (--wild-split-seed 0) into 250
  training and 49 held-out identities (symlink folders, nothing copied). Tested on every pair of the 49
  held-out people (the main columns), and cross-dataset on every pair of att_faces and of the merged Yale
  folder (gray lab crops; flip test only).
Validation during training (which picks the exported best model) uses identities held out of the *training*
folder (data.val_fraction, 0.2 for the gray protocols and 0.1 for wild, data.split_seed 0: the same held-out
people for every row and seed).
The test set is only read by `facetrain.eval` after training, on the exported bundle, with --no-calibrate.
Reported: AUC, EER, TAR@FAR=1e-2 and 1e-3, best accuracy, each with the flip test (mirror image embedding
added; the default column) and without it.

CPU budget, the same for every trained row: `--budget-min` minutes (10) of *training-step* wall time on ONE
CPU thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1 in each run's environment), with `--jobs` (2) runs at once on
the 2-core machine. The budget is turned into train.max_steps per recipe before training, so each recipe's
learning-rate schedule ends where its budget does: max_steps = floor(budget / seconds-per-step). Seconds per
step come from a probe run of --probe-steps steps (same recipe, same concurrency, read from the trainer's own
train/img_per_s log; rows of the same compute class share the median of their probes), or are pinned with
`--steps ROW=N` from the step times of earlier real runs: on a machine shared with other jobs a 12-step probe
can be several times off (docs/recipes.md says which was used for the published table). Validation,
checkpointing and the final evaluation are not counted; the measured training-step seconds of every real run
are reported next to its steps (`train s`). Row `imagenet_*` trains nothing: its bundle is the ImageNet
backbone with an identity head (1280-d pooled features, L2-normalised), evaluated exactly like trained bundles.

Results: <work>/<direction>/results.json and results.md (a markdown table; the mean and both seeds).
Cross-dataset columns (wild): AUC / TAR@FAR=1e-2 on att_faces and Yale, flip test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "faces"
WILD = REPO.parent / "shared" / "data" / "faces_wild" / "celeba_299"
WILD_TEST_IDENTITIES = 49
DOMAIN_TEST_IDENTITIES = 10  # of ext_yale_b_cropped's 38: 28 train the student, 10 are held out
WEIGHTS = REPO.parent / "shared" / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
METRICS = ("auc", "eer", "tar@far=1e-02", "tar@far=1e-03", "best_accuracy")


@dataclass
class Row:
    """One line of the table: a training recipe (config file + overrides) or untrained ImageNet features."""

    describe: str
    config: str = ""
    overrides: dict = field(default_factory=dict)
    features_size: int = 0
    """> 0: no training; ImageNet pooled features at this input size (own normalisation unless overridden)."""
    onnx: str = ""
    """A downloaded face model (ONNX file) scored as it is, with `input_spec`: no training (the teacher row)."""
    input_spec: str = ""
    after: str = ""
    """Second stage: starts from this row's bundle of the same seed (model.init_from); its own budget."""

    @property
    def trains(self) -> bool:
        return not (self.features_size or self.onnx)


# The article's recipe, reproduced as written: configs/article.yaml (full fine-tuning, AdamW 1e-4 / wd 1e-5,
# triplet margin 0.1 on cosine, 224 px, 512-d, colour jitter, cosine schedule of 50 *epochs* stepped per
# epoch: constant 1e-4 within any CPU budget here) with its hard-coded ImageNet mean/std, on the same
# backbone and weights as every other row.
ARTICLE = {"model": {"backbone": "tf_efficientnet_lite0"},
           "data": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
SMALL = "configs/small_data.yaml"

ROWS: dict[str, Row] = {
    "imagenet_112": Row("(a) ImageNet features, no training, 112 px", features_size=112),
    "imagenet_224": Row("(a) ImageNet features, no training, 224 px", features_size=224),
    "imagenet_112_imagenet_norm": Row("(a) at 112 px with ImageNet mean/std instead of the backbone's own",
                                      overrides={"data": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}},
                                      features_size=112),
    "article": Row("(b) article recipe (ImageNet mean/std, full fine-tune, AdamW 1e-4, triplet 0.1, 224 px)",
                   "configs/article.yaml", ARTICLE),
    "facetrain": Row("(c) facetrain configs/small_data.yaml", SMALL),
    # ablations: the facetrain recipe with one choice changed
    "facetrain_no_freeze_bn": Row("(c) with BatchNorm statistics updated by the training batches", SMALL,
                                  {"model": {"freeze_bn": False}}),
    "facetrain_freeze3": Row("(c) with only the stem + 2 stages frozen (model.freeze_stages 3)", SMALL,
                             {"model": {"freeze_stages": 3}}),
    "facetrain_no_freeze": Row("(c) with no frozen stage (model.freeze_stages 0)", SMALL,
                               {"model": {"freeze_stages": 0}}),
    "facetrain_freeze_all": Row("(c) with the whole backbone frozen (model.freeze_stages -1)", SMALL,
                                {"model": {"freeze_stages": -1}}),
    "facetrain_imagenet_norm": Row("(c) with ImageNet mean/std instead of the backbone's own", SMALL,
                                   {"data": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}),
    "facetrain_triplet": Row("(c) with triplet loss margin 0.1, no miner (the article's loss)", SMALL,
                             {"loss": {"name": "triplet", "margin": 0.1, "miner": "none"}}),
    "facetrain_arcface": Row("(c) with ArcFace (0.5 rad, scale 30)", SMALL,
                             {"loss": {"name": "arcface", "miner": "none"}}),
    "facetrain_backbone_lr1": Row("(c) with the backbone at the head's lr (optim.backbone_lr_mult 1)", SMALL,
                                  {"optim": {"backbone_lr_mult": 1.0}}),
    "facetrain_ema": Row("(c) with weight EMA (train.ema_decay 0.99)", SMALL, {"train": {"ema_decay": 0.99}}),
    "facetrain_224": Row("(c) at 224 px", SMALL, {"data": {"image_size": 224}}),
    "facetrain_emb512": Row("(c) with a 512-d embedding", SMALL, {"model": {"embedding_dim": 512}}),
}
WILD_YAML = "configs/wild.yaml"
# The in-the-wild recipe (d) and its ablations: configs/wild.yaml with one choice changed.
WILD_ROWS: dict[str, Row] = {
    "wild": Row("(d) facetrain configs/wild.yaml (in-the-wild recipe)", WILD_YAML),
    # ablations: the in-the-wild recipe with one choice changed
    "wild_no_freeze_bn": Row("(d) with BatchNorm statistics updated by the training batches", WILD_YAML,
                             {"model": {"freeze_bn": False}}),
    "wild_arcface": Row("(d) with ArcFace (28.6 deg, scale 30) instead of multi-similarity", WILD_YAML,
                        {"loss": {"name": "arcface", "miner": "none"}}),
    "wild_cosface": Row("(d) with CosFace (0.35, scale 30) instead of multi-similarity", WILD_YAML,
                        {"loss": {"name": "cosface", "miner": "none"}}),
    "wild_subcenter": Row("(d) with sub-center ArcFace (3 centres, 28.6 deg, scale 30) instead of multi-similarity",
                          WILD_YAML, {"loss": {"name": "subcenter_arcface", "miner": "none"}}),
    "wild_triplet": Row("(d) with triplet loss margin 0.1 + hard miner instead of multi-similarity", WILD_YAML,
                        {"loss": {"name": "triplet", "miner": "triplet_hard"}}),
    "wild_crop08": Row("(d) with random crops of 80-100% of the area (the first draft) instead of 40-100%",
                       WILD_YAML, {"data": {"augment": {"crop_scale_min": 0.8}}}),
    "wild_crop06": Row("(d) with random crops of 60-100% of the area instead of 40-100%", WILD_YAML,
                       {"data": {"augment": {"crop_scale_min": 0.6}}}),
    "wild_gray": Row("(d) with every training image made gray (augment.grayscale 1, as small_data.yaml)",
                     WILD_YAML, {"data": {"augment": {"grayscale": 1.0}}}),
    "wild_224": Row("(d) at 224 px", WILD_YAML, {"data": {"image_size": 224}}),
    "wild_freeze6": Row("(d) with the stem + 5 stages frozen (as small_data.yaml)", WILD_YAML,
                        {"model": {"freeze_stages": 6}}),
    "wild_freeze0": Row("(d) with no frozen stage", WILD_YAML, {"model": {"freeze_stages": 0}}),
    "wild_backbone_lr01": Row("(d) with the backbone at 0.1x the head's lr (as small_data.yaml)", WILD_YAML,
                              {"optim": {"backbone_lr_mult": 0.1}}),
    "wild_emb512": Row("(d) with a 512-d embedding", WILD_YAML, {"model": {"embedding_dim": 512}}),
    "wild_ema": Row("(d) with weight EMA (train.ema_decay 0.998)", WILD_YAML, {"train": {"ema_decay": 0.998}}),
}
ROWS.update(WILD_ROWS)
SFACE = REPO.parent / "shared" / "weights" / "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SPEC = "size=112,order=rgb,range=0-255"  # from SFace's documentation (its SOURCE.txt)
DISTILL_YAML = "configs/distill.yaml"
# Learning from a face model (issue 25): the teacher alone, configs/distill.yaml, and the choices it is made of.
DISTILL_ROWS: dict[str, Row] = {
    "teacher_sface": Row("(t) SFace, the downloaded face model (the teacher), as it is", onnx=str(SFACE),
                         input_spec=SFACE_SPEC),
    "distill": Row("(e) configs/distill.yaml: wild.yaml's training + the online teacher on the student's view",
                   DISTILL_YAML),
    "distill_only": Row("(e) distillation alone (no metric loss: labels only shape the batches)", DISTILL_YAML,
                        {"distill": {"metric_weight": 0.0}}),
    "distill_ft": Row("(e) distill, then the same recipe again from distill's bundle (model.init_from)",
                      DISTILL_YAML, after="distill"),
    # distillation then fine-tuning on labels alone: the direction's labels-only recipe, started from distill's
    # bundle (its 128-d embedding: model.init_from needs the same size), the teacher no longer asked
    "distill_ft_small": Row("(e) distill, then configs/small_data.yaml (labels only, 128-d) from its bundle",
                            SMALL, {"model": {"embedding_dim": 128}}, after="distill"),
    "distill_ft_wild": Row("(e) distill, then configs/wild.yaml (labels only, 128-d) from its bundle", WILD_YAML,
                           {"model": {"embedding_dim": 128}}, after="distill"),
    "distill_cos_only": Row("(e) with the regression term alone (relational weight 0)", DISTILL_YAML,
                            {"distill": {"relational_weight": 0.0}}),
    "distill_rel_only": Row("(e) with the relational term alone (cosine weight 0)", DISTILL_YAML,
                            {"distill": {"cosine_weight": 0.0}}),
    "distill_first_draft": Row("(e) the first draft: whole network at the head's lr, labels at 0.1", DISTILL_YAML,
                               {"model": {"freeze_stages": 0}, "optim": {"backbone_lr_mult": 1.0},
                                "distill": {"metric_weight": 0.1}}),
    "distill_mixed": Row("(e) + 8 cutmix faces per step (distill.mix)", DISTILL_YAML,
                         {"distill": {"mix": "cutmix", "mix_images": 8}}),
    "distill_cached": Row("(e) cached targets: the teacher's fixed view of each image (the baseline)", DISTILL_YAML,
                          {"distill": {"targets": "cached"}}),
    # the whole network learning from the teacher (the first draft's optimiser, without its 0.1 labels): on the
    # wild protocol the student's agreement with SFace stays at 0.2-0.3 with wild.yaml's frozen stages
    "distill_cached_fullnet": Row("(e) cached targets, whole network at the head's lr", DISTILL_YAML,
                                  {"model": {"freeze_stages": 0}, "optim": {"backbone_lr_mult": 1.0},
                                   "distill": {"targets": "cached"}}),
    "distill_cached_pure": Row("(e) cached targets, whole network at the head's lr, no metric loss (the "
                               "prototype's design)", DISTILL_YAML,
                               {"model": {"freeze_stages": 0}, "optim": {"backbone_lr_mult": 1.0},
                                "distill": {"targets": "cached", "metric_weight": 0.0}}),
    "distill_cached_mixed": Row("(e) cached targets for the labelled images + 8 cutmix faces per step embedded "
                                "online (the teacher's cost paid for the new views alone)", DISTILL_YAML,
                                {"distill": {"targets": "cached", "mix": "cutmix", "mix_images": 8}}),
}
ROWS.update(DISTILL_ROWS)
DEFAULT_DOMAIN_ROWS = "teacher_sface,facetrain,distill,distill_ft"
DEFAULT_WILD_ROWS = "imagenet_112,imagenet_224,article,facetrain,wild"
DEFAULT_ROWS = ("imagenet_112,imagenet_224,imagenet_112_imagenet_norm,article,facetrain,facetrain_no_freeze_bn,"
                "facetrain_freeze3,facetrain_imagenet_norm,facetrain_triplet")


# ----------------------------------------------------------------------------------------------------------
# Data: the protocol's folders


def merged_folder(work: Path, datasets: list[str]) -> Path:
    """<work>/<a+b>/<dataset>__<identity> -> symlinks to the identity folders (no image is copied)."""
    out = work / "data" / "+".join(datasets)
    out.mkdir(parents=True, exist_ok=True)
    for name in datasets:
        for ident in sorted(p for p in (FACES / name).iterdir() if p.is_dir()):
            link = out / f"{name}__{ident.name}"
            if not link.exists():
                link.symlink_to(ident.resolve(), target_is_directory=True)
    return out


def aligned_wild(work: Path, size: int) -> Path:
    """celeba_299 through facetrain.align once (resumable: a rerun only checks what is already there)."""
    out = work / "data" / f"celeba_299_aligned{size}"
    if not (out / "align.json").is_file():
        print(f"aligning {WILD} -> {out} (MTCNN, {size} px; once)", flush=True)
        cmd = [sys.executable, "-m", "facetrain.align", "--input", str(WILD), "--output", str(out),
               "--size", str(size), "--workers", str(os.cpu_count() or 1)]
        done = subprocess.run(cmd, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"facetrain.align failed on {WILD} (rc {done.returncode})")
    return out


def identity_split(aligned: Path, work: Path, seed: int, held_out_count: int = WILD_TEST_IDENTITIES
                   ) -> tuple[Path, Path]:
    """(training folder, held-out folder): symlinks to whole identity folders, chosen by a seeded shuffle of
    the sorted identity names. No facetrain_align.json is linked in: the bench evaluates the crops themselves
    (bundles then carry no alignment recipe and eval reads the crop folders as images)."""
    import random

    idents = sorted(p.name for p in aligned.iterdir() if p.is_dir() and not p.name.startswith("."))
    random.Random(seed).shuffle(idents)
    held_out = set(idents[:held_out_count])
    folders = {}
    for part, members in (("train", [i for i in idents if i not in held_out]), ("test", sorted(held_out))):
        out = work / "data" / f"{aligned.name}_split{seed}_{part}{len(members)}"
        out.mkdir(parents=True, exist_ok=True)
        for ident in members:
            link = out / ident
            if not link.exists():
                link.symlink_to((aligned / ident).resolve(), target_is_directory=True)
        folders[part] = out
    return folders["train"], folders["test"]


@dataclass
class Protocol:
    """Where a direction trains, what it is tested on (the first test set gives the main columns)."""

    train_root: Path
    tests: dict[str, Path]
    val_fraction: float


def protocol(direction: str, work: Path, align_size: int = 224, split_seed: int = 0) -> Protocol:
    yale = merged_folder(work, ["ext_yale_b_cropped", "yalefaces"])
    att = FACES / "att_faces"
    if direction == "yale2att":
        return Protocol(yale, {"att_faces": att}, 0.2)
    if direction == "att2yale":
        return Protocol(att, {"yale": yale}, 0.2)
    if direction == "yale_domain":  # the user's own domain: tight gray crops under extreme light, unseen people
        train, test = identity_split(FACES / "ext_yale_b_cropped", work, split_seed, DOMAIN_TEST_IDENTITIES)
        return Protocol(train, {"ext_yale_b_heldout": test}, 0.2)
    train, test = identity_split(aligned_wild(work, align_size), work, split_seed)
    # 0.1 of 250 = 25 validation identities (~500 photos): enough to rank checkpoints, while 225 train
    return Protocol(train, {"celeba_heldout": test, "att_faces": att, "yale": yale}, 0.1)


# ----------------------------------------------------------------------------------------------------------
# Running: every training and evaluation is its own process with one CPU thread


def one_thread_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def flat_overrides(tree: dict, prefix: str = "") -> list[str]:
    args = []
    for key, value in tree.items():
        if isinstance(value, dict):
            args += flat_overrides(value, f"{prefix}{key}.")
        else:
            text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
            args += [f"--{prefix}{key}", text]
    return args


def run_logged(cmd: list[str], log: Path) -> float:
    """Run a command with one CPU thread, output to `log`; returns wall seconds; raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=REPO, env=one_thread_env(), stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {done.returncode}), see {log}: {' | '.join(tail)}")
    return time.perf_counter() - start


def train_cmd(row: Row, train_root: Path, out: Path, seed: int, max_steps: int, val_every: int,
              val_fraction: float = 0.2, init_from: Path | None = None) -> list[str]:
    common = {
        "data": {"source": "folder", "root": str(train_root), "val_fraction": val_fraction, "val_identities": 0,
                 "split_seed": 0, "preflight": False},
        "model": {"pretrained": True, "pretrained_file": str(WEIGHTS)},
        "train": {"seed": seed, "max_steps": max_steps, "val_every": val_every, "log_every": 4,
                  "ckpt_every": 1_000_000, "keep_last": 1, "num_workers": 0, "progress": False,
                  "tensorboard": True, "output_dir": str(out)},
    }
    if init_from is not None:  # a second stage: the first stage's bundle replaces the ImageNet weights
        common["model"]["init_from"] = str(init_from)
    return [sys.executable, "-m", "facetrain.train", "--config", str(REPO / row.config),
            *flat_overrides(common), *flat_overrides(row.overrides)]


def step_log(run_dir: Path) -> list[tuple[int, float]]:
    """(step, img/s) of each logging window, from the trainer's own TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted((run_dir / "tb").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/img_per_s" in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars("train/img_per_s")]
    return sorted(points)


def training_seconds(run_dir: Path, batch_size: int) -> tuple[float, list[float]]:
    """(training-step seconds of the whole run, seconds per step of each window) from the img/s log."""
    total, per_step, prev = 0.0, [], 0
    for step, ips in step_log(run_dir):
        seconds = batch_size * (step - prev) / max(ips, 1e-9)
        total += seconds
        per_step.append(seconds / max(1, step - prev))
        prev = step
    return total, per_step


def resolved_batch(run_dir: Path) -> int:
    """Images per step of a run, from the resolved config.yaml the trainer wrote."""
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"])


def cost_class(row: Row, train_root: Path) -> tuple:
    """What the compute of one training step depends on. Not the embedding size: the head (1280 x 256 or x 512
    weights) is a fraction of a percent of the backbone's multiply-adds, and a class of its own would hand a
    512-d row its own single probe and so a different step count (605 vs 508 in the 2026-12-01 wild run)."""
    sys.path.insert(0, str(REPO))
    from facetrain.config.load import load_config

    # which weights the backbone starts from does not change its compute (and the file need not be here)
    cfg = load_config(str(REPO / row.config), flat_overrides(row.overrides)
                      + ["--data.root", str(train_root), "--model.pretrained", "false", "--model.pretrained_file", ""])
    d = cfg.distill  # an online teacher embeds every image of every step; cached targets cost no teacher per step
    teacher = d.teacher if (d.cosine_weight or d.relational_weight) and d.targets == "online" else ""
    return (cfg.model.backbone, cfg.data.image_size, cfg.model.freeze_stages, cfg.train.batch_size,
            cfg.train.mixed_precision, teacher, d.mix_images + d.unlabelled_images)


def probe_seconds_per_step(name: str, row: Row, train_root: Path, work: Path, steps: int) -> float:
    """Seconds per optimizer step of this recipe, measured by a short run (first window = warm-up, dropped)."""
    out = work / "probe" / f"{name}-{recipe_key(row)}"
    if (out / "probe.json").is_file():
        return json.loads((out / "probe.json").read_text())["seconds_per_step"]
    if not (out / "run" / "done.json").is_file():
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = train_cmd(row, train_root, out / "run", seed=0, max_steps=steps, val_every=1_000_000)
        cmd += ["--data.val_identities", "2"]  # only the step time is read: keep its validations short
        run_logged(cmd, out / "train.log")
    _, per_step = training_seconds(out / "run", resolved_batch(out / "run"))
    value = statistics.median(per_step[1:] or per_step)
    (out / "probe.json").write_text(json.dumps({"seconds_per_step": value, "windows": per_step}))
    return value


def evaluate(bundle: Path, tests: dict[str, Path], out: Path, input_spec: str = "") -> dict:
    """facetrain's evaluator (no threshold written) on every test set: the main one (first) with and without
    the flip test, the cross-dataset ones with it. {"flip": main, "noflip": main, "cross": {name: flip}}."""
    result: dict = {"cross": {}}
    (_, main_root), *cross = tests.items()
    runs = [("flip", main_root, True, out / "eval_flip"), ("noflip", main_root, False, out / "eval_noflip")]
    runs += [(name, root, True, out / f"eval_{name}_flip") for name, root in cross]
    for key, root, flip, where in runs:
        if not (where / "metrics.json").is_file():
            cmd = [sys.executable, "-m", "facetrain.eval", "--model", str(bundle), "--data", str(root),
                   "--no-calibrate", "--no-plots", "--num-workers", "0", "--output", str(where)]
            cmd += ["--input-spec", input_spec, "--aligned"] if input_spec else []  # the folders hold crops
            run_logged(cmd + (["--flip"] if flip else []), where.with_suffix(".log"))
        metrics = json.loads((where / "metrics.json").read_text())["metrics"]
        values = {k: metrics[k] for k in METRICS}
        if key in ("flip", "noflip"):
            result[key] = values
        else:
            result["cross"][key] = values
    return result


def features_bundle(row: Row, out: Path) -> Path:
    """A facetrain bundle whose embedding is the pretrained backbone's pooled features, L2-normalised: the
    head is a square identity matrix with zero bias, so eval/verify read it like any trained bundle."""
    sys.path.insert(0, str(REPO))
    import torch

    from facetrain.config.schema import DataConfig, ModelConfig
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import EmbeddingModel, create_backbone, resolve_preprocess

    bundle = out / "bundle"
    if (bundle / "model.safetensors").is_file():
        return bundle
    mcfg = ModelConfig(backbone="tf_efficientnet_lite0", pretrained=True, pretrained_file=str(WEIGHTS))
    backbone = create_backbone(mcfg)
    model = EmbeddingModel(backbone, backbone.num_features)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(backbone.num_features))
        model.head.bias.zero_()
    data = DataConfig(image_size=row.features_size, **row.overrides.get("data", {}))
    pre = resolve_preprocess(data, model)
    mcfg.embedding_dim, mcfg.pretrained, mcfg.pretrained_file = backbone.num_features, False, ""
    bundle.mkdir(parents=True, exist_ok=True)
    write_bundle(bundle, model, mcfg, pre, {"step": 0, "note": "ImageNet pooled features, identity head"})
    return bundle


@dataclass
class Job:
    name: str
    row: Row
    seed: int


def recipe_key(row: Row) -> str:
    """Short hash of what defines a row (its config file's settings and overrides): runs are reused only when
    the recipe is unchanged. The settings, not the file's text: a config's comments say why and change with
    what is measured, which must not send every run of that recipe to be trained again."""
    import hashlib

    import yaml

    settings = yaml.safe_load((REPO / row.config).read_text()) if row.config else ""
    # the fields added for distillation count only when set
    added = [v for v in (row.onnx, row.input_spec, row.after) if v]
    blob = json.dumps([settings, row.overrides, row.features_size, *added], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def run_job(job: Job, args, proto: Protocol, work: Path, steps: dict, first_stage=None) -> dict:
    """Train (unless the row trains nothing) and evaluate one row and seed; `first_stage` (a future of the
    `after` row's record, same seed) gives a second stage the bundle it starts from."""
    tag = f"seed{job.seed}-{recipe_key(job.row)}" + (f"-steps{steps[job.name]}" if job.name in steps else "")
    init_from = None
    if first_stage is not None:
        before = first_stage.result()  # submitted earlier: already running or done in this pool (no deadlock)
        init_from = Path(before["bundle"])
        tag += f"-after{before['steps']}"
    out = work / job.name / tag
    record = {"row": job.name, "seed": job.seed, "describe": job.row.describe}
    if job.row.features_size:
        record["eval"] = evaluate(features_bundle(job.row, out), proto.tests, out)
        record.update(steps=0, train_s=0.0)
        return record
    if job.row.onnx:
        record["eval"] = evaluate(Path(job.row.onnx), proto.tests, out, job.row.input_spec)
        record.update(steps=0, train_s=0.0)
        return record
    max_steps = steps[job.name]
    run = out / "train"
    done = run / "done.json"
    if not done.is_file():
        if run.exists():
            import shutil

            shutil.rmtree(run)
        val_every = max(1, math.ceil(max_steps / args.validations))
        cmd = train_cmd(job.row, proto.train_root, run, job.seed, max_steps, val_every, proto.val_fraction, init_from)
        wall = run_logged(cmd, out / "train.log")
        (out / "wall.json").write_text(json.dumps({"wall_s": wall}))
    summary = json.loads(done.read_text())
    train_s, _ = training_seconds(run, resolved_batch(run))
    record.update(steps=summary["step"], train_s=round(train_s, 1), best_step=summary["best_step"],
                  val_auc_untrained=summary["untrained"]["auc"], val_best=summary["best_metric"],
                  wall_s=json.loads((out / "wall.json").read_text())["wall_s"] if (out / "wall.json").is_file()
                  else None)
    record["bundle"] = str(run / "bundle")
    if first_stage is not None:
        record["first_stage_steps"] = before["steps"]
    record["eval"] = evaluate(run / "bundle", proto.tests, out)
    return record


# ----------------------------------------------------------------------------------------------------------
# Report


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(records: list[dict], rows: list[str], seeds: list[int], cross: list[str]) -> str:
    head = ("| row | seed | steps | train s | AUC | EER | TAR@1e-2 | TAR@1e-3 | best acc | AUC no-flip | "
            "TAR@1e-2 no-flip |" + "".join(f" {name} AUC / TAR@1e-2 |" for name in cross))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by = {(r["row"], r["seed"]): r for r in records}
    for name in rows:
        group = [by[(name, s)] for s in seeds if (name, s) in by]
        for r in group:
            f, n, c = r["eval"]["flip"], r["eval"]["noflip"], r["eval"].get("cross", {})
            lines.append(f"| {name} | {r['seed']} | {r['steps']} | {r['train_s']:.0f} | {fmt(f['auc'])} | "
                         f"{fmt(f['eer'])} | {fmt(f['tar@far=1e-02'])} | {fmt(f['tar@far=1e-03'])} | "
                         f"{fmt(f['best_accuracy'])} | {fmt(n['auc'])} | {fmt(n['tar@far=1e-02'])} |"
                         + "".join(f" {fmt(c[x]['auc'])} / {fmt(c[x]['tar@far=1e-02'])} |" if x in c else " - |"
                                   for x in cross))
        if len(group) > 1:
            keys = ("auc", "tar@far=1e-02")
            mean = {k: statistics.mean(r["eval"]["flip"][k] for r in group) for k in keys}
            spread = {k: max(r["eval"]["flip"][k] for r in group) - min(r["eval"]["flip"][k] for r in group)
                      for k in keys}
            cells = []
            for x in cross:
                if all(x in r["eval"].get("cross", {}) for r in group):
                    cells.append(" / ".join(f"{statistics.mean(r['eval']['cross'][x][k] for r in group):.4f}"
                                            for k in keys))
                else:
                    cells.append("-")
            lines.append(f"| {name} | mean (spread) | | | {mean['auc']:.4f} ({spread['auc']:.4f}) | | "
                         f"{mean['tar@far=1e-02']:.4f} ({spread['tar@far=1e-02']:.4f}) | | | | |"
                         + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help=f"comma-separated rows of: {', '.join(ROWS)} (default: "
                   f"{DEFAULT_ROWS} for the gray directions, {DEFAULT_WILD_ROWS} for wild)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train.seed values (default 0 1)")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None,
                   help="seeds for rows other than imagenet*/article/facetrain (default: --seeds)")
    p.add_argument("--budget-min", type=float, default=10.0, help="training-step minutes per run (default 10)")
    p.add_argument("--max-steps", type=int, default=0, help="fixed steps for every row instead of the budget")
    p.add_argument("--steps", nargs="+", default=[], metavar="ROW=N",
                   help="pin max_steps of a row (e.g. from the step time measured in an earlier real run)")
    p.add_argument("--probe-steps", type=int, default=12, help="steps of the step-time probe (default 12)")
    p.add_argument("--validations", type=int, default=4, help="validations per run (default 4)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each (default 2)")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config overrides for every trained row (exploration), e.g. model.freeze_stages=7")
    p.add_argument("--direction", choices=("yale2att", "att2yale", "wild", "yale_domain"), default="yale2att")
    p.add_argument("--align-size", type=int, default=224, help="wild: crop side of facetrain.align (default 224)")
    p.add_argument("--wild-split-seed", type=int, default=0,
                   help=f"wild: seed of the {WILD_TEST_IDENTITIES} held-out identities (default 0); yale_domain: of "
                   f"its {DOMAIN_TEST_IDENTITIES}")
    p.add_argument("--no-cross", action="store_true",
                   help="wild: only the held-out celeba people, not the cross-dataset gray sets (saves the "
                   "longest evaluations: the Yale folder alone is 2,579 images)")
    p.add_argument("--list-rows", choices=("gray", "wild"), default=None,
                   help="print the comma-separated names of every row for that data (for --rows) and exit")
    p.add_argument("--work", default="/tmp/facetrain_recipes", help="data links, runs and results")
    args = p.parse_args(argv)
    if args.list_rows:
        wild = args.list_rows == "wild"
        print(",".join(n for n in ROWS if (n in WILD_ROWS) == wild or n in ("imagenet_112", "imagenet_224",
                                                                             "article", "facetrain")))
        return 0
    if args.rows is None:
        args.rows = {"wild": DEFAULT_WILD_ROWS, "yale_domain": DEFAULT_DOMAIN_ROWS}.get(args.direction, DEFAULT_ROWS)

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    for name in rows:  # a second stage runs after its first, in the same run
        after = ROWS[name].after
        if after and (after not in rows or rows.index(after) > rows.index(name)):
            p.error(f"row {name} starts from row {after}'s bundle: list {after} before it in --rows")
        if after and not ROWS[after].trains:
            p.error(f"row {name} starts from row {after}, which trains no bundle")
    for item in args.set:
        key, _, value = item.partition("=")
        if "." not in key or not value:
            p.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        for name in rows:
            if ROWS[name].trains:
                node = ROWS[name].overrides = json.loads(json.dumps(ROWS[name].overrides))
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    if not FACES.is_dir() or not WEIGHTS.is_file():
        p.error(f"needs the shared faces ({FACES}) and weights ({WEIGHTS})")
    if args.direction == "wild" and not WILD.is_dir():
        p.error(f"--direction wild needs the in-the-wild photos ({WILD})")
    work = Path(args.work) / args.direction
    proto = protocol(args.direction, Path(args.work), args.align_size, args.wild_split_seed)
    if args.no_cross:
        proto.tests = dict(list(proto.tests.items())[:1])
    train_root = proto.train_root
    main_rows = {"imagenet_112", "imagenet_224", "article", "facetrain", "wild", "distill", "distill_ft",
                 "distill_ft_small", "distill_ft_wild", "distill_cached", "distill_cached_mixed"}

    def seeds_of(name: str) -> list[int]:
        if not ROWS[name].trains:  # no training, nothing random: one evaluation
            return args.seeds[:1]
        return args.seeds if name in main_rows or args.ablation_seeds is None else args.ablation_seeds

    jobs = [Job(name, ROWS[name], seed) for name in rows for seed in seeds_of(name)]
    trained = [name for name in rows if ROWS[name].trains]
    print(f"{args.direction}: train {train_root}, test {', '.join(map(str, proto.tests.values()))}; {len(jobs)} "
          f"runs, {args.jobs} at once, "
          f"budget {args.budget_min} training-step minutes on 1 thread per run", flush=True)

    pinned = {k: int(v) for k, _, v in (item.partition("=") for item in args.steps)}
    steps: dict[str, int] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.max_steps or all(name in pinned for name in trained):
            steps = {name: pinned.get(name, args.max_steps) for name in trained}
        else:
            probes = {name: pool.submit(probe_seconds_per_step, name, ROWS[name], train_root, work,
                                        args.probe_steps) for name in trained}
            measured = {name: fut.result() for name, fut in probes.items()}
            # Rows whose steps cost the same compute (same backbone, input size, trainable stages, batch: only
            # the loss, normalisation or BatchNorm mode differ) get the median of their probes, so that load
            # from other processes during one probe does not hand one of them more steps than another.
            classes: dict[tuple, list[str]] = {}
            for name in trained:
                classes.setdefault(cost_class(ROWS[name], train_root), []).append(name)
            for members in classes.values():
                sec = statistics.median(measured[name] for name in members)
                for name in members:
                    steps[name] = pinned.get(name) or max(1, int(args.budget_min * 60 / sec))
                    print(f"  {name}: probe {measured[name]:.2f} s/step, class median {sec:.2f} -> max_steps "
                          f"{steps[name]}", flush=True)
        futures, by_job = [], {}
        for job in jobs:  # rows in --rows order: a first stage is submitted before the second stage waiting on it
            first = by_job[(job.row.after, job.seed)] if job.row.after else None  # same seeds: main_rows
            futures.append(pool.submit(run_job, job, args, proto, work, steps, first))
            by_job[(job.name, job.seed)] = futures[-1]
        records, text = [], ""
        for job, fut in zip(jobs, futures, strict=True):
            try:
                records.append(fut.result())
            except Exception as err:  # report the others; a failed row is listed, not hidden
                print(f"  {job.name} seed {job.seed}: FAILED: {err}", flush=True)
                continue
            r = records[-1]
            f = r["eval"]["flip"]
            print(f"  {job.name} seed {job.seed}: steps {r['steps']} train {r['train_s']:.0f}s  auc {f['auc']:.4f}  "
                  f"tar@1e-2 {fmt(f['tar@far=1e-02'])}  tar@1e-3 {fmt(f['tar@far=1e-03'])}", flush=True)
            text = write_results(work, args, steps, records, rows, proto)  # partial results too
    print(text)
    return 0


def write_results(work: Path, args, steps: dict, records: list[dict], rows: list[str], proto: Protocol) -> str:
    budget = (f"fixed {args.max_steps} steps per run" if args.max_steps else
              f"{args.budget_min:g} min of training-step wall time per run on 1 CPU thread (OMP_NUM_THREADS=1), "
              f"{args.jobs} runs at once")
    if args.steps:
        budget += f"; steps pinned with --steps {' '.join(args.steps)} (from measured step times)"
    all_seeds = sorted(set(args.seeds) | set(args.ablation_seeds or []))
    main_test, *cross = proto.tests
    text = (f"direction {args.direction}: train {proto.train_root.name}, test {main_test} (all pairs, flip test "
            f"unless 'no-flip'"
            + (f"; cross-dataset: {', '.join(cross)}, all pairs, flip test" if cross else "")
            + f"); budget: {budget}; max_steps per row: {steps}\n\n"
            f"{table(records, rows, all_seeds, cross)}\n")
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "steps": steps, "records": records},
                                                  indent=2))
    (work / "results.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
