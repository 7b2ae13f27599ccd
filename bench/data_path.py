"""Data path benchmark: PIL on image files vs a pack + batched augmentation on the device (issue 18).

    python bench/data_path.py                          # cpu + train + auc parts on this machine (~15-25 min)
    python bench/data_path.py --parts cpu              # CPU time per image of each data path (~2 min)
    python bench/data_path.py --parts gpu --json x.json   # bench/gpu_check.sh: raw step vs each path on a GPU
    python bench/data_path.py --smoke                  # every part at tiny sizes, seconds to minutes

Parts:

* ``cpu``: CPU time per training image of each data path with the model removed, one thread, in this process
  (`time.process_time`), from the sampler's (position, seed) batches of 32 to the normalised model input
  (NCHW; --channels-last adds the layout conversion, the same work in every path, to each): ``pil_folder``
  (file decode + the PIL augmentation of data.train_transform + collate + ToModelInput: what every
  DataLoader worker and the training process do today), ``pil_packed`` (the same on a pack: decoding
  removed), ``device_packed`` (a pack's batch gathered from the memory map and augmented by
  facetrain/data/device_augment.py, run on this CPU) and ``packed_gather`` (only the gather: the CPU's share per
  image when the augmentation runs on a GPU). Data: att_faces from ../shared (gray 92x112 PGMs) and
  synthetic colour faces written as 160 px JPEGs; 112 and 224 px. Paths alternate within each round; the
  median of the rounds is reported, and images/s per core = 1e6 / (CPU us per image).
* ``format``: fetching a batch from the pack's memory map vs from the same images stored as a Hugging Face
  ``datasets`` table (the issue's alternative), CPU time per image.
* ``train``: facetrain.training.trainer.train() on att_faces (or synthetic faces) from the folder (PIL, the default
  worker count) and from its pack (device augmentation), tf_efficientnetv2_b0, 112 px, batch 32, fp32
  channels_last, alternating runs in one process; steady img/s from the trainer's own log windows.
* ``auc``: the same short training on att_faces from the folder and from the pack, seeds 0 and 1; the final
  validation AUC of each, and the two-seed spread.
* ``gpu`` (bench/gpu_check.sh): on a CUDA device, the raw model step (bench/train_throughput.py's RawStep,
  random tensors already on the device) against train() fed by each data path (folder + PIL, pack + PIL, pack
  + device augmentation), tf_efficientnetv2_b0 bf16 channels_last, batch 256, 112 and 224 px, synthetic colour
  faces written as 160 px JPEGs (../shared is not on a lent machine). --smoke: tiny sizes, any device.

Writes its section of bench/RESULTS.md (``--section``) unless --no-write, --smoke or --parts gpu.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as facetrain's CLIs (facetrain/train.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_md import machine, write_section  # noqa: E402

ATT_FACES = REPO.parent / "shared" / "data" / "faces" / "att_faces"
PATHS = ("pil_folder", "pil_packed", "device_packed", "packed_gather")


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def write_synthetic_folder(root: Path, identities: int, per_identity: int, size: int) -> Path:
    """Synthetic colour faces (facetrain.data.synthetic) as JPEG files: a colour set with a file decode per image."""
    from facetrain.data.synthetic import render

    for k in range(identities):
        folder = root / f"person_{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_identity):
            render(11, k, i, size).save(folder / f"{i:03d}.jpg", quality=92)
    return root


# --------------------------------------------------------------------------------------------------------------
# cpu: CPU time per image of each data path, model removed


class DataPaths:
    """The four data paths of one (folder, pack, size), each `run(batch)` -> model input."""

    def __init__(self, folder: Path, pack: Path, size: int, channels_last: bool = True):
        from facetrain.config.schema import AugmentConfig
        from facetrain.data.dataset import FaceDataset, PackedBatches
        from facetrain.data.device_augment import DeviceAugment
        from facetrain.data.faceset import folder_faceset, packed_faceset
        from facetrain.data.images import Preprocess
        from facetrain.data.transforms import ToModelInput, collate, train_transform

        pre = Preprocess(size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        aug = AugmentConfig()  # the article's augmentations, as configs/article.yaml
        self.folder, self.packed = folder_faceset(str(folder)), packed_faceset(pack, size)
        everything = np.arange(len(self.folder))
        transform = train_transform(pre, aug)
        self.pil_folder_ds = FaceDataset(self.folder, everything, self.folder.labels, transform)
        self.pil_packed_ds = FaceDataset(self.packed, everything, self.packed.labels, transform)
        self.batches = PackedBatches(self.packed.loader, everything, self.packed.labels)
        self.to_input = ToModelInput(pre, "cpu", channels_last)
        self.augment = DeviceAugment(aug, pre, "cpu", channels_last)
        self.collate = collate
        self.labels = self.folder.labels

    def run(self, path: str, items: list[tuple[int, int]]) -> torch.Tensor:
        if path == "pil_folder":
            return self.to_input(self.collate([self.pil_folder_ds[it] for it in items])[0])
        if path == "pil_packed":
            return self.to_input(self.collate([self.pil_packed_ds[it] for it in items])[0])
        images, _, _, seeds = self.batches.__getitems__(items)
        if path == "packed_gather":
            return images
        return self.augment(images, seeds)


def cpu_part(args, work: Path) -> list[dict]:
    from facetrain.data.packer import pack_folder
    from facetrain.data.sampler import MPerClassBatchSampler

    torch.set_num_threads(1)  # per core: PIL is single-threaded, and the device path is measured alike
    sets = []
    if ATT_FACES.is_dir() and not args.smoke:
        sets.append(("att_faces (gray 92x112 PGM)", ATT_FACES))
    n_ids, per = (8, 4) if args.smoke else (40, 10)
    sets.append(("synthetic colour (160 px JPEG)", write_synthetic_folder(work / "synthetic_rgb", n_ids, per, 160)))
    rows = []
    for name, folder in sets:
        for size in args.sizes:
            pack = pack_folder(folder, work / f"{folder.name}_{size}.ftpack", size, progress=False,
                               console=_quiet_console())
            paths = DataPaths(folder, pack, size, args.channels_last)
            sampler = MPerClassBatchSampler(paths.labels, 4, args.batch, seed=0)
            plan = list(sampler)
            for path in PATHS:  # warm-up: caches, page cache, allocator
                paths.run(path, plan[0])
            per_round = {p: [] for p in PATHS}
            for r in range(args.rounds):
                for path in PATHS:
                    cpu, n = 0.0, 0
                    for k in range(args.batches):
                        items = plan[(r * args.batches + k) % len(plan)]
                        start = time.process_time()
                        paths.run(path, items)
                        cpu += time.process_time() - start
                        n += len(items)
                    per_round[path].append(cpu / n * 1e6)
            row = {"set": name, "size": size, "batch": args.batch, "load": load_average()}
            for path in PATHS:
                row[f"{path}_us"] = statistics.median(per_round[path])
                row[f"{path}_range"] = (min(per_round[path]), max(per_round[path]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"), highlight=False)


# --------------------------------------------------------------------------------------------------------------
# format: the pack's memory map vs the same images in a Hugging Face datasets (Arrow) table


def format_part(args, work: Path) -> list[dict]:
    import datasets

    from facetrain.data.faceset import packed_faceset
    from facetrain.data.packer import pack_folder

    folder = ATT_FACES if ATT_FACES.is_dir() and not args.smoke else \
        write_synthetic_folder(work / "format_faces", 8, 4, 64)
    rows = []
    for size in args.sizes:
        pack = pack_folder(folder, work / f"format_{size}.ftpack", size, progress=False, console=_quiet_console())
        faces = packed_faceset(pack, size)
        images = faces.loader.batch(np.arange(len(faces)))
        features = datasets.Features({"image": datasets.Array3D(shape=images.shape[1:], dtype="uint8"),
                                      "label": datasets.Value("int64")})
        table = datasets.Dataset.from_dict({"image": list(images), "label": faces.labels.tolist()}, features=features)
        table.save_to_disk(str(work / f"arrow_{size}"))
        table = datasets.load_from_disk(str(work / f"arrow_{size}")).with_format("numpy")
        rng = np.random.default_rng(0)
        picks = [rng.choice(len(faces), min(args.batch, len(faces)), replace=False) for _ in range(20)]
        row = {"size": size, "images": len(faces)}
        for name, fetch in (("arrow", lambda i, t=table: t[i.tolist()]["image"]),
                            ("memmap", faces.loader.batch)):
            assert (np.asarray(fetch(picks[0])) == faces.loader.batch(picks[0])).all()
            start = time.process_time()
            for i in picks:
                fetch(i)
            row[f"{name}_us"] = (time.process_time() - start) / sum(len(i) for i in picks) * 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# train / auc: facetrain.training.trainer.train() from the folder and from its pack


def train_run(overrides: list[str], out: Path) -> dict:
    from accelerate.state import AcceleratorState

    from facetrain.config.load import load_config
    from facetrain.training.trainer import train

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run in this process
    cfg = load_config(None, overrides + ["--train.output_dir", str(out)])
    out.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as fh, contextlib.redirect_stdout(fh):
        summary = train(cfg)
    shutil.rmtree(out, ignore_errors=True)
    return summary


def source_overrides(kind: str, folder: Path, pack: Path) -> list[str]:
    if kind == "folder":
        return ["--data.source", "folder", "--data.root", str(folder)]
    return ["--data.source", "packed", "--data.root", str(pack), "--data.augment.on_device", "true"]


def train_part(args, work: Path) -> list[dict]:
    from facetrain.data.packer import pack_folder

    folder = ATT_FACES if ATT_FACES.is_dir() and not args.smoke else \
        write_synthetic_folder(work / "train_faces", 16, 8, 64)
    size = 32 if args.smoke else 112
    pack = pack_folder(folder, work / f"train_{size}.ftpack", size, progress=False, console=_quiet_console())
    backbone, dim = ("test_efficientnet", 32) if args.smoke else ("tf_efficientnetv2_b0", 512)
    steps = 3 if args.smoke else args.train_steps
    common = ["--data.image_size", str(size), "--data.val_identities", "4", "--model.backbone", backbone,
              "--model.embedding_dim", str(dim), "--model.channels_last", "true", "--train.mixed_precision", "no",
              "--train.batch_size", str(args.batch), "--train.m", "4", "--train.max_steps", str(steps),
              "--train.val_every", str(steps), "--train.ckpt_every", str(steps), "--train.log_every", "1",
              "--train.progress", "false", "--train.tensorboard", "false"]
    rows = []
    for r in range(1 if args.smoke else args.train_rounds):
        for kind in ("folder", "packed"):
            start = time.perf_counter()
            summary = train_run(source_overrides(kind, folder, pack) + common, work / f"train_{kind}_{r}")
            windows = summary["throughput"][2:] or summary["throughput"]  # steady: warm-up steps dropped
            ips = sum(w[1] for w in windows) / sum(w[2] for w in windows)
            rows.append({"round": r, "source": kind, "img_per_s": ips, "steps": steps, "load": load_average(),
                         "wall_s": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def auc_part(args, work: Path) -> list[dict]:
    from facetrain.data.packer import pack_folder

    folder = ATT_FACES if ATT_FACES.is_dir() and not args.smoke else \
        write_synthetic_folder(work / "auc_faces", 16, 8, 64)
    size = 32 if args.smoke else args.auc_size
    pack = pack_folder(folder, work / f"auc_{size}.ftpack", size, progress=False, console=_quiet_console())
    backbone, dim = ("test_efficientnet", 32) if args.smoke else (args.auc_backbone, 128)
    steps = 3 if args.smoke else args.auc_steps
    common = ["--data.image_size", str(size), "--data.val_identities", "4" if args.smoke else "10",
              "--model.backbone", backbone, "--model.embedding_dim", str(dim), "--optim.lr", "1e-3",
              "--train.mixed_precision", "no", "--train.batch_size", "32", "--train.m", "4",
              "--train.max_steps", str(steps), "--train.val_every", str(steps), "--train.ckpt_every", str(steps),
              "--train.progress", "false", "--train.tensorboard", "false"]
    rows = []
    for seed in (0,) if args.smoke else args.auc_seeds:
        for kind in ("folder", "packed"):
            summary = train_run(source_overrides(kind, folder, pack) + common + ["--train.seed", str(seed)],
                                work / f"auc_{kind}_{seed}")
            rows.append({"source": kind, "seed": seed, "steps": steps, "untrained_auc": summary["untrained"]["auc"],
                         "auc": summary["final"]["auc"], "eer": summary["final"]["eer"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# gpu: raw step vs each data path feeding train() on the device


def gpu_part(args, work: Path) -> list[dict]:
    from train_throughput import MODES, RawStep

    from facetrain.data.packer import pack_folder

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backbone, dim = ("test_efficientnet", 32) if args.smoke else ("tf_efficientnetv2_b0", 512)
    batch = 16 if args.smoke else 256
    sizes = [32] if args.smoke else args.sizes
    steps, warmup = (2, 1) if args.smoke else (args.gpu_steps, 5)
    ids = 2 * (batch // 4) + 8  # two batches of distinct identities per epoch, + validation
    # 24 images per identity: an epoch (13 steps at batch 256) outlasts the timed steps' DataLoader refills
    folder = write_synthetic_folder(work / "gpu_faces", ids, 8 if args.smoke else 24, 48 if args.smoke else 160)
    mode = MODES["bf16_cl"]
    rows = []
    for size in sizes:
        pack = pack_folder(folder, work / f"gpu_{size}.ftpack", size, progress=False, console=_quiet_console())
        raw = RawStep(SimpleNamespace(backbone=backbone, embedding_dim=dim), size, batch, mode, device)
        images, seconds = raw.run(warmup, steps)
        row = {"size": size, "batch": batch, "device": str(device), "raw": images / seconds}
        del raw
        if cuda:
            torch.cuda.empty_cache()
        common = ["--data.image_size", str(size), "--data.val_identities", "4", "--model.backbone", backbone,
                  "--model.embedding_dim", str(dim), "--model.pretrained", "false", "--model.channels_last", "true",
                  "--train.mixed_precision", "bf16", "--train.batch_size", str(batch), "--train.m", "4",
                  "--train.max_steps", str(warmup + steps), "--train.val_every", str(warmup + steps),
                  "--train.ckpt_every", str(warmup + steps), "--train.log_every", "1", "--train.progress", "false",
                  "--train.tensorboard", "false"]
        variants = {"pil_folder": source_overrides("folder", folder, pack),
                    "pil_packed": ["--data.source", "packed", "--data.root", str(pack),
                                   "--data.augment.on_device", "false"],
                    "device_packed": source_overrides("packed", folder, pack)}
        for name, source in variants.items():
            summary = train_run(source + common, work / f"gpu_{name}_{size}")
            windows = summary["throughput"][warmup:] or summary["throughput"]
            row[name] = sum(w[1] for w in windows) / sum(w[2] for w in windows)
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# report


def cpu_table(rows: list[dict]) -> str:
    lines = ["| data | px | PIL folder us/img | PIL on pack | pack + device aug (on this CPU) | pack gather only "
             "| img/s per core: PIL folder / pack + device | speed-up per core | load |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        pil, dev = r["pil_folder_us"], r["device_packed_us"]
        lines.append(f"| {r['set']} | {r['size']} | {pil:.0f} | {r['pil_packed_us']:.0f} | {dev:.0f} "
                     f"({r['device_packed_range'][0]:.0f}-{r['device_packed_range'][1]:.0f}) | "
                     f"{r['packed_gather_us']:.1f} | {1e6 / pil:,.0f} / {1e6 / dev:,.0f} | **{pil / dev:.1f}x** "
                     f"| {r['load']} |")
    return "\n".join(lines)


def train_table(rows: list[dict]) -> str:
    lines = ["| round | source | img/s (steady) | run wall s | load |", "|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['source']} | {r['img_per_s']:.1f} | {r['wall_s']:.0f} | {r['load']} |")
    ratios = [b["img_per_s"] / a["img_per_s"] for a, b in zip(rows[::2], rows[1::2], strict=True)]
    lines.append("")
    lines.append(f"packed / folder img/s per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    return "\n".join(lines)


def auc_table(rows: list[dict]) -> str:
    lines = ["| source | seed | steps | untrained AUC | AUC | EER |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['seed']} | {r['steps']} | {r['untrained_auc']:.4f} | {r['auc']:.4f} | "
                     f"{r['eer']:.4f} |")
    for kind in ("folder", "packed"):
        aucs = [r["auc"] for r in rows if r["source"] == kind]
        lines.append(f"| {kind} | mean (spread) | | | {statistics.mean(aucs):.4f} ({max(aucs) - min(aucs):.4f}) "
                     "| |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="cpu,format,train,auc", help="comma list of cpu, format, train, auc, gpu")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[112, 224])
    p.add_argument("--batch", type=int, default=32, help="images per batch (cpu and train parts)")
    p.add_argument("--batches", type=int, default=4, help="batches per path per round (cpu part)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (cpu part); the median is reported")
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--train-rounds", type=int, default=2)
    p.add_argument("--auc-steps", type=int, default=200)
    p.add_argument("--auc-size", type=int, default=64)
    p.add_argument("--auc-backbone", default="resnet18")
    p.add_argument("--auc-seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--channels-last", action="store_true", help="cpu part: channels_last model input (adds the "
                   "same layout conversion to every path)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path")
    p.add_argument("--section", default="Data path: PIL files vs pack + device augmentation")
    p.add_argument("--no-write", dest="write", action="store_false")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.batches, args.rounds = [32], 16, 1, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M")
    results: dict = {"machine": machine(), "date": started, "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="data_path_") as tmp:
        work = Path(tmp)
        for part in parts:
            results[part] = {"cpu": cpu_part, "format": format_part, "train": train_part, "auc": auc_part,
                             "gpu": gpu_part}[part](args, work)
    results["load_after"] = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    text = [f"Date: {started}  ", f"Machine: {results['machine']}; load average before / after "
            f"{results['load_before']} / {results['load_after']} (2-core VM shared with other workers)  ",
            f"Command: `python bench/data_path.py {shlex.join(argv if argv is not None else sys.argv[1:])}`", ""]
    if "cpu" in results:
        text += ["CPU time per training image, model removed, one thread, batches of "
                 f"{args.batch} from the sampler, to the normalised "
                 f"{'channels_last' if args.channels_last else 'NCHW'} model input (median of "
                 f"{args.rounds} rounds; device augmentation range in brackets):", "", cpu_table(results["cpu"]), ""]
    if "format" in results:
        text += ["Fetching a batch of images, CPU us per image: the pack's memory map vs the same images in a "
                 "Hugging Face datasets table (Array3D uint8, saved to disk, numpy format):", "",
                 "| px | images | memory map | datasets (Arrow) |", "|---:|---:|---:|---:|"]
        text += [f"| {r['size']} | {r['images']} | {r['memmap_us']:.1f} | {r['arrow_us']:.1f} |"
                 for r in results["format"]]
        text.append("")
    if "train" in results:
        text += ["Training step (facetrain.training.trainer.train, tf_efficientnetv2_b0, 112 px, batch "
                 f"{args.batch}, fp32 channels_last), folder vs pack runs alternating in one process:", "",
                 train_table(results["train"]), ""]
    if "auc" in results:
        text += [f"Validation AUC, att_faces, {args.auc_backbone} {args.auc_size} px, {args.auc_steps} steps, "
                 "folder (PIL) vs pack (device augmentation):", "", auc_table(results["auc"]), ""]
    if "gpu" in results:
        text += ["| px | batch | device | raw img/s | folder + PIL | pack + PIL | pack + device aug |",
                 "|---:|---:|---|---:|---:|---:|---:|"]
        for r in results["gpu"]:
            text.append(f"| {r['size']} | {r['batch']} | {r['device']} | {r['raw']:.0f} | {r['pil_folder']:.0f} | "
                        f"{r['pil_packed']:.0f} | {r['device_packed']:.0f} |")
    report = "\n".join(text)
    print(report)
    if args.write and not args.smoke and "gpu" not in parts:
        write_section(args.section, report)


if __name__ == "__main__":
    main()
