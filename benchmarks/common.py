"""Shared benchmark plumbing: machine and version facts, timing, JSON + PNG output.

Every result JSON carries the machine (CPU, GPU), versions (python, torch, seqmoe), the git
revision and the benchmark's own arguments, so a number can always be traced to its setup.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from runtime.spawn import spawn_ranks as spawn_ranks  # re-exported: the benchmarks spawn their ranks with it

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""The committed results: written only when asked for (``--out-dir benchmarks/results``)."""
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench"
"""Where a benchmark writes by default (git-ignored), so a run never overwrites committed results."""
OUT_DIR_HELP = (
    "folder for the JSON and PNG results (default runs/bench, git-ignored; pass --out-dir benchmarks/results "
    "to update the committed results)"
)


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {
        "hostname": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "git_revision": git_revision(),
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, cuda: bool = False) -> dict:
    """Wall time of ``fn`` in seconds: median, min and all samples (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def write_json(name: str, payload: dict, out_dir: Path = DEFAULT_OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
