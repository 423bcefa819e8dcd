"""Scaling benchmark: weak and strong scaling of the plan policies, under the real launcher.

    seqmoe bench scaling [SWEEP.toml] [--out-dir DIR] [--launch.launcher=slurm --launch.submit=true]
    python -m benchmarks.scaling SWEEP.toml --in-job [--out-dir DIR]   # inside a job you launched

Two halves, one file:

- **The driver** (``seqmoe bench scaling SWEEP``, default configs/scaling-tiny-cpu.toml) starts one
  job per world size W of the sweep through ``launchers.launch.launch`` with the sweep's
  ``[launch]`` section: torchrun on this machine, an sbatch script per size (``--launch.submit=true``:
  submitted and waited for; otherwise written for you to submit), or mpirun. A W larger than
  ``launch.nproc_per_node`` spans W / nproc_per_node nodes. After each job it merges every
  per-size result into the report (rank 0 of each job writes to --out-dir: on a cluster, a folder
  that the login node and the first node of the job share).
- **The in-job entry** (``--in-job``) runs inside an already-launched job (torchrun, srun, mpirun:
  ``launchers.env.discover_environment``), never starts a process itself, and trains on all
  WORLD_SIZE ranks: for each scaling mode, one batch stream, every policy's plans made on rank 0
  and broadcast, then real training steps (``runtime.step.train_step`` through the DeepSpeed
  engine, as benchmarks/e2e.py) with the policies taking turns step by step on the same batches,
  each from the same initial weights. Every collective names its group (``ctx.world``).

Why one launch per world size, not sub-groups of one big launch: DeepSpeed's engine (data-parallel
gradient reduction, ZeRO partitions) and its expert-parallel groups are built over the default
process group, so a sub-world of the first W ranks would not be a W-rank training job; a launch of
W ranks is exactly what a user's W-GPU job is (its node placement and NCCL set-up included). One
Slurm allocation can still run every size: ``--in-job`` in successive ``srun -N k -n W`` steps.

Modes: weak scaling fixes the tokens per rank (``sweep.weak.tokens_per_rank``: the global batch
grows with W), strong scaling the global batch (``sweep.strong.global_tokens``: the same batches at
every W). A batch is the longest prefix of a deterministic draw of the training documents that
stays within the target (the data's order does not depend on the plan or on W).

Policies: ``flexsp`` (planner.solver.plan_step), ``static-d`` (planner.baselines.static_sp; a degree
whose groups cannot hold the longest sequence is skipped with its reason), ``batch_adaptive``, and
``megatron_dcp`` (planner.megatron_dcp, Megatron-core's dynamic context parallelism).

Reports (rank 0, under --out-dir, default runs/bench/): ``<name>_w<W>.json`` after every step of
every mode (rows, plans, summaries), and ``<name>.json`` + ``<name>.png`` merged over the sizes:
tokens/s per policy and W, scaling efficiency (weak: t(W0)/t(W); strong: speedup / ideal speedup,
speedup t(W0)/t(W), ideal W/W0, with W0 the smallest size where the policy ran), and the measured
step time against the cost model's prediction (step_ms + Σ micro-batch makespans). The cost model
is the preset's ``planner.cost_model`` or ``sweep.cost_model``: a preset name, or the JSON that
``seqmoe profile`` writes (calibrate on the cluster first: ``seqmoe profile --config PRESET
--out cost.json``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository first (benchmarks/planner.py shadows planner)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed reads this on import (lazily, below)

import torch.distributed as dist  # noqa: E402

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, write_json  # noqa: E402
from benchmarks.scaling_report import merge_report, summarise_mode  # noqa: E402
from benchmarks.scaling_sweep import Sweep, SweepError, load_sweep, policies_at  # noqa: E402
from parallel.configbase import ConfigError  # noqa: E402
from planner.cost import CostModel  # noqa: E402
from planner.plan import StepPlan  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SWEEP = REPO / "configs" / "scaling-tiny-cpu.toml"


# -------------------------------------------------------------------------------------------
# Batches and plans (pure; rank 0 plans, every rank draws the same batches)


def token_batch(dataset, step: int, seed: int, target_tokens: int, mean_length: float):
    """The longest prefix (at least one sequence) of a fixed draw whose tokens stay <= target."""
    from runtime.data import GlobalBatch

    draw = dataset.train_batch(step, seed, num_sequences=max(4, math.ceil(1.5 * target_tokens / mean_length) + 4))
    total, keep = 0, 0
    for length in draw.lengths:
        if keep and total + length > target_tokens:
            break
        total, keep = total + length, keep + 1
    return GlobalBatch(step, draw.sequences[:keep], draw.domains[:keep], draw.document_ids[:keep])


def make_plan(policy: str, lengths: list[int], *, num_ranks: int, cost: CostModel, time_limit_s: float) -> StepPlan:
    """The plan of one policy for one batch (module docstring)."""
    from planner.baselines import batch_adaptive, static_sp
    from planner.megatron_dcp import megatron_dynamic_cp
    from planner.solver import plan_step

    if policy == "flexsp":
        return plan_step(lengths, num_ranks=num_ranks, cost=cost, time_limit_s=time_limit_s)
    if policy == "batch_adaptive":
        return batch_adaptive(lengths, num_ranks=num_ranks, cost=cost)
    if policy == "megatron_dcp":
        return megatron_dynamic_cp(lengths, num_ranks=num_ranks, cost=cost)
    return static_sp(lengths, num_ranks=num_ranks, sp_degree=int(policy.split("-")[1]), cost=cost)


def predicted_step_s(plan: StepPlan, lengths: list[int], cost: CostModel) -> float:
    """The cost model's step time of a plan: step_ms + Σ over micro-batches of the slowest group."""
    makespans = [
        max(cost.group_time_ms([lengths[i] for i in g.seq_indices], g.degree) for g in mb.groups)
        for mb in plan.microbatches
    ]
    return cost.step_time_ms(makespans) / 1e3


def plan_policies(
    policies: list[str], batches: list[list[int]], *, num_ranks: int, cost: CostModel, time_limit_s: float
) -> dict:
    """{policy: {"status", "reason"?, "plans": [plan JSON], "info": [per-step facts]}}, every plan validated.
    A policy that cannot plan some batch (a degree too small, Megatron's groups too large) is skipped."""
    out: dict = {}
    for policy in policies:
        plans, info = [], []
        try:
            for lengths in batches:
                plan = make_plan(policy, lengths, num_ranks=num_ranks, cost=cost, time_limit_s=time_limit_s)
                plan.validate(lengths, cost)
                plans.append(plan.to_json())
                info.append(
                    {
                        "solve_time_s": plan.solve_time_s,
                        "predicted_step_s": predicted_step_s(plan, lengths, cost),
                        "microbatches": len(plan.microbatches),
                        "shape": plan.shapes(),
                    }
                )
        except ValueError as exc:
            out[policy] = {"status": "skipped", "reason": str(exc)}
            continue
        out[policy] = {"status": "ran", "plans": plans, "info": info}
    return out


# -------------------------------------------------------------------------------------------
# The in-job entry


def _build(config, ctx, dataset):
    from runtime.model import build_model
    from runtime.train import build_engine

    seed = config.train.seed
    torch.manual_seed(seed)  # the same initial weights for every policy
    model = build_model(
        config.model, config.parallel, config.moe, balance_group=ctx.world, seed=seed, domain_names=dataset.domain_names
    ).to(ctx.device)
    return model, build_engine(model, config)


def _timed_step(ctx, model, engine, config, plan: StepPlan, batch, step: int) -> dict:
    """One training step; its time is the slowest rank's (one all-reduce over ctx.world)."""
    from runtime.lr_schedule import lr_at
    from runtime.step import train_step

    t = config.train
    lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.steps)
    if ctx.world_size > 1:
        dist.barrier(group=ctx.world)
    start, cpu = time.perf_counter(), time.process_time()
    result = train_step(model, engine, ctx, plan, batch, lr=lr)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    times = torch.zeros(ctx.world_size, 3, dtype=torch.float64, device=ctx.device)
    times[ctx.rank] = torch.tensor([wall, result.forward_backward_s, cpu], dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(times, group=ctx.world)
    times = times.cpu()
    return {
        "step_s": float(times[:, 0].max()),
        "fwd_bwd_s": float(times[:, 1].max()),
        "cpu_s_all_ranks": float(times[:, 2].sum()),
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "tokens": result.tokens,
    }


def run_mode(ctx, config, dataset, batches, planned: dict, sweep: Sweep, on_row) -> None:
    """Train every policy that planned on ``batches``; ``on_row(row)`` on rank 0 after each step."""
    names = [p for p, s in planned.items() if s["status"] == "ran"]
    runs = {p: _build(config, ctx, dataset) for p in names} if sweep.interleave else {}
    order = _rotate([(s, p) for s in range(len(batches)) for p in names]) if sweep.interleave else []
    if not sweep.interleave:  # one model at a time (memory), each policy's steps back to back
        order = [(s, p) for p in names for s in range(len(batches))]
    for step, policy in order:
        if policy not in runs:
            runs.clear()  # free the previous policy's model and optimizer first
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            runs[policy] = _build(config, ctx, dataset)
        model, engine = runs[policy]
        plan = StepPlan.from_json(planned[policy]["plans"][step])
        row = _timed_step(ctx, model, engine, config, plan, batches[step], step)
        if ctx.rank == 0:
            row.update(step=step, policy=policy, measured=step >= sweep.warmup, **planned[policy]["info"][step])
            on_row(row)
    runs.clear()


def _rotate(order: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Within each step, start with a different policy (they share the machine's conditions)."""
    by_step: dict[int, list[str]] = {}
    for step, policy in order:
        by_step.setdefault(step, []).append(policy)
    out = []
    for step, names in by_step.items():
        k = step % len(names)
        out += [(step, p) for p in names[k:] + names[:k]]
    return out


def in_job(sweep: Sweep, out_dir: Path) -> int:
    """Run this world size's stages (module docstring); rank 0 writes the JSON."""
    from launchers.env import discover_environment
    from parallel.context import ParallelContext
    from runtime.config import load_config
    from runtime.data import build_dataset
    from runtime.train import resolve_cost_model

    env = discover_environment()
    env.export()  # the torchrun-style variables that ParallelContext.initialize reads
    W = env.world_size
    if W not in sweep.world_sizes:
        raise SweepError(f"{sweep.path}: this job has {W} ranks but sweep.world_sizes = {sweep.world_sizes}")
    config = load_config(sweep.config, sweep.config_overrides(W))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # the same threads per rank at every W (torchrun sets OMP_NUM_THREADS=1 for W > 1 itself; a
        # share of the cores would give W=1 more): one, unless OMP_NUM_THREADS says otherwise
        torch.set_num_threads(1)
    payload_threads = torch.get_num_threads()
    _quiet_deepspeed()
    ctx = ParallelContext.initialize(
        backend=config.parallel.backend, device=config.parallel.device, timeout_s=config.parallel.timeout_s
    )
    cost = resolve_cost_model(config, W)
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    mean_length = dataset.length_stats()["mean"]
    seed, num_steps = config.train.seed, sweep.warmup + sweep.steps
    payload = {
        "sweep": sweep.as_json(),
        "fingerprint": sweep.fingerprint(),
        "world_size": W,
        "complete": False,
        "launch": {"source": env.source, "local_world_size": env.local_world_size, "nodes": W // env.local_world_size},
        "backend": ctx.backend,
        "threads_per_rank": payload_threads,
        "device": str(ctx.device),
        "machine": machine_info(),
        "cost_model": {"name": cost.name, "spec": config.planner.cost_model, "json": cost.to_json()},
        "modes": {},
        "load_average_1_5_15min": {"start": os.getloadavg()},
    }
    path = out_dir / f"{sweep.name}_w{W}.json"
    for mode in sweep.modes:
        target = sweep.target_tokens(mode, W)
        batches = [token_batch(dataset, s, seed, target, mean_length) for s in range(num_steps)]
        lengths = [b.lengths for b in batches]
        planned, began = [None], time.perf_counter()
        if ctx.rank == 0:
            policies = policies_at(sweep, W, cost.degrees(W))
            planned[0] = plan_policies(policies, lengths, num_ranks=W, cost=cost, time_limit_s=sweep.time_limit_s)
        if W > 1:
            dist.broadcast_object_list(planned, src=0, group=ctx.world, device=torch.device("cpu"))
        stage = {"target_tokens": target, "batch_lengths": lengths, "policies": planned[0], "rows": []}
        stage["runtime_s"] = {"planning": time.perf_counter() - began}
        payload["modes"][mode] = stage

        def on_row(row: dict, stage=stage, mode=mode) -> None:
            stage["rows"].append(row)
            print(
                f"W={W} {mode:>6} step {row['step']} {row['policy']:>15}: {row['step_s'] * 1e3:8.1f} ms "
                f"({row['tokens'] / row['step_s']:8.0f} tok/s, predicted {row['predicted_step_s'] * 1e3:8.1f} ms), "
                f"loss {row['loss']:.4f}",
                flush=True,
            )
            stage["summary"] = summarise_mode(stage)
            write_json(path.stem, payload, out_dir)  # after every step: a killed job keeps what it measured

        began = time.perf_counter()
        run_mode(ctx, config, dataset, batches, planned[0], sweep, on_row)
        stage["runtime_s"]["training"] = time.perf_counter() - began  # model and engine builds included
    if ctx.rank == 0:
        payload["complete"] = True
        payload["load_average_1_5_15min"]["end"] = os.getloadavg()
        write_json(path.stem, payload, out_dir)
        merge_report(sweep, out_dir)
        print(f"wrote {path} and {sweep.name}.json/.png in {out_dir}", flush=True)
    ctx.destroy()
    return 0


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


# -------------------------------------------------------------------------------------------
# The driver


class _Job:
    """What launchers.launch needs of a run (launchers.config.LaunchJob): name, launch, run dir."""

    def __init__(self, name: str, launch, run_dir: Path) -> None:
        self.name, self.launch, self._run_dir = name, launch, run_dir

    @property
    def resolved_run_dir(self) -> Path:
        return self._run_dir


def job_for(sweep: Sweep, world_size: int, out_dir: Path) -> _Job:
    """The launch of one world size: one node of W ranks, or W / nproc_per_node nodes."""
    import dataclasses

    per_node = sweep.launch.nproc_per_node
    if world_size > per_node and world_size % per_node:
        raise SweepError(
            f"{sweep.path}: world size {world_size} is not a multiple of launch.nproc_per_node = {per_node} "
            "(ranks per node); use powers of two for both"
        )
    nnodes, nproc = (1, world_size) if world_size <= per_node else (world_size // per_node, per_node)
    launch = dataclasses.replace(sweep.launch, nnodes=nnodes, nproc_per_node=nproc)
    return _Job(f"{sweep.name}-w{world_size}", launch, out_dir / "launch" / f"w{world_size}")


def in_job_program(sweep: Sweep, out_dir: Path, *, quick: bool) -> list[str]:
    """The argv after ``python`` on every rank (launchers.launch's program shape); the step counts
    travel explicitly so that every rank runs what the driver resolved."""
    program = ["-m", "benchmarks.scaling", str(sweep.path), "--in-job", "--out-dir", str(out_dir.resolve())]
    program += ["--steps", str(sweep.steps), "--warmup", str(sweep.warmup)] + (["--quick"] if quick else [])
    return program + (["--cost-model", sweep.cost_model] if sweep.cost_model else [])


def drive(sweep: Sweep, out_dir: Path, *, quick: bool, dry_run: bool, verbose: bool) -> int:
    from launchers import LaunchError, launch

    out_dir.mkdir(parents=True, exist_ok=True)
    program = in_job_program(sweep, out_dir, quick=quick)
    # the ranks run `-m benchmarks.scaling` wherever they start (torchrun here, srun on the nodes)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    for W in sweep.world_sizes:
        job = job_for(sweep, W, out_dir)
        print(f"seqmoe bench scaling: world size {W} ({job.launch.nnodes} node(s) x {job.launch.nproc_per_node})")
        try:
            code = launch(
                job,
                program,
                script_name=f"{job.name}.sbatch",
                wait=job.launch.launcher == "slurm" and job.launch.submit,  # torchrun and mpirun always wait
                dry_run=dry_run,
                verbose=verbose,
            )
        except LaunchError as exc:
            print(f"seqmoe bench scaling: {exc}", file=sys.stderr)
            return 1
        if code:
            message = f"the W={W} job failed (exit code {code}); later sizes not run"
            print(f"seqmoe bench scaling: {message}", file=sys.stderr)
            return code
        submitted = job.launch.launcher != "slurm" or job.launch.submit
        if dry_run or not submitted:
            continue
        if not (out_dir / f"{sweep.name}_w{W}.json").is_file():
            print(f"seqmoe bench scaling: the W={W} job wrote no {sweep.name}_w{W}.json", file=sys.stderr)
            return 1
    if dry_run or (sweep.launch.launcher == "slurm" and not sweep.launch.submit):
        print(
            "seqmoe bench scaling: nothing ran; after the jobs, merge with: python -m benchmarks.scaling "
            f"{sweep.path} --report --out-dir {out_dir}"
        )
        return 0
    report = merge_report(sweep, out_dir)
    print(f"seqmoe bench scaling: wrote {report} and {report.with_suffix('.png').name}")
    return 0


def apply_quick(sweep: Sweep) -> Sweep:
    """--quick (``seqmoe bench --quick``): the two smallest sizes, one measured step, no warm-up."""
    sweep.world_sizes = sweep.world_sizes[:2]
    sweep.steps, sweep.warmup = 1, 0
    return sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", type=Path, default=DEFAULT_SWEEP, help="sweep TOML (default: tiny CPU)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--in-job", action="store_true", help="run inside an already-launched job (every rank)")
    parser.add_argument("--report", action="store_true", help="only merge the per-size JSON files into the report")
    parser.add_argument("--world-sizes", type=int, nargs="+", help="run only these sizes of the sweep")
    parser.add_argument("--quick", action="store_true", help="two smallest sizes, one step (seqmoe bench --quick)")
    parser.add_argument("--steps", type=int, help="measured steps per mode and policy (default: sweep.steps)")
    parser.add_argument("--warmup", type=int, help="unmeasured first steps (default: sweep.warmup)")
    parser.add_argument(
        "--cost-model",
        metavar="PRESET|PATH",
        help="cost model to plan and predict with: a preset or a `seqmoe profile` JSON (default: sweep.cost_model)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the launch commands (write sbatch scripts) only")
    parser.add_argument("--verbose", action="store_true", help="torchrun's own log lines")
    args, rest = parser.parse_known_args(argv)
    try:
        sweep = load_sweep(args.sweep, launch_overrides=rest)
        if args.quick:
            apply_quick(sweep)
        for name, low in (("steps", 1), ("warmup", 0)):
            value = getattr(args, name)
            if value is not None:
                if value < low:
                    raise SweepError(f"--{name} {value} must be >= {low}")
                setattr(sweep, name, value)
        if args.cost_model:
            is_file = args.cost_model.endswith(".json")
            sweep.cost_model = str(Path(args.cost_model).resolve()) if is_file else args.cost_model
        if args.world_sizes:
            missing = sorted(set(args.world_sizes) - set(sweep.world_sizes))
            if missing:
                raise SweepError(f"--world-sizes {missing} are not in sweep.world_sizes = {sweep.world_sizes}")
            sweep.world_sizes = sorted(args.world_sizes)
        if args.report:
            print(f"wrote {merge_report(sweep, args.out_dir)}")
            return 0
        if args.in_job:
            return in_job(sweep, args.out_dir)
        return drive(sweep, args.out_dir, quick=args.quick, dry_run=args.dry_run, verbose=args.verbose)
    except (SweepError, ConfigError) as exc:
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
            print(f"seqmoe bench scaling: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
