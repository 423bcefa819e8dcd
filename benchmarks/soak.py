"""Soak: a long run with a new FlexSP plan every step stays flat in memory, descriptors and groups.

    python benchmarks/soak.py [--quick] [--out-dir DIR] [--steps N] [--every K]
    seqmoe bench soak [--quick]

4 spawned gloo ranks run the real trainer (runtime/train.py ``train``) on a small hybrid
LASP-2 + LASP-2H + MoE model (layer pattern LLLS, GRU router, global balance): the FlexSP planner
plans every step in its background worker process (the batches differ every step, so do the
plans), checkpoints every ``--checkpoint-every`` steps and evaluation every ``--eval-every``.
At the start of every K-th step (and of the last) every rank records:

- its RSS (/proc/self/status VmRSS), then its RSS after glibc's ``malloc_trim(0)`` (the
  allocator's free pages handed back: what live objects hold), and its count of Python objects
  the garbage collector tracks; rank 0 also its planner worker's RSS;
- its open file descriptors (/proc/self/fd);
- its cached process groups (``ParallelContext.num_cached_groups``, DESIGN invariant 6: at most
  world - 1) and every group torch knows of (the default group, ours and DeepSpeed's);

and the step times, losses and plan shapes come from the run's metrics.jsonl.

Acceptance (no growth beyond noise), computed over the second half of the samples, when the
allocators and caches have warmed up:

- RSS: the Theil-Sen slope (the median of the pairwise slopes) of every rank's trimmed RSS, and
  of the planner worker's RSS, is below ``--max-slope-mib`` MiB per 100 steps (default 2 MiB:
  10 MiB over 500 steps, against RSS of ~0.5 GiB; a leak of one plan's or one checkpoint's worth
  of memory per step would be orders of magnitude above). Why trimmed and why Theil-Sen: the raw
  RSS of a process whose tensor shapes change every step holds whatever free heap glibc keeps,
  which jumps by tens of MiB between samples (one sample 35 MiB low made a flat run's
  least-squares slope 2.8); the median slope of trimmed RSS follows live memory. The raw RSS's
  slope, the least-squares slope with its standard error and the Python object count's slope
  are reported beside the verdict;
- file descriptors: max - min <= 2 on every rank (a leaked descriptor per step or per
  checkpoint would show up as a ramp);
- process groups: constant on every rank, and ``num_cached_groups`` <= world - 1.

Writes soak.json and soak.png (RSS, descriptors, step time and loss against the step) under
--out-dir (default runs/bench/, so the committed benchmarks/results/ are kept unless you pass
--out-dir benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU + gloo benchmark; deepspeed reads this on import

# sys.path[0] is this script's folder: put the repository first (benchmarks/planner.py would
# otherwise shadow the planner package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, spawn_ranks, write_json  # noqa: E402
from runtime.faults import spawned_children  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.toml"
MIB = 1 << 20


def rss_bytes(pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def trimmed_rss_bytes() -> int | None:
    """RSS after glibc's ``malloc_trim(0)`` has handed the allocator's free pages back to the
    kernel (None without glibc): what live objects hold, without the free heap the allocator keeps
    after a step of other shapes. A leak keeps its pages; a trim cannot hide it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_bytes()


class Sampler:
    """``train``'s on_step_start hook: one JSON line per sample into ``<dir>/rank<r>.jsonl``."""

    def __init__(self, out: Path, every: int, last_step: int):
        self.out, self.every, self.last_step = out, every, last_step

    def __call__(self, ctx, step: int) -> None:
        if step % self.every and step != self.last_step:
            return
        import gc

        import torch.distributed as dist

        sample = {
            "step": step,
            "rank": ctx.rank,
            "time": time.time(),
            "rss": rss_bytes(),
            "rss_trimmed": trimmed_rss_bytes(),  # after "rss": the trim must not change the raw figure
            "python_objects": len(gc.get_objects()),
            "fds": open_fds(),
            "cached_groups": ctx.num_cached_groups,
            "torch_groups": len(dist.distributed_c10d._world.pg_map),
        }
        if ctx.rank == 0:
            workers = spawned_children(os.getpid())
            sample["planner_pids"] = workers
            sample["planner_rss"] = sum(rss_bytes(p) or 0 for p in workers) if workers else None
        with (self.out / f"rank{ctx.rank}.jsonl").open("a") as f:  # opened and closed: holds no descriptor
            f.write(json.dumps(sample) + "\n")


def _worker(rank: int, world: int, store: str, job: dict, queue) -> None:
    import torch
    import torch.distributed as dist

    # train() reads the torchrun-style environment; the group itself comes from the file store
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # unused: the group already exists
    torch.set_num_threads(1)
    from datetime import timedelta

    from runtime.config import load_config
    from runtime.train import train

    config = load_config(str(CONFIG), job["overrides"])
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    sampler = Sampler(Path(job["samples"]), job["every"], config.train.steps - 1)
    began = time.perf_counter()
    row = train(config, report=lambda line: print(line, flush=True), on_step_start=sampler)
    if rank == 0:
        queue.put({"wall_s": time.perf_counter() - began, "last": row})


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [
        f"--launch.nproc_per_node={args.world_size}",
        "--model.d_model=32",
        "--model.ffn_hidden=64",
        "--moe.num_experts=4",
        f"--data.global_batch_sequences={args.batch}",
        f"--data.max_seq_len={args.max_seq_len}",
        "--planner.mode=flexsp",
        "--planner.async_plan=true",
        "--planner.time_limit_s=0.5",
        f"--train.steps={args.steps}",
        "--train.warmup_steps=10",
        f"--train.checkpoint_every={args.checkpoint_every}",
        "--train.keep_checkpoints=2",
        f"--train.eval_every={args.eval_every}",
        "--train.eval_batches=1",
        f"--train.run_dir={run_dir}",
    ]


def slope_per_100(steps: list[int], values: list[float]) -> float | None:
    """Least-squares slope of values over steps, per 100 steps."""
    n = len(steps)
    if n < 2:
        return None
    mx, my = sum(steps) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in steps)
    if sxx == 0:
        return None
    return 100 * sum((x - mx) * (y - my) for x, y in zip(steps, values, strict=True)) / sxx


def slope_stderr_per_100(steps: list[int], values: list[float]) -> float | None:
    """Standard error of :func:`slope_per_100` (how much of a slope the samples' jitter explains)."""
    n = len(steps)
    slope = slope_per_100(steps, values)
    if slope is None or n < 3:
        return None
    mx, my = sum(steps) / n, sum(values) / n
    b = slope / 100
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(steps, values, strict=True))
    return 100 * (residual / (n - 2) / sum((x - mx) ** 2 for x in steps)) ** 0.5


def theil_sen_per_100(steps: list[int], values: list[float]) -> float | None:
    """Median of the pairwise slopes, per 100 steps: one outlying sample barely moves it."""
    pairs = [
        (values[j] - values[i]) / (steps[j] - steps[i])
        for i in range(len(steps))
        for j in range(i + 1, len(steps))
        if steps[j] != steps[i]
    ]
    return 100 * sorted(pairs)[len(pairs) // 2] if pairs else None


def summarise(samples: dict[int, list[dict]], world: int, max_slope_mib: float) -> dict:
    """The acceptance figures (module docstring) per rank and for the planner worker."""
    out, ok = {"ranks": {}, "criterion": {}}, True
    # the verdict reads the trimmed RSS where the samples have it (module docstring)
    key = "rss_trimmed" if all(s.get("rss_trimmed") for rows in samples.values() for s in rows) else "rss"
    series = {f"rank{r}": [(s["step"], s[key]) for s in rows] for r, rows in samples.items()}
    series["planner"] = [(s["step"], s["planner_rss"]) for s in samples[0] if s.get("planner_rss")]
    for name, points in series.items():
        half = points[len(points) // 2 :]
        xs, ys = [p[0] for p in half], [p[1] / MIB for p in half]
        slope = theil_sen_per_100(xs, ys)
        entry = {
            "rss_start_mib": points[0][1] / MIB if points else None,
            "rss_end_mib": points[-1][1] / MIB if points else None,
            "rss_second_half_theil_sen_mib_per_100_steps": slope,
            "rss_ok": slope is not None and slope < max_slope_mib,
            # context for the verdict, not part of it
            "rss_second_half_slope_mib_per_100_steps": slope_per_100(xs, ys),
            "rss_second_half_slope_stderr_mib_per_100_steps": slope_stderr_per_100(xs, ys),
            "rss_second_half_min_mib": min(ys) if ys else None,
            "rss_second_half_max_mib": max(ys) if ys else None,
        }
        if name.startswith("rank"):
            rows = samples[int(name[4:])]
            second = rows[len(rows) // 2 :]
            raw = [s["rss"] / MIB for s in second]
            entry["raw_rss_second_half_theil_sen_mib_per_100_steps"] = theil_sen_per_100(xs, raw)
            if all("python_objects" in s for s in second):
                objects = [s["python_objects"] for s in second]
                entry["python_objects_second_half_theil_sen_per_100_steps"] = theil_sen_per_100(xs, objects)
                entry["python_objects_second_half_min_max"] = [min(objects), max(objects)]
            fds = [s["fds"] for s in second]
            groups = {s["cached_groups"] for s in rows}
            torch_groups = {s["torch_groups"] for s in rows}
            entry.update(
                fds_first=rows[0]["fds"],
                fds_second_half_min=min(fds),
                fds_second_half_max=max(fds),
                fds_ok=max(fds) - min(fds) <= 2,
                cached_groups=sorted(groups),
                torch_groups=sorted(torch_groups),
                groups_ok=len(groups) == 1 and max(groups) <= world - 1 and len(torch_groups) == 1,
            )
            ok &= entry["fds_ok"] and entry["groups_ok"]
        ok &= entry["rss_ok"]
        out["ranks"][name] = entry
    out["criterion"] = {
        "rss": f"second-half Theil-Sen slope of {key} < {max_slope_mib} MiB per 100 steps (every rank, planner worker)",
        "fds": "second-half open descriptors: max - min <= 2 on every rank",
        "groups": f"cached groups constant and <= world - 1 = {world - 1}; torch's group count constant",
    }
    out["passed"] = bool(ok)
    return out


def run_figures(metrics: list[dict]) -> dict:
    """Step times, plan shapes and losses of the run's metrics rows."""
    from runtime.outputs import plan_shape

    def median(values):
        return sorted(values)[len(values) // 2]

    times = [m["step_time_s"] for m in metrics]
    half = len(metrics) // 2
    shapes = [plan_shape(m["plan"]) for m in metrics]
    return {
        "steps": len(metrics),
        "step_time_median_s": median(times),
        "step_time_p95_s": sorted(times)[int(0.95 * (len(times) - 1))],
        "step_time_first_half_median_s": median(times[:half]),
        "step_time_second_half_median_s": median(times[half:]),
        # every step's batch differs, so every step gets its own plan; these count its shapes
        "plan_shapes": {shape: shapes.count(shape) for shape in sorted(set(shapes))},
        "plan_shape_changes": sum(a != b for a, b in zip(shapes, shapes[1:], strict=False)),
        "loss_first": metrics[0]["loss"],
        "loss_last": metrics[-1]["loss"],
        "eval_losses": [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None],
    }


def plot(samples: dict[int, list[dict]], metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for r, rows in samples.items():
        line = ax.plot([s["step"] for s in rows], [s["rss"] / MIB for s in rows], marker=".", label=f"rank {r}")
        trimmed = [(s["step"], s["rss_trimmed"] / MIB) for s in rows if s.get("rss_trimmed")]
        if trimmed:
            ax.plot(*zip(*trimmed, strict=True), color=line[0].get_color(), linestyle=":", label=f"rank {r} trimmed")
    planner = [(s["step"], s["planner_rss"] / MIB) for s in samples[0] if s.get("planner_rss")]
    if planner:
        ax.plot(*zip(*planner, strict=True), marker=".", linestyle="--", label="planner worker")
    ax.set(title="RSS (dotted: after malloc_trim)", xlabel="step", ylabel="MiB")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for r, rows in samples.items():
        ax.plot([s["step"] for s in rows], [s["fds"] for s in rows], marker=".", label=f"rank {r} fds")
        ax.plot([s["step"] for s in rows], [s["cached_groups"] for s in rows], linestyle=":", label=f"rank {r} groups")
    ax.set(title="open file descriptors / cached groups", xlabel="step", ylabel="count")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1][0]
    ax.plot([m["step"] for m in metrics], [m["step_time_s"] for m in metrics], linewidth=0.6)
    ax.set(title="step time (rank 0)", xlabel="step", ylabel="s", yscale="log")
    ax = axes[1][1]
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], linewidth=0.6, label="train loss")
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set(title="loss", xlabel="step", ylabel="nats/token")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 steps, a sample every 10 (the CI form)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=25, help="sample every K steps")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="sequences per global batch")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--max-slope-mib", type=float, default=2.0, help="RSS slope limit, MiB per 100 steps")
    parser.add_argument("--out-dir", type=Path, default=None, help=OUT_DIR_HELP)
    parser.add_argument("--name", default="soak", help="stem of the JSON/PNG files")
    parser.add_argument(
        "--resummarise", type=Path, metavar="JSON", help="recompute the acceptance figures and plot of a saved run"
    )
    args = parser.parse_args()
    if args.resummarise is not None:
        return resummarise(args)
    if args.quick:
        args.steps, args.every, args.checkpoint_every, args.eval_every = 60, 10, 20, 30
    if args.out_dir is None:
        args.out_dir = DEFAULT_OUT_DIR
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="seqmoe-soak-run-"))
    samples_dir, run_dir = work / "samples", work / "run"
    samples_dir.mkdir()
    job = {"overrides": overrides(args, run_dir), "samples": str(samples_dir), "every": args.every}
    print(f"soak: {args.steps} steps on {args.world_size} gloo ranks, run folder {run_dir}", flush=True)
    result = spawn_ranks(args.world_size, _worker, job, timeout_s=6 * 3600)
    samples = {
        r: [json.loads(line) for line in (samples_dir / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(args.world_size)
    }
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = summarise(samples, args.world_size, args.max_slope_mib) | run_figures(metrics)
    summary.update(
        wall_s=result["wall_s"], checkpoints_left=sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    )
    payload = {
        "machine": machine_info(),
        "config": {**vars(args), "out_dir": str(args.out_dir), "overrides": job["overrides"]},
        "summary": summary,
        "samples": samples,
        "metrics": [
            {k: m.get(k) for k in ("step", "loss", "eval_loss", "step_time_s", "tokens", "plan")} for m in metrics
        ],
    }
    path = write_json(args.name, payload, args.out_dir)
    verdict = "PASSED" if summary["passed"] else "FAILED"
    title = f"soak: {len(metrics)} steps, {args.world_size} gloo ranks, FlexSP every step — acceptance {verdict}"
    plot(samples, metrics, args.out_dir / f"{args.name}.png", title)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval_losses"}, indent=1))
    print(f"soak: {verdict}; wrote {path} and {args.out_dir / (args.name + '.png')}")


def resummarise(args: argparse.Namespace) -> None:
    """The summary and plot of a saved soak JSON, recomputed from its samples (nothing is rerun)."""
    payload = json.loads(args.resummarise.read_text())
    samples = {int(r): rows for r, rows in payload["samples"].items()}
    world, limit = payload["config"]["world_size"], payload["config"]["max_slope_mib"]
    payload["summary"].update(summarise(samples, world, limit) | run_figures(payload["metrics"]))
    for stale in ("distinct_plans", "plan_changes"):  # older field names
        payload["summary"].pop(stale, None)
    out = args.out_dir or args.resummarise.parent
    path = write_json(args.name, payload, out)
    verdict = "PASSED" if payload["summary"]["passed"] else "FAILED"
    steps = payload["summary"]["steps"]
    title = f"soak: {steps} steps, {world} gloo ranks, FlexSP every step — acceptance {verdict}"
    plot(samples, payload["metrics"], out / f"{args.name}.png", title)
    print(f"soak: {verdict}; wrote {path}")


if __name__ == "__main__":
    main()
