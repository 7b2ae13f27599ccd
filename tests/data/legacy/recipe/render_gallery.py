"""Render the tiny gallery: 6 synthetic people x 4 images, 48 px PNGs (facetrain.synthetic.render, seed 2026)."""
import os, sys
from pathlib import Path
from facetrain.synthetic import render

out = Path(sys.argv[1])
MTIME_NS = 1_796_601_600 * 10**9  # 2026-12-07 00:00:00 UTC: a fixed mtime a test can restore
for ident in range(6):
    d = out / f"person_{ident:02d}"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        p = d / f"img_{i}.png"
        render(2026, ident, i, size=48).save(p, optimize=True)
for p in sorted(out.rglob("*.png")):
    os.utime(p, ns=(MTIME_NS, MTIME_NS))
