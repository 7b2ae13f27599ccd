"""What every benchmark under bench/ writes into bench/RESULTS.md: its own `## <name>` section, and the one-line
description of the machine it ran on. Imported by the benchmark scripts (`python bench/<script>.py` puts this
folder on sys.path)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str) -> None:
    """Replace (or append) section `## name` of RESULTS.md with `text`, leaving the other sections alone."""
    head = f"## {name}"
    old = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\n"
    body = f"{head}\n\n{text}"
    pattern = re.compile(rf"^{re.escape(head)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: body + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(new)


def publish(section: str, text: str, result: dict, json_path: str = "", write: bool = True) -> None:
    """A benchmark's ending: print its report, keep the raw figures in `json_path` if given, and (unless the
    run asked not to) make the report section `section` of RESULTS.md."""
    import json

    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if write:
        write_section(section, text)


def machine() -> str:
    """CPU model, usable cores, torch version and threads, and the GPU if there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = f"{cpu}, {cores} cores usable, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        out += f", GPU {torch.cuda.get_device_name(0)}"
    return out


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run, arguments quoted so it can be pasted back (argv None: this process's)."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    return f"python {script} {shlex.join(args)}".rstrip()


def measure_and_publish(section: str, script: str, args, argv, run, report) -> dict:
    """A benchmark's whole ending around `run(args)`: time it, add the date, duration, machine and load average
    before / after to its result, then `publish` its `report(args, result, command)` (args.json, args.write)."""
    import time
    from datetime import UTC, datetime

    started, load_before = time.time(), os.getloadavg()[0]
    result = run(args)
    result.update(date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M (UTC)"), minutes=(time.time() - started) / 60,
                  machine=machine(), load=(load_before, os.getloadavg()[0]))
    publish(section, report(args, result, command_line(script, argv)), result, args.json, args.write)
    return result
