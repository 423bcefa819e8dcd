"""The GPU check: does the step path run on a GPU as it runs on CPU? One script, < 8 min on one GPU.

    python benchmarks/gpu_check.py --out-dir runs/gpu_check          # on a machine with a GPU
    python benchmarks/gpu_check.py --dry --out-dir /tmp/gpu_check    # the CPU-possible parts

Four stages; ``gpu_check.json`` in ``--out-dir`` is rewritten after every stage, so a stage that
hangs or crashes leaves the earlier ones' figures behind:

- ``train_bf16``: 20 training steps of the main job's model (configs/tiny-cpu.toml) in one
  process on one GPU with NCCL (the default group is ``cpu:gloo,cuda:nccl``), forward under
  bf16 autocast, through ``runtime.step.train_step``; the loss must fall; tokens/s per step.
- ``multiprocess``: 1, 2 and 4 processes sharing the GPU over gloo with CUDA tensors, each on a
  FlexSP plan (``planner.solver.plan_step``) of the same batch; step 0's loss, balance loss and
  every gradient of 2 and 4 processes must equal those of one process to ``FP32_TOL`` (relative,
  fp32 summation order). Sequence-level balance: it is plan-invariant across micro-batches.
- ``syncs_memory``: a few fp32 steps with ``torch.cuda.set_sync_debug_mode("warn")``: the host
  syncs per step (one warning each), the Python-level host reads per step (``Tensor.item``,
  ``.tolist``, ``.cpu``, ... counted by patching), and the peak memory of each step against the
  cost model's prediction for the step's plan (``CostModel.group_memory_gb``).
- ``telemetry_budget``: ``runtime.train.train`` for 2 steps into ``<out-dir>/telemetry_run``;
  the NVML telemetry (``gpu`` in metrics.jsonl) and the device-memory planner budget
  (``planner.cost_model = "auto"`` on a GPU: the hybrid-1b-h100 preset with its budget from the
  device's memory).

``--dry`` runs every stage on the CPU with gloo: everything except what needs CUDA (bf16 on a
GPU, CUDA tensors over gloo, sync debug mode, CUDA peak memory, NVML), which is marked in each
stage's ``skipped`` list. Needs nothing beyond the project's dependencies (NVML through
nvidia-ml-py, already one).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, spawn_ranks, write_json  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.toml"
FP32_TOL = 1e-5
"""Relative tolerance of loss and gradients across process counts (fp32, summation order)."""
LENGTHS = [37, 5, 120, 64, 9, 200, 300, 17]
MIN_TREND_STEPS = 10
"""Stage train_bf16 requires a falling loss from this many steps on (tiny-cpu warms up for 5)."""
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Counter of Python-level device->host reads (calls of ``HOST_READS``) while the block runs."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_cuda_syncs(enabled: bool):
    """Number of synchronising CUDA calls (``set_sync_debug_mode("warn")`` warns once per sync)."""
    counter = SimpleNamespace(syncs=0)
    if not enabled:
        yield counter
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode("default")
            counter.syncs = sum("synchroniz" in str(w.message) for w in caught)


def load(overrides: list[str]):
    from runtime.config import load_config

    return load_config(CONFIG, ["--launch.nproc_per_node=1", "--planner.async_plan=false", *overrides])


def _env(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from deepspeed.utils import logger

    logger.setLevel("WARNING")


def _setup(rank: int, world: int, store: str, job: dict):
    """Context, dataset, cost model, model and engine of ``job["config"]`` on this rank."""
    from parallel.context import ParallelContext
    from runtime.data import build_dataset
    from runtime.model import build_model
    from runtime.train import build_engine, resolve_cost_model

    _env(rank, world)
    config = job["config"]
    ctx = ParallelContext.initialize(backend=job["backend"], device=job["device"], init_method=f"file://{store}")
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    torch.manual_seed(config.train.seed)
    model = build_model(
        config.model, config.parallel, config.moe, balance_group=ctx.world, domain_names=dataset.domain_names
    ).to(ctx.device)
    return ctx, dataset, resolve_cost_model(config, ctx.world_size), model, build_engine(model, config)


def _predicted_peak_gb(cost, plan, rank: int, sequences) -> float:
    """The cost model's memory for this rank's largest group of the plan."""
    peak = 0.0
    for micro in plan.microbatches:
        group = micro.group_of(rank)
        lengths = [len(sequences[i]) for i in group.seq_indices]
        peak = max(peak, cost.group_memory_gb(lengths, len(group.ranks)))
    return peak


# -------------------------------------------------------------------------------------------
# Stages a and c: training steps in one process


def _steps_worker(rank: int, world: int, store: str, job: dict, queue) -> None:
    from runtime.step import train_step
    from runtime.train import StepPlanner

    ctx, dataset, cost, model, engine = _setup(rank, world, store, job)
    config, cuda = job["config"], ctx.device.type == "cuda"
    planner = StepPlanner(config, cost, ctx, lambda i: dataset.train_batch(i, config.train.seed).lengths)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=job["bf16"])
    rows = []
    for step in range(job["steps"]):
        batch = dataset.train_batch(step, config.train.seed)
        plan = planner.plan(step, job["steps"])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        with count_cuda_syncs(cuda and job["count_syncs"]) as syncs, count_host_reads() as reads, autocast:
            result = train_step(model, engine, ctx, plan, batch)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        row = {
            "step": step,
            "loss": result.loss,
            "aux_loss": result.aux_loss,
            "grad_norm": result.grad_norm,
            "tokens": result.tokens,
            "step_s": seconds,
            "tokens_per_s": result.tokens / seconds,
            "host_reads": sum(reads.values()),
            "host_reads_by_kind": dict(reads),
            "predicted_peak_gb": _predicted_peak_gb(cost, plan, ctx.rank, batch.sequences),
        }
        if cuda:
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if job["count_syncs"]:
                row["cuda_syncs"] = syncs.syncs
        rows.append(row)
    planner.close()
    if rank == 0:
        queue.put({"rows": rows, "cost_model": cost.name, "device": str(ctx.device), "backend": ctx.backend})
    ctx.destroy()


def stage_train_bf16(args, job: dict) -> dict:
    out = spawn_ranks(1, _steps_worker, {**job, "steps": args.steps, "bf16": True, "count_syncs": False})
    losses = [r["loss"] for r in out["rows"]]
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {
        **out,
        "loss_first": first,
        "loss_last": last,
        "loss_falling": bool(last < first),
        "all_finite": all(math.isfinite(x) for x in losses),
        "median_tokens_per_s": sorted(r["tokens_per_s"] for r in out["rows"])[len(out["rows"]) // 2],
        # fewer steps than the warmup and a few more show no trend (each step is a new batch)
        "loss_trend_checked": len(losses) >= MIN_TREND_STEPS,
        "ok": (bool(last < first) or len(losses) < MIN_TREND_STEPS) and all(math.isfinite(x) for x in losses),
        "skipped": [] if job["device"] != "cpu" else ["CUDA bf16: ran bf16 autocast on the CPU"],
    }


def stage_syncs_memory(args, job: dict) -> dict:
    steps = max(3, args.steps // 5)
    out = spawn_ranks(1, _steps_worker, {**job, "steps": steps, "bf16": False, "count_syncs": True})
    timed = out["rows"][1:]  # step 0 pays the lazy initialisation
    result = {
        **out,
        "host_reads_per_step": [r["host_reads"] for r in timed],
        "skipped": [],
    }
    if job["device"] == "cpu":
        result["skipped"] = ["cuda sync debug mode", "CUDA peak memory vs prediction"]
    else:
        result["cuda_syncs_per_step"] = [r["cuda_syncs"] for r in timed]
        result["peak_vs_predicted"] = [r["peak_allocated_gb"] / max(r["predicted_peak_gb"], 1e-12) for r in timed]
    result["ok"] = True  # a measurement: the figures are the result
    return result


# -------------------------------------------------------------------------------------------
# Stage b: 1, 2 and 4 processes on FlexSP plans of the same batch


def _step0_worker(rank: int, world: int, store: str, job: dict, queue) -> None:
    import torch.distributed as dist

    from planner.solver import plan_step
    from runtime.step import train_step

    ctx, _, cost, model, engine = _setup(rank, world, store, job)
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, 256, (n,), generator=g) for n in LENGTHS]
    batch = SimpleNamespace(sequences=sequences, domains=[i % 3 for i in range(len(LENGTHS))])
    plan = plan_step(LENGTHS, num_ranks=world, cost=cost, time_limit_s=5.0)
    result = train_step(model, engine, ctx, plan, batch, update=False)
    # numpy, not tensors: a queued tensor travels as shared memory that dies with this process
    grads = {n: p.grad.detach().float().cpu().numpy() for n, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        dist.barrier(group=ctx.world)
    if rank == 0:
        shape = [[len(g.ranks) for g in m.groups] for m in plan.microbatches]
        queue.put({"loss": result.loss, "aux_loss": result.aux_loss, "grads": grads, "plan": shape})
    ctx.destroy()


def stage_multiprocess(args, job: dict) -> dict:
    # ZeRO stage 0: the summed gradients stay in .grad, where they can be compared
    config = load(
        [*job["overrides"], "--train.zero_stage=0", "--parallel.backend=gloo", f"--parallel.device={job['device']}"]
    )
    job = {**job, "backend": "gloo", "config": config}
    runs = {w: spawn_ranks(w, _step0_worker, job) for w in (1, *args.worlds)}
    for run in runs.values():
        run["grads"] = {n: torch.from_numpy(g) for n, g in run["grads"].items()}
    if not runs[1]["grads"]:
        raise RuntimeError("one process left no gradients in .grad: nothing to compare")
    ref = runs[1]
    result = {"tolerance": FP32_TOL, "worlds": {}, "skipped": []}
    if job["device"] == "cpu":
        result["skipped"] = ["CUDA tensors over gloo: ran CPU tensors"]
    ok = True
    for w, run in runs.items():
        worst = max(((run["grads"][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref["grads"].items())
        entry = {
            "plan_degrees": run["plan"],
            "loss": run["loss"],
            "aux_loss": run["aux_loss"],
            "loss_rel_err": abs(run["loss"] - ref["loss"]) / abs(ref["loss"]),
            "aux_rel_err": abs(run["aux_loss"] - ref["aux_loss"]) / max(abs(ref["aux_loss"]), 1e-30),
            "max_grad_rel_err": worst,
            "same_parameters": set(run["grads"]) == set(ref["grads"]),
        }
        entry["ok"] = entry["same_parameters"] and max(entry["loss_rel_err"], entry["aux_rel_err"], worst) <= FP32_TOL
        ok = ok and entry["ok"]
        result["worlds"][str(w)] = entry
    result["ok"] = ok
    return result


# -------------------------------------------------------------------------------------------
# Stage d: the real training loop's telemetry and the planner's device-memory budget


def _telemetry_worker(rank: int, world: int, store: str, job: dict, queue) -> None:
    import json

    from runtime.train import resolve_cost_model, train

    _env(rank, world)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # one process started without a launcher, as `seqmoe train` alone
    config = job["config"]
    train(config, report=lambda *a: None)
    rows = [json.loads(line) for line in (config.resolved_run_dir / "metrics.jsonl").read_text().splitlines()]
    auto = load(["--planner.cost_model=auto"])
    cost = resolve_cost_model(auto, 1)
    queue.put(
        {
            "rows": len(rows),
            "gpu_telemetry": [r.get("gpu") for r in rows],
            "auto_cost_model": cost.name,
            "memory_budget_gb": cost.memory_budget_gb,
            "model_state_gb": cost.model_state_gb,
            "notes": cost.notes,
        }
    )


def stage_telemetry_budget(args, job: dict) -> dict:
    run_dir = Path(args.out_dir).resolve() / "telemetry_run"
    overrides = [*job["overrides"], "--train.steps=2", "--train.eval_every=0", f"--train.run_dir={run_dir}"]
    config = load([*overrides, f"--parallel.backend={job['backend']}", f"--parallel.device={job['device']}"])
    out = spawn_ranks(1, _telemetry_worker, {**job, "config": config})
    has_gpu = job["device"] != "cpu"
    telemetry_ok = all(t for t in out["gpu_telemetry"]) if has_gpu else True
    # on a GPU "auto" is the hybrid-1b-h100 preset with the device's memory; on a CPU a CPU model
    budget_ok = (out["auto_cost_model"] == "hybrid-1b-h100") == has_gpu and out["memory_budget_gb"] > 0
    out["skipped"] = [] if has_gpu else ["NVML telemetry (no GPU)", "device-memory budget (CPU preset)"]
    out["ok"] = telemetry_ok and budget_ok and out["rows"] == 2
    return out


STAGES = {
    "train_bf16": stage_train_bf16,
    "multiprocess": stage_multiprocess,
    "syncs_memory": stage_syncs_memory,
    "telemetry_budget": stage_telemetry_budget,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="run on the CPU with gloo; CUDA-only parts are skipped")
    parser.add_argument("--out-dir", default="runs/gpu_check", help="where gpu_check.json goes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of stage train_bf16")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="process counts of stage multiprocess")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no GPU visible to torch; run with --dry for the CPU-possible parts")
    device, backend = ("cpu", "gloo") if args.dry else ("cuda:0", "nccl")
    # tiny-cpu: the cost model calibrated for this model; it holds 632 tokens on one rank
    overrides = ["--planner.cost_model=tiny-cpu", "--moe.balance=sequence", "--data.max_seq_len=512"]
    overrides += [f"--{s}" for s in args.set]
    config = load([*overrides, f"--parallel.backend={backend}", f"--parallel.device={device}"])
    job = {"config": config, "device": device, "backend": backend, "overrides": overrides}
    out_dir = Path(args.out_dir)
    report = {"machine": machine_info(), "dry": args.dry, "device": device, "stages": {}}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    for name in args.stages:
        began = time.perf_counter()
        try:
            report["stages"][name] = STAGES[name](args, job)
        except Exception as exc:  # a stage that breaks is a finding: record it and go on
            report["stages"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
            report["stages"][name]["traceback"] = traceback.format_exc()[-8000:]
        report["stages"][name]["wall_s"] = time.perf_counter() - began
        path = write_json("gpu_check", report, out_dir)
        print(
            f"gpu_check {name}: ok={report['stages'][name]['ok']} ({report['stages'][name]['wall_s']:.0f} s) -> {path}"
        )
    return 0 if all(s["ok"] for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
