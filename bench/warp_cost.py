"""What the device path's bilinear warp costs per output pixel on this CPU, and whether a hand-written loop
would be cheaper (issue 18: why pack + device augmentation at 224 px is 4-5x the PIL path per core, not 10x).

    python bench/warp_cost.py                 # 112 and 224 px, ~1 min; writes its section of bench/RESULTS.md
    python bench/warp_cost.py --no-write

One thread, CPU time (`time.process_time`) per output pixel, the same warps (the rotation + random resized
crop + flip of facetrain/data/device_augment.py's default data.augment, batches of 32) measured in alternation:

* ``device_augment``: the whole DeviceAugment.apply on uint8 batches (warp + colour jitter + clamp +
  normalisation), what bench/data_path.py's ``device_packed`` path runs per batch.
* ``grid_sample``: torch's F.grid_sample alone on the float32 batch (the vectorised kernel the device path uses).
* ``scalar_c``: the same bilinear warp (zeros outside the image) as a plain C loop on the uint8 images, compiled
  here with ``cc -O3 -march=native -ffast-math``: what a fused hand-written kernel would start from. Skipped
  with a reason when no C compiler is on PATH. Its output is checked against grid_sample's.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))  # results_md, also when imported by tests/test_bench.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from results_md import machine, write_section  # noqa: E402

from facetrain.config.schema import AugmentConfig  # noqa: E402
from facetrain.data.device_augment import DeviceAugment, affine_grid  # noqa: E402

# Bilinear warp of C uint8 planes (H x W) to float32 planes (S x S); theta maps output to source in
# grid_sample's normalised coordinates (align_corners=False); taps outside the image read 0.
C_SOURCE = r"""
#include <stdint.h>
#include <math.h>
void warp(const uint8_t *img, int C, int H, int W, float *out, int S, const float *t) {
  for (int oy = 0; oy < S; oy++) {
    float gy = (2.0f * oy + 1.0f) / S - 1.0f;
    for (int ox = 0; ox < S; ox++) {
      float gx = (2.0f * ox + 1.0f) / S - 1.0f;
      float px = ((t[0] * gx + t[1] * gy + t[2] + 1.0f) * W - 1.0f) * 0.5f;
      float py = ((t[3] * gx + t[4] * gy + t[5] + 1.0f) * H - 1.0f) * 0.5f;
      float fx = floorf(px), fy = floorf(py);
      int x0 = (int)fx, y0 = (int)fy;
      float wx = px - fx, wy = py - fy;
      float w[4] = {(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy};
      int ok[4] = {x0 >= 0 && y0 >= 0 && x0 < W && y0 < H, x0 + 1 >= 0 && y0 >= 0 && x0 + 1 < W && y0 < H,
                   x0 >= 0 && y0 + 1 >= 0 && x0 < W && y0 + 1 < H,
                   x0 + 1 >= 0 && y0 + 1 >= 0 && x0 + 1 < W && y0 + 1 < H};
      long i = (long)y0 * W + x0;
      for (int c = 0; c < C; c++) {
        const uint8_t *p = img + (long)c * H * W;
        float v = 0.0f;
        if (ok[0]) v += w[0] * p[i];
        if (ok[1]) v += w[1] * p[i + 1];
        if (ok[2]) v += w[2] * p[i + W];
        if (ok[3]) v += w[3] * p[i + W + 1];
        out[((long)c * S + oy) * S + ox] = v;
      }
    }
  }
}
"""


def compile_scalar_c(work: Path):
    """The C warp as a ctypes function, or (None, reason)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc, gcc) on PATH"
    src, lib = work / "warp.c", work / "warp.so"
    src.write_text(C_SOURCE)
    flags = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"]
    done = subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"{cc} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    fn = ctypes.CDLL(str(lib)).warp
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p]
    return fn, ""


def scalar_c_batch(fn, images: np.ndarray, theta: np.ndarray, out: np.ndarray) -> None:
    b, c, h, w = images.shape
    size = out.shape[-1]
    for k in range(b):
        fn(images[k].ctypes.data, c, h, w, out[k].ctypes.data, size, theta[k].ctypes.data)


def cpu_ns(fn, pixels: int, min_seconds: float = 0.3) -> float:
    """CPU ns per output pixel of fn(), called until min_seconds of CPU time have passed (after a warm-up)."""
    fn()
    start, calls = time.process_time(), 0
    while time.process_time() - start < min_seconds:
        fn()
        calls += 1
    return (time.process_time() - start) / calls / pixels * 1e9


def measure(size: int, channels: int, rounds: int, fn_c) -> dict:
    aug = AugmentConfig()
    pre = SimpleNamespace(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    augment = DeviceAugment(aug, pre, "cpu")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, channels, size, size), dtype=torch.uint8, generator=gen)
    params = augment.params(np.arange(32))
    theta = np.ascontiguousarray(params.theta().astype(np.float32))
    chunk = augment.chunk  # grid_sample runs on chunks of this many images inside DeviceAugment
    floats = images[:chunk].float()
    grid = affine_grid(torch.from_numpy(theta[:chunk]), size)
    pixels_batch, pixels_chunk = 32 * size * size, chunk * size * size
    paths = {
        "device_augment": (lambda: augment.apply(images, params), pixels_batch),
        "grid_sample": (lambda: F.grid_sample(floats, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False), pixels_chunk),
    }
    row = {"size": size, "channels": channels, "chunk": chunk}
    if fn_c is not None:
        src = images.numpy()
        out = np.empty((32, channels, size, size), np.float32)
        scalar_c_batch(fn_c, src, theta, out)
        reference = F.grid_sample(images.float(), affine_grid(torch.from_numpy(theta), size), mode="bilinear",
                                  padding_mode="zeros", align_corners=False).numpy()
        row["scalar_c_max_abs_diff"] = float(np.abs(out - reference).max())  # pixel units (0-255)
        paths["scalar_c"] = (lambda: scalar_c_batch(fn_c, src, theta, out), pixels_batch)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):  # alternate the paths so that the VM's load moves them alike
        for name, (fn, pixels) in paths.items():
            samples[name].append(cpu_ns(fn, pixels))
    for name, values in samples.items():
        row[f"{name}_ns"] = statistics.median(values)
    return row


def table(rows: list[dict], c_note: str) -> str:
    lines = ["| px | channels | whole device augmentation | grid_sample alone | scalar C loop (uint8 in) "
             "| scalar C / grid_sample |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r.get("scalar_c_ns")
        c_cell = f"{c:.1f} (max diff {r['scalar_c_max_abs_diff']:.1e})" if c is not None else "-"
        ratio = f"{c / r['grid_sample_ns']:.2f}x" if c is not None else "-"
        lines.append(f"| {r['size']} | {r['channels']} | {r['device_augment_ns']:.1f} | {r['grid_sample_ns']:.1f} "
                     f"| {c_cell} | {ratio} |")
    head = ("CPU ns per output pixel (all channels), one thread, batches of 32, median of the rounds; the C loop "
            "is compiled with `cc -O3 -march=native -ffast-math`; its max diff is against grid_sample, in pixel "
            "units (0-255).")
    return head + (f"\n\nscalar C loop skipped: {c_note}." if c_note else "") + "\n\n" + "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[112, 224])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--section", default="Bilinear warp: cost per output pixel on this CPU")
    p.add_argument("--no-write", dest="write", action="store_false")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        fn_c, c_note = compile_scalar_c(Path(tmp))
        rows = [measure(size, channels, args.rounds, fn_c) for size in args.sizes for channels in (1, 3)]
    for r in rows:
        print(r, flush=True)
    body = table(rows, c_note)
    command = f"python bench/warp_cost.py {shlex.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    text = (f"Date: {time.strftime('%Y-%m-%dT%H:%M', time.gmtime())}  \nMachine: {machine()}; load average before / "
            f"after {load_before:.1f} / {os.getloadavg()[0]:.1f}  \nCommand: `{command}`\n\n{body}\n")
    print(text)
    if args.write:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
