"""The verification service under hostile load: good callers keep getting answers while others attack it.

    python bench/serve_hostile.py                         # writes its section of bench/RESULTS.md (~45 s)
    python bench/serve_hostile.py --smoke --no-write      # a few seconds: checks the script runs

A load test on loopback, bounded in time (--baseline-s alone, then --attack-s with the attackers). The server is
`python -m facetrain.serve` with its default limits, except shorter deadlines (--header-timeout, --body-timeout)
so that they fire within the run. The model (--model: an exported .onnx; default the 32 px tiny graph of
tests/tiny_onnx.py) matters little here: the attacks aim at the HTTP, JSON and decoding path. Traffic, each kind
from its own threads of this process:

* good: --good-clients callers POST /verify with two real face files (AT&T PNGs from ../shared, else
  synthetic PNGs), one request after the other; latency measured per request, before and during the attack;
* large images: a 170 KB one-colour 6300 x 6300 RGBA PNG (refused on its header) and a 48 MP JPEG (decoded at
  1/2 scale), alternating;
* slow headers: --slow-clients connections sending their request headers one byte a second;
* slow bodies: --slow-clients / 5 connections sending a 1 MB body one byte a second;
* aborted uploads: a 20 MB body declared, 1 MB sent, the connection closed;
* garbage: random bytes instead of HTTP, malformed JSON, NaN, deep nesting, a 1 GB Content-Length, a chunked
  body that never ends.

Reported: answers by status per kind, 5xx (any), the good callers' latency, and the server's memory: its
resident set sampled every 50 ms and its peak (VmHWM, /proc/<pid>/status) over the whole run.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))  # helpers.free_port / subprocess_env, tiny_onnx
FACES = REPO.parent / "shared" / "data" / "faces" / "att_faces"
SECTION = "Deployment: the service under hostile load"

from hostile_clients import (  # noqa: E402
    SOCKET_TIMEOUT_S,
    Traffic,
    aborting_client,
    chunked_client,
    garbage_client,
    good_client,
    large_image_client,
    slow_clients,
)

SAMPLE_S = 0.05  # memory sampling period, s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="an exported .onnx (default: the tiny graph of tests/tiny_onnx.py)")
    p.add_argument("--baseline-s", type=float, default=8.0, help="good callers alone, seconds")
    p.add_argument("--attack-s", type=float, default=30.0, help="good callers with the attackers, seconds")
    p.add_argument("--good-clients", type=int, default=2)
    p.add_argument("--slow-clients", type=int, default=100, help="slow-header connections (slow bodies: 1/5)")
    p.add_argument("--header-timeout", type=float, default=5.0, help="the server's --header-timeout, s")
    p.add_argument("--body-timeout", type=float, default=10.0, help="the server's --body-timeout, s")
    p.add_argument("--smoke", action="store_true", help="2 s + 4 s, 10 slow clients: checks the script runs")
    p.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    p.add_argument("--json", default="", help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.smoke:
        args.baseline_s, args.attack_s, args.slow_clients = 2.0, 4.0, 10
        args.header_timeout, args.body_timeout = 1.0, 2.0
    return args


# ----------------------------------------------------------------------------------------------------------
# The images


def good_pairs() -> list[tuple[str, str]]:
    import numpy as np
    from PIL import Image

    files = sorted(FACES.glob("*/*.png"))[::37][:16]
    if files:
        raw = [f.read_bytes() for f in files]
    else:  # no shared faces: synthetic 92 x 112 PNGs of the same size
        rng, raw = np.random.default_rng(0), []
        for _ in range(16):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (112, 92), dtype=np.uint8)).save(buf, format="PNG")
            raw.append(buf.getvalue())
    enc = [base64.b64encode(r).decode() for r in raw]
    return [(enc[k], enc[(k * 7 + 3) % len(enc)]) for k in range(len(enc))]


def large_images() -> list[str]:
    from PIL import Image

    out = []
    for mode, size, fmt in (("RGBA", (6300, 6300), "PNG"), ("L", (8000, 6000), "JPEG")):
        buf = io.BytesIO()
        Image.new(mode, size, 0 if mode == "L" else (0, 0, 0, 255)).save(buf, format=fmt)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


# ----------------------------------------------------------------------------------------------------------
# The server and its memory


def start_server(args, model: Path, workdir: Path):
    import httpx
    from helpers import free_port, subprocess_env

    port = free_port()
    log = workdir / "server.log"
    cmd = [sys.executable, "-m", "facetrain.serve", "--model", str(model), "--port", str(port),
           "--header-timeout", str(args.header_timeout), "--body-timeout", str(args.body_timeout)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"facetrain.serve did not start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port, log, cmd
        except httpx.TransportError:
            time.sleep(0.2)


def proc_status(pid: int, key: str) -> int:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryWatch(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), proc_status(self.pid, "VmRSS")))
            time.sleep(SAMPLE_S)


# ----------------------------------------------------------------------------------------------------------
# The run


def run(args, model: Path, workdir: Path) -> dict:
    import httpx

    proc, port, log, cmd = start_server(args, model, workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        pairs, big, traffic = good_pairs(), large_images(), Traffic()
        watch = MemoryWatch(proc.pid)
        watch.start()
        rss_idle = proc_status(proc.pid, "VmRSS")
        threads = [threading.Thread(target=good_client, args=(url, pairs, traffic, k))
                   for k in range(args.good_clients)]
        threads += [threading.Thread(target=large_image_client, args=(url, big, pairs[0][0], traffic)),
                    threading.Thread(target=garbage_client, args=(port, pairs[0][0], traffic)),
                    threading.Thread(target=aborting_client, args=(port, traffic)),
                    threading.Thread(target=chunked_client, args=(port, traffic)),
                    threading.Thread(target=slow_clients, args=(port, args.slow_clients, traffic))]
        for t in threads:
            t.start()
        time.sleep(args.baseline_s)
        rss_baseline = max(r for _, r in watch.samples)
        traffic.phase = "attack"
        traffic.attacking.set()
        time.sleep(args.attack_s)
        traffic.stop.set()
        for t in threads:
            t.join(timeout=SOCKET_TIMEOUT_S + 5)
        watch.stop.set()
        health = httpx.get(url + "/health", timeout=10).json()
        peak = proc_status(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    server = f"python -m facetrain.serve --model {model.name} --port <free> " + " ".join(cmd[cmd.index("--port") + 2:])
    return {"server_command": server,
            "status": {k: dict(v) for k, v in traffic.status.items()}, "latency": traffic.latency,
            "rss_idle": rss_idle, "rss_baseline_max": rss_baseline, "rss_max": max(r for _, r in watch.samples),
            "vm_hwm": peak, "limits": health["limits"], "rejected": health["rejected"],
            "log_lines": len(text.splitlines()), "log_tracebacks": text.count("Traceback"),
            "log_kinds": dict(Counter(_log_kind(line) for line in text.splitlines()))}


def _log_kind(line: str) -> str:
    for key in ("aborted upload", "Invalid HTTP request", "Exceeded concurrency", "facetrain.serve: error",
                "on http://", "Traceback"):
        if key in line:
            return key
    return "other"


def fives(result: dict) -> int:
    return sum(n for counts in result["status"].values() for s, n in counts.items() if s.startswith("5"))


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return 1000 * v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def report(args, result: dict, command: str) -> str:
    mib = 1 << 20
    lat = result["latency"]
    lines = [
        "Good callers and attackers at once on one `facetrain.serve` (loopback): large-dimension images, slow "
        "headers and bodies, aborted uploads, garbage. Issue 26's acceptance load test.",
        "",
        f"- date: {result['date']}, {result['minutes']:.1f} min",
        f"- machine: {result['machine']}; shared with other workers (load average 1 min before / after: "
        f"{result['load'][0]:.2f} / {result['load'][1]:.2f}); the clients run on the same 2 cores",
        f"- command: `{command}`; server: `{result['server_command']}` (default limits otherwise)",
        f"- model: {result['model']}",
        f"- phases: {args.baseline_s:g} s good callers alone, then {args.attack_s:g} s with the attackers; "
        f"{args.good_clients} good callers, {args.slow_clients} slow-header and {args.slow_clients // 5} slow-body "
        "connections (one byte a second each, replaced when closed)",
        "",
        "| server memory | MiB |",
        "|---|---:|",
        f"| resident, idle after start | {result['rss_idle'] / mib:.0f} |",
        f"| resident, max while only good callers ran | {result['rss_baseline_max'] / mib:.0f} |",
        f"| resident, max over the run (sampled every {SAMPLE_S * 1000:.0f} ms) | {result['rss_max'] / mib:.0f} |",
        f"| peak resident (VmHWM) | {result['vm_hwm'] / mib:.0f} |",
        "",
        f"Good callers, POST /verify of two face PNGs: {len(lat['baseline'])} requests alone (p50 "
        f"{percentile(lat['baseline'], 0.5):.0f} ms, p99 {percentile(lat['baseline'], 0.99):.0f} ms), "
        f"{len(lat['attack'])} under attack (p50 {percentile(lat['attack'], 0.5):.0f} ms, p99 "
        f"{percentile(lat['attack'], 0.99):.0f} ms). Answers with a 5xx, all kinds: **{fives(result)}**. "
        f"Server log: {result['log_lines']} lines, {result['log_tracebacks']} tracebacks "
        f"({', '.join(f'{k}: {n}' for k, n in sorted(result['log_kinds'].items()))}).",
        "",
        "| traffic | answers (status: count) |",
        "|---|---|",
    ]
    for kind, counts in result["status"].items():
        lines.append(f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(counts.items()))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    started, load0 = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="facetrain-bench-hostile-") as tmp:
        if args.model:
            model, name = Path(args.model), f"{Path(args.model).name} (given)"
        else:
            from tiny_onnx import SIZE, write_tiny_onnx

            model, name = write_tiny_onnx(Path(tmp) / "tiny.onnx"), f"tests/tiny_onnx.py's {SIZE} px tiny graph"
        result = run(args, model, Path(tmp))
    from results_md import command_line, machine, publish  # machine() imports torch: only at the end

    result.update({"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M (UTC)"), "model": name,
                   "minutes": (time.time() - started) / 60, "machine": machine(),
                   "load": (load0, os.getloadavg()[0])})
    publish(SECTION, report(args, result, command_line("bench/serve_hostile.py", argv)), result, args.json,
            not args.no_write)

if __name__ == "__main__":
    main()
