#!/usr/bin/env bash
# GPU check: facetrain's training step against the raw model step, eval embedding and all-pairs scoring speed,
# the distillation step, and peak GPU memory, on one CUDA GPU (written for a lent H200: 16 CPU cores, no
# network). All parts: under 15 minutes; a device command may run 10, so run them in two calls (--parts).
#
#   bash bench/gpu_check.sh             # from the repository root, on the GPU machine; prints a short table
#   bash bench/gpu_check.sh --smoke     # anywhere, CPU included: tiny sizes, exercises every part (~2-4 min)
#   bash bench/gpu_check.sh --parts train,data      # some parts only (train, data, distill, eval; default all)
#   bash bench/gpu_check.sh --parts distill,eval
#
# Parts (each under its own time limit, so one slow part cannot eat the others' time):
#   train    bench/train_throughput.py --data synthetic: raw step, raw step + facetrain's per-step guard sync,
#            and facetrain.training.trainer.train() on the built-in synthetic faces (../shared is not on that machine),
#            tf_efficientnetv2_b0 (random weights), 224 px, batch 64 and 256, fp32 and bf16 (channels_last,
#            facetrain's default layout), 5 warm-up + 20 timed steps, 2 rounds; the raw steps run inside each
#            facetrain run, between its rounds (paired); ft/raw is the median of the per-round ratios.
#   eval     facetrain.evaluation.embedding.embed_dataset (the evaluator's and validation's embedding path, eval mode, bf16 +
#            channels_last, batch 256): on pre-made tensors (the model's ceiling) and end to end from synthetic
#            images through DataLoader workers.
#   scoring  facetrain.evaluation.scoring.all_pairs_roc on 10^5 random 512-d embeddings on the GPU (5e9 pairs).
#   design   the article's evaluator design on the GPU (batch-1 fp32 forwards, one .item() per ordered pair),
#            timed on samples and scaled to 950 images, against the eval rate above + all-pairs scoring.
#   distill  bench/distill_step.py --data synthetic: facetrain's training step with and without an online teacher
#            (a random-weights facetrain bundle of tf_efficientnet_lite0 at 112 px, run in torch on the GPU: the
#            device image has no onnxruntime for the SFace file), student tf_efficientnet_lite0 112 px, batch 256.
#   data     bench/data_path.py --parts gpu: the raw step against facetrain.training.trainer.train() fed by each data
#            path (image folder + PIL augmentation in DataLoader workers, pack + PIL, pack + augmentation on
#            the GPU), tf_efficientnetv2_b0 bf16 channels_last, batch 256, 112 and 224 px, synthetic colour faces
#            written as 160 px JPEGs (3,264 images), 5 warm-up + 20 timed steps.
#
# The device image has torch, timm, accelerate, tensorboard, scikit-learn, rich and pyyaml, but not
# pytorch-metric-learning (needed: facetrain's losses), datasets, schedulefree or pytorch-ranger (imported only
# when used). Carry them as wheels in .whl/ (git-ignored) at the repository root, downloaded on a machine with
# internet for the device's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       pytorch-metric-learning schedulefree pytorch-ranger \
#       datasets pyarrow dill multiprocess xxhash fsspec pandas pytz tzdata
# (datasets' own dependencies are listed by `pip show datasets` under Requires; add any the image lacks), and
# name .whl in the run's carry list. Nothing is installed from the network here.
set -euo pipefail

SMOKE=0
PARTS=train,data,distill,eval
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) SMOKE=1; shift ;;
        --parts) PARTS="${2:?--parts needs a comma-separated list of train,data,distill,eval}"; shift 2 ;;
        *) echo "bench/gpu_check.sh: unknown argument $1 (use --smoke, --parts LIST)" >&2; exit 2 ;;
    esac
done
IFS=, read -ra SELECTED <<< "$PARTS"
for part in "${SELECTED[@]}"; do
    if [[ ! $part =~ ^(train|data|distill|eval)$ ]]; then
        echo "bench/gpu_check.sh: --parts: unknown part '$part' (use train, data, distill, eval)" >&2
        exit 2
    fi
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, timm, accelerate, pytorch_metric_learning as p; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| timm', timm.__version__, '| accelerate', \
accelerate.__version__, '| pml', p.__version__, '| cpus', len(__import__('os').sched_getaffinity(0)))"

if [[ $SMOKE == 1 ]]; then
    TRAIN_ARGS=(--smoke --batch-sizes "16,32" --modes "fp32_cl,bf16_cl")
    TRAIN_LIMIT=300
else
    TRAIN_ARGS=(--batch-sizes "64,256" --modes "fp32_cl,bf16_cl" --steps 20 --warmup 5 --rounds 2)
    TRAIN_LIMIT=330
fi

if want train; then
    echo "== train (limit ${TRAIN_LIMIT}s)"
    timeout "$TRAIN_LIMIT" python3 bench/train_throughput.py --data synthetic --variants raw,raw_guard,facetrain \
        "${TRAIN_ARGS[@]}" --no-write --json "$OUT/train.json" || echo "train part failed or timed out (rc $?)"
fi

if [[ $SMOKE == 1 ]]; then
    DATA_ARGS=(--smoke)
    DATA_LIMIT=240
else
    DATA_ARGS=(--sizes 112,224 --gpu-steps 20)
    DATA_LIMIT=240
fi
if want data; then
    echo "== data path (limit ${DATA_LIMIT}s)"
    timeout "$DATA_LIMIT" python3 bench/data_path.py --parts gpu "${DATA_ARGS[@]}" --no-write --json "$OUT/data.json" \
        || echo "data part failed or timed out (rc $?)"
fi

if [[ $SMOKE == 1 ]]; then
    DISTILL_ARGS=(--teacher-backbone test_efficientnet --backbone test_efficientnet --image-size 32 --batch 16
                  --steps 1 --rounds 1)
else
    DISTILL_ARGS=(--teacher-backbone tf_efficientnet_lite0 --backbone tf_efficientnet_lite0 --image-size 112
                  --batch 256 --steps 10 --rounds 2)
fi
if want distill; then
    echo "== distill (limit 150s)"
    timeout 150 python3 bench/distill_step.py --data synthetic "${DISTILL_ARGS[@]}" --no-write \
        --json "$OUT/distill.json" || echo "distill part failed or timed out (rc $?)"
fi

if want eval; then
echo "== eval + scoring (limit 140s)"
SMOKE=$SMOKE OUT=$OUT timeout 140 python3 - <<'PY' || echo "eval/scoring part failed or timed out (rc $?)"
import json
import os
import time

import torch
from accelerate import Accelerator

from facetrain.config.schema import ModelConfig
from facetrain.data.dataset import FaceDataset, Preprocess, default_num_workers, eval_transform, synthetic_faceset
from facetrain.evaluation.embedding import embed_dataset
from facetrain.evaluation.metrics import all_pairs_roc
from facetrain.model.network import create_model

smoke = os.environ["SMOKE"] == "1"
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
size, batch, n_images, n_scores = (32, 16, 64, 2_000) if smoke else (224, 256, 4096, 100_000)
backbone, dim = ("test_efficientnet", 32) if smoke else ("tf_efficientnetv2_b0", 512)
out = {}


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


accelerator = Accelerator(mixed_precision="bf16", cpu=not cuda)
model = create_model(ModelConfig(backbone=backbone, embedding_dim=dim, channels_last=True)).to(device).eval()

# the model's ceiling: the same embed_dataset path on a dataset of pre-made uint8 images (no decoding)
pre = Preprocess(size, [0.5] * 3, [0.5] * 3)
tensors = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8)
premade = [(tensors[i], 0) for i in range(n_images)]
embed_dataset(model, premade[: 2 * batch], pre, batch, accelerator, channels_last=True)  # warm-up (cudnn, autotune)
if cuda:
    torch.cuda.reset_peak_memory_stats()
sync()
t = time.perf_counter()
embed_dataset(model, premade, pre, batch, accelerator, channels_last=True)
sync()
out["eval_tensors_img_s"] = n_images / (time.perf_counter() - t)
out["eval_peak_gib"] = peak_gib()

# end to end from synthetic face images: rendering + resize in DataLoader workers, normalised on the device
faces = synthetic_faceset(n_images // 8, 8, seed=0)
ds = FaceDataset(faces, list(range(n_images)), faces.labels, eval_transform(pre))
workers = default_num_workers(1)
t = time.perf_counter()
embed_dataset(model, ds, pre, batch, accelerator, num_workers=workers, channels_last=True)
sync()
out["eval_images_img_s"] = n_images / (time.perf_counter() - t)
out["eval_workers"] = workers

# The reference article's evaluator design on the same device (bench/eval_throughput.py's baseline, which needs
# ../shared's faces): batch-1 fp32 NCHW forwards, then F.cosine_similarity(a, b).item() per ordered pair; timed
# on samples and scaled to 950 images, against facetrain's end-to-end embedding rate + all-pairs scoring.
n_design = 950
single = create_model(ModelConfig(backbone=backbone, embedding_dim=dim, channels_last=False)).to(device).eval()
probe = torch.randn(1, 3, size, size, device=device)
n_single = 16 if smoke else 128
with torch.inference_mode():
    for _ in range(3):
        single(probe)
    sync()
    t = time.perf_counter()
    for _ in range(n_single):
        single(probe).cpu()  # the article moves nothing to the host per image, but .item() per pair syncs anyway
    sync()
    out["design_embed_ms"] = (time.perf_counter() - t) / n_single * 1e3
    vecs = torch.nn.functional.normalize(torch.randn(64, 1, 512, device=device), dim=2)
    n_pairs = 2_000 if smoke else 20_000
    t = time.perf_counter()
    for k in range(n_pairs):
        torch.nn.functional.cosine_similarity(vecs[k % 64], vecs[(k * 7 + 1) % 64]).item()
    out["design_pair_us"] = (time.perf_counter() - t) / n_pairs * 1e6
del single
emb950 = torch.nn.functional.normalize(torch.randn(n_design, 512, device=device), dim=1)
lab950 = torch.arange(n_design, device=device) // 50
sync()
t = time.perf_counter()
all_pairs_roc(emb950, lab950)
sync()
out["design_facetrain_scoring_s"] = time.perf_counter() - t
out["design_article_s"] = (n_design * out["design_embed_ms"] / 1e3
                           + n_design * (n_design - 1) * out["design_pair_us"] / 1e6)
out["design_facetrain_s"] = n_design / out["eval_images_img_s"] + out["design_facetrain_scoring_s"]

# all-pairs scoring on the device
g = torch.Generator().manual_seed(0)
emb = torch.nn.functional.normalize(torch.randn(n_scores, 512, generator=g), dim=1).to(device)
labels = torch.randint(0, n_scores // 50, (n_scores,), generator=g).to(device)
if cuda:
    torch.cuda.reset_peak_memory_stats()
sync()
t = time.perf_counter()
roc = all_pairs_roc(emb, labels)
sync()
out["scoring_s"] = time.perf_counter() - t
out["scoring_pairs"] = roc.n_genuine + roc.n_impostor
out["scoring_mode"] = roc.mode
out["scoring_peak_gib"] = peak_gib()
out.update(n_images=n_images, n_scores=n_scores, image_size=size, batch=batch)
with open(os.path.join(os.environ["OUT"], "eval.json"), "w") as fh:
    json.dump(out, fh, indent=2)
PY
fi

echo "== summary"
OUT=$OUT PARTS=$PARTS python3 - <<'PY'
import json
import os
from pathlib import Path

out = Path(os.environ["OUT"])
parts = os.environ["PARTS"].split(",")


def missing(part: str) -> str:
    return "that part failed" if part in parts else "not in --parts"


def gib(value):
    return "n/a (no GPU)" if value != value else f"{value:.2f} GiB"  # NaN: measured on a CPU


if (out / "train.json").is_file():
    train = json.loads((out / "train.json").read_text())
    jobs = {(j["variant"], j["mode"], j["batch"]): j for j in train["jobs"]}
    print(f"training step, {train['jobs'][0]['image_size']} px, img/s (median of rounds); machine: {train['machine']}")
    print(f"{'batch':>5} {'mode':8} {'raw':>9} {'raw+guard':>10} {'facetrain':>10} {'ft/raw':>7} {'peak GiB':>9}")
    for (variant, mode, batch), j in sorted(jobs.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if variant != "raw":
            continue
        guard, ft = jobs.get(("raw_guard", mode, batch)), jobs.get(("facetrain", mode, batch))
        peaks = [x["peak_gib"] for x in (j, guard, ft) if x and x["peak_gib"] is not None]
        peak = f"{max(peaks):9.2f}" if peaks else f"{'n/a':>9}"  # GPU memory: none on a CPU
        print(f"{batch:>5} {mode:8} {j['median']:9.1f} {guard['median'] if guard else float('nan'):10.1f} "
              f"{ft['median'] if ft else float('nan'):10.1f} "
              f"{ft['x_raw'] if ft and ft.get('x_raw') is not None else float('nan'):7.2f} {peak}")
else:
    print(f"no training figures ({missing('train')})")
if (out / "eval.json").is_file():
    e = json.loads((out / "eval.json").read_text())
    print(f"eval embedding, bf16 + channels_last, {e['image_size']} px, batch {e['batch']}: "
          f"{e['eval_tensors_img_s']:.0f} img/s on pre-made tensors, {e['eval_images_img_s']:.0f} img/s from "
          f"synthetic images ({e['eval_workers']} workers); peak {gib(e['eval_peak_gib'])}")
    print(f"all-pairs scoring: {e['n_scores']:,} embeddings = {e['scoring_pairs']:,} pairs ({e['scoring_mode']}) "
          f"in {e['scoring_s']:.1f} s; peak {gib(e['scoring_peak_gib'])}")
    print(f"evaluator vs the article's design, 950 images (scaled from samples; imports and model load left out, "
          f"and the article's image loading too): "
          f"article {e['design_article_s']:.1f} s (batch-1 fp32 forward {e['design_embed_ms']:.1f} ms/image, "
          f"{e['design_pair_us']:.1f} us per ordered pair) vs facetrain {e['design_facetrain_s']:.2f} s: "
          f"{e['design_article_s'] / e['design_facetrain_s']:.1f}x")
else:
    print(f"no eval/scoring figures ({missing('eval')})")
if (out / "data.json").is_file():
    rows = json.loads((out / "data.json").read_text())["gpu"]
    print("data paths feeding the training step (img/s; x raw in brackets), bf16 + channels_last:")
    print(f"{'px':>4} {'batch':>5} {'raw':>8} {'folder+PIL':>17} {'pack+PIL':>17} {'pack+device aug':>17}")
    for r in rows:
        cells = [f"{r[k]:8.0f} ({r[k] / r['raw']:.2f})" for k in ("pil_folder", "pil_packed", "device_packed")]
        print(f"{r['size']:>4} {r['batch']:>5} {r['raw']:8.0f} " + " ".join(f"{c:>17}" for c in cells))
else:
    print(f"no data-path figures ({missing('data')})")
if (out / "distill.json").is_file():
    d = json.loads((out / "distill.json").read_text())
    print(f"distillation step: {d['student']}; teacher {d['teacher']}: {min(d['plain_s']):.3f} s/step without, "
          f"{min(d['distill_s']):.3f} s/step with the online teacher (x{min(d['ratio']):.2f} to "
          f"x{max(d['ratio']):.2f} per round)")
else:
    print(f"no distillation figures ({missing('distill')})")
print(f"raw JSON: {out}/train.json, {out}/eval.json, {out}/data.json, {out}/distill.json")
PY
