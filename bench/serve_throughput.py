"""Deployment benchmark: embedding through PyTorch vs onnxruntime, and the verification service under load.

    python bench/serve_throughput.py                      # writes its section of bench/RESULTS.md
    python bench/serve_throughput.py --image-size 224 --no-write --json /tmp/serve.json
    python bench/serve_throughput.py --smoke --no-write   # tiny sizes: checks the script runs, figures mean nothing

A benchmark, not a test (3-6 minutes on 2 CPU cores). One run measures, on the same machine at the same time:

* `embedding`: a bundle of tf_efficientnetv2_b0 (random weights, seed 0, 512-d; --backbone, --image-size)
  exported with facetrain.export, embedding the same (N, H, W, 3) uint8 batch of real face crops at batch 1 and
  64: PyTorch as facetrain embeds (the BatchNorm-folded copy, `data.ToModelInput` + forward, the precision
  `facetrain.eval` picks at this size, torch's default threads, OMP_WAIT_POLICY=PASSIVE) vs the exported
  graph in onnxruntime (its default threads, no spinning). Decoding and resizing are left out: they are the
  same PIL code in both. The two alternate within each round (--rounds); each figure is a median over rounds,
  the ratio the median of per-round ratios.
* `service`: `python -m facetrain.serve --model <the .onnx>` on 127.0.0.1 (a free port), no gallery;
  POST /verify with two real face files (AT&T faces, 92 x 112 PNG, base64) from 1, 4 and 16 concurrent
  clients (threads of this process, one httpx client each), --requests per client after --warmup; requests/s
  = requests / wall time of the level, latency per request measured by its client; the mean batch the server
  ran is read from its /health counters. The clients share the 2 cores with the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

# As facetrain.eval / verify / identify set it before torch loads (why: facetrain/train.py): PyTorch is measured
# the way facetrain runs it. An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))  # helpers.free_port / subprocess_env
FACES = REPO.parent / "shared" / "data" / "faces" / "att_faces"
SECTION = "Deployment: onnxruntime and the verification service"

from results_md import command_line, machine, publish  # noqa: E402  (bench/ is on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tf_efficientnetv2_b0")
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--image-size", type=int, default=112, help="model input px (default 112: the ArcFace crop)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=2.0, help="per measurement: at least this long ...")
    p.add_argument("--min-calls", type=int, default=3, help="... and at least this many calls")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=40, help="/verify requests per client per level")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests per client before each level")
    p.add_argument("--smoke", action="store_true", help="test_efficientnet at 32 px, 1 round, few requests")
    p.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    p.add_argument("--json", default="", help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.embedding_dim, args.image_size = "test_efficientnet", 32, 32
        args.rounds, args.min_seconds, args.min_calls, args.requests, args.warmup = 1, 0.2, 1, 4, 1
    return args


def face_files(n: int) -> list[Path]:
    files = sorted(FACES.glob("*/*.png"))
    if not files:
        raise SystemExit(f"bench/serve_throughput.py: no faces at {FACES} (the shared AT&T set)")
    return files[:: max(1, len(files) // n)][:n]


def make_model(args, workdir: Path) -> tuple[Path, Path]:
    from facetrain.deploy.export import export
    from facetrain.model.bundle import write_random_bundle

    bundle = write_random_bundle(workdir / "bundle", args.backbone, args.embedding_dim, args.image_size,
                                 channels_last=False)
    onnx_file = workdir / "model.onnx"
    export(bundle, onnx_file)
    return bundle, onnx_file


def timed(fn, min_seconds: float, min_calls: int) -> float:
    """Seconds per call: repeated until both minimums are met (one untimed call first)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def bench_embedding(args, bundle: Path, onnx_file: Path) -> dict:
    import numpy as np
    import torch

    from facetrain.data.images import load_image
    from facetrain.data.transforms import ToModelInput
    from facetrain.deploy.onnx_embedder import OnnxEmbedder, to_input_array
    from facetrain.model.bundle import load_bundle
    from facetrain.model.network import fold_batchnorm
    from facetrain.runtime.precision import resolve_mixed_precision

    model, pre, _ = load_bundle(bundle)
    folded = fold_batchnorm(model, pre.image_size)
    precision = resolve_mixed_precision("auto", pre.image_size)
    to_input = ToModelInput(pre, "cpu")
    ort = OnnxEmbedder.load(onnx_file, batch_size=max(int(b) for b in args.batches.split(",")))
    files = face_files(64)
    crops = np.stack([to_input_array(load_image(f, keep_gray=True), pre.image_size) for f in files])
    autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    @torch.no_grad()
    def torch_embed(batch: np.ndarray):
        x = to_input(torch.from_numpy(batch).permute(0, 3, 1, 2))
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return folded(x).float()

    rows = []
    for size in (int(b) for b in args.batches.split(",")):
        batch = np.ascontiguousarray(np.resize(crops, (size, *crops.shape[1:])))
        cos = float((ort.run(batch) * torch_embed(batch).numpy()).sum(1).min())
        per_round = []
        for _ in range(args.rounds):
            t_torch = timed(lambda b=batch: torch_embed(b), args.min_seconds, args.min_calls)
            t_ort = timed(lambda b=batch: ort.run(b), args.min_seconds, args.min_calls)
            per_round.append((size / t_torch, size / t_ort))
        rows.append({"batch": size, "torch_img_s": [r[0] for r in per_round], "ort_img_s": [r[1] for r in per_round],
                     "x_torch": statistics.median(o / t for t, o in per_round), "min_cosine": cos})
    return {"precision": precision, "torch_threads": torch.get_num_threads(), "rows": rows}


def bench_service(args, onnx_file: Path, workdir: Path) -> dict:
    import httpx
    from helpers import free_port, subprocess_env

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "facetrain.serve", "--model", str(onnx_file), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"facetrain.serve did not start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        files = face_files(32)
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
        levels = []
        for clients in (int(c) for c in args.clients.split(",")):
            def client(k: int, count: int) -> list[float]:
                latencies = []
                with httpx.Client(base_url=url, timeout=60) as c:
                    for r in range(count):
                        a, b = encoded[(k * 7 + r) % len(encoded)], encoded[(k * 13 + 3 * r + 1) % len(encoded)]
                        t0 = time.perf_counter()
                        resp = c.post("/verify", json={"image_a": a, "image_b": b})
                        latencies.append(time.perf_counter() - t0)
                        if resp.status_code != 200:
                            raise SystemExit(f"/verify answered {resp.status_code}: {resp.text[:300]}")
                return latencies

            with ThreadPoolExecutor(max_workers=clients) as pool:
                list(pool.map(lambda k: client(k, args.warmup), range(clients)))
                before = httpx.get(url + "/health").json()["batching"]
                t0 = time.perf_counter()
                lat = [x for xs in pool.map(lambda k: client(k, args.requests), range(clients)) for x in xs]
                wall = time.perf_counter() - t0
            after = httpx.get(url + "/health").json()["batching"]
            batches = max(1, after["batches"] - before["batches"])
            lat_ms = sorted(1000 * x for x in lat)
            levels.append({"clients": clients, "requests": len(lat), "wall_s": wall, "req_s": len(lat) / wall,
                           "p50_ms": lat_ms[len(lat_ms) // 2],
                           "p99_ms": lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))],
                           "mean_batch_images": (after["images"] - before["images"]) / batches})
        return {"levels": levels}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def report(args, result: dict, command: str) -> str:
    e, s = result["embedding"], result["service"]
    lines = [
        "The exported graph (facetrain.export) in onnxruntime against PyTorch as facetrain embeds, on the same "
        "uint8 batches of real face crops; then the HTTP service (facetrain.serve) under 1-16 concurrent clients.",
        "",
        f"- date: {result['date']}, {result['minutes']:.1f} min",
        f"- machine: {result['machine']}; **shared with other workers during this run** (load average 1 min "
        f"before / after: {result['load'][0]:.2f} / {result['load'][1]:.2f})",
        f"- command: `{command}`",
        f"- model: {args.backbone} (random weights), {args.embedding_dim}-d, {args.image_size} px; PyTorch: "
        f"BatchNorm folded, precision `{e['precision']}` (what facetrain.eval picks at this size), "
        f"{e['torch_threads']} threads; onnxruntime {result['ort_version']}: CPU provider, default threads; "
        f"{args.rounds} round(s), each measurement >= {args.min_seconds:g} s and >= {args.min_calls} calls",
        "",
        "| batch | PyTorch img/s (median) | per round | onnxruntime img/s (median) | per round | onnxruntime / "
        "PyTorch (median of rounds) | min cosine |",
        "|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in e["rows"]:
        lines.append(f"| {r['batch']} | {statistics.median(r['torch_img_s']):.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['torch_img_s'])} | {statistics.median(r['ort_img_s']):.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['ort_img_s'])} | {r['x_torch']:.2f}x | "
                     f"{min(r['min_cosine'], 1.0):.6f} |")
    lines += [
        "",
        f"Service: POST /verify of two AT&T face PNGs (92 x 112, base64) per request, {args.requests} requests per "
        f"client after {args.warmup} warm-up ones, default batching (5 ms window, up to 32 images); clients are "
        "threads of the benchmark process on the same 2 cores.",
        "",
        "| clients | requests | requests/s | p50 ms | p99 ms | mean images per model call |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in s["levels"]:
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['req_s']:.1f} | {lv['p50_ms']:.1f} | "
                     f"{lv['p99_ms']:.1f} | {lv['mean_batch_images']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import onnxruntime

    started = time.time()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="facetrain-bench-serve-") as tmp:
        workdir = Path(tmp)
        bundle, onnx_file = make_model(args, workdir)
        embedding = bench_embedding(args, bundle, onnx_file)
        print(json.dumps(embedding), flush=True)
        service = bench_service(args, onnx_file, workdir)
        print(json.dumps(service), flush=True)
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M (UTC)"),
              "minutes": (time.time() - started) / 60, "machine": machine(), "load": (load0, os.getloadavg()[0]),
              "ort_version": onnxruntime.__version__, "embedding": embedding, "service": service}
    publish(SECTION, report(args, result, command_line("bench/serve_throughput.py", argv)), result, args.json,
            not args.no_write)

if __name__ == "__main__":
    main()
