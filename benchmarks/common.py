"""Shared benchmark plumbing: machine and version facts, timing, JSON + PNG output.

Every result JSON carries the machine (CPU, GPU), versions (python, torch, seqmoe), the git
revision and the benchmark's own arguments, so a number can always be traced to its setup.
"""

from __future__ import annotations

import json
import os
import platform
import queue as queue_module
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.multiprocessing as mp

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


def spawn_ranks(world: int, worker: Callable, job: object, *, timeout_s: float = 3600.0) -> object:
    """Run ``worker(rank, world, store_path, job, queue)`` on ``world`` spawned processes that
    rendezvous through a file store (never a fixed port); return what rank 0 puts on the queue.
    A rank that dies leaves the others waiting in a collective, so all are stopped then."""
    spawn = mp.get_context("spawn")
    out_queue = spawn.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [spawn.Process(target=worker, args=(r, world, store, job, out_queue)) for r in range(world)]
        for p in procs:
            p.start()
        deadline, result = time.monotonic() + timeout_s, None
        while result is None:
            try:
                result = out_queue.get(timeout=5)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    for p in procs:
                        if p.is_alive():
                            p.terminate()
                    break
        for p in procs:
            p.join()
    if result is None or any(p.exitcode for p in procs):
        raise RuntimeError(f"a benchmark rank failed: exit codes {[p.exitcode for p in procs]}")
    return result
