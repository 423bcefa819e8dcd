"""End-to-end training throughput of adaptive vs static sequence parallelism on this machine.

    python benchmarks/e2e.py [--quick] [--out-dir DIR] [--cost-model PATH]
    seqmoe bench e2e [--quick]

W spawned gloo ranks (default 4) train the hybrid LASP-2 + MoE model of configs/tiny-cpu.toml
with real training steps: forward + backward of every micro-batch of the step's plan
(runtime/step.py ``train_step``) and the DeepSpeed engine's optimizer step (runtime/train.py
``build_engine``), on long-tailed global batches from the embedded corpus. Every policy trains
its own copy of the model (same initial weights, own engine), and the policies take turns step
by step on the same batches, in an order that rotates each step, so they share the machine's
conditions. Policies:

- ``flexsp``: the per-step planner (planner.solver.plan_step, mixed SP degrees);
- ``static-d``: every sequence at SP degree d (planner.baselines.static_sp), for d = 1, 2, 4, ...;
  a degree whose groups cannot hold the longest sequence under the cost model's memory cap is
  skipped, and the JSON says why;
- ``batch_adaptive``: the best single degree per batch (FlexSP-BatchAda).

Cost model. Before training, ``runtime.profile.profile_cost_model`` calibrates the time
coefficients (alpha1, alpha2, beta, all-gather bandwidth per degree) on the same model and W
(about a minute; ``--cost-model PATH`` reuses a saved calibration). The memory side (activation
MB per token, budget, model states) stays the ``tiny-cpu`` preset's synthetic cap (about 630
tokens per rank): this machine's RAM would let every sequence run at SP=1, and the cap is what
makes long sequences need SP groups, as GPU memory does (``--memory measured`` drops the cap).
All policies plan with the calibrated model. Each executed plan is also priced with the
uncalibrated ``tiny-cpu`` preset, to show what calibration buys.

Per policy: tokens/s and step time (median over the measured steps; a step's time is its
slowest rank's), the forward + backward part of it (what the cost model predicts) and the
optimizer part, SP/MoE communication bytes per step on the busiest rank (``CommMeter``; the
DeepSpeed gradient reduction is not metered and is the same for every plan), planner solve time
(every plan is made in this process before training starts, while no rank runs, as the
runtime's background planner would with a core of its own; "overlappable" = it finishes within
the previous step's time), and the cost model's error: predicted / measured - 1, of the
micro-batches' time against the measured forward + backward (which also holds the gradient
reduction of the last backward, a part of step_ms: the calibration reports its size as
``step_fit.fwd_bwd_intercept_ms``), and of the whole step (with the cost model's per-step
term step_ms, fitted by `seqmoe profile` apart from beta_ms over training steps of 1-8
micro-batches, runtime/step_profile.py) against the step. The calibration also fits the same
model to process CPU times (``ProfileResult.cpu_cost``); every plan priced with it is compared
with the step's busiest-rank CPU time (``calibrated_cpu_time_vs_step_cpu``), an error that
other jobs' load on a shared machine barely moves (absent with ``--cost-model``). A shared
machine's speed also drifts over the minutes a run takes (whole runs of the same code came out
−4.8% and +5.4% in median error), so after training the model is calibrated again
(``--no-recalibrate`` skips it): every executed plan is priced by that calibration too, the
``bracketed_*`` errors use the mean of the two prices, and ``calibration_drift`` says how far
the machine moved. Plans are only ever made with the first calibration. The step-0
loss of every policy is recorded: same weights, same batch, different plans, so it must agree
(plan invariance).

Writes e2e.json, e2e.png and e2e_profile.json (the raw calibration, as ``seqmoe profile``
writes it; benchmarks/projection.py reads it) under --out-dir (default runs/bench/; the stem
is --name).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU + gloo benchmark; deepspeed reads this on import

import torch
import torch.distributed as dist

# sys.path[0] is this script's folder: put the repository first (benchmarks/planner.py would
# otherwise shadow the planner package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, spawn_ranks, write_json  # noqa: E402
from parallel import comm  # noqa: E402
from planner.baselines import batch_adaptive, static_sp  # noqa: E402
from planner.cost import CostModel  # noqa: E402
from planner.plan import StepPlan  # noqa: E402
from planner.solver import plan_step  # noqa: E402
from runtime.config import Config, load_config  # noqa: E402
from runtime.data import build_dataset  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.toml"
PRESET = "tiny-cpu"
FLEXSP_PAPER = "FlexSP (A100, measured): up to 1.72x vs DeepSpeed-Ulysses, 1.42x vs BatchAda; cost-model error < 6%"
# The cost model's memory side; everything else comes from the calibration.
MEMORY_FIELDS = ("act_mb_per_token", "memory_budget_gb", "model_state_gb", "kv_gather_mb_per_token", "max_degree")


def policies(world_size: int) -> list[str]:
    degrees = [1 << i for i in range(world_size.bit_length()) if 1 << i <= world_size]
    return ["flexsp", *(f"static-{d}" for d in degrees), "batch_adaptive"]


def make_plan(policy: str, lengths: list[int], *, num_ranks: int, cost: CostModel, time_limit_s: float) -> StepPlan:
    """The plan a rank-0 ``runtime.train.StepPlanner`` would make for this policy."""
    if policy == "flexsp":
        return plan_step(lengths, num_ranks=num_ranks, cost=cost, time_limit_s=time_limit_s)
    if policy == "batch_adaptive":
        return batch_adaptive(lengths, num_ranks=num_ranks, cost=cost)
    return static_sp(lengths, num_ranks=num_ranks, sp_degree=int(policy.split("-")[1]), cost=cost)


def _microbatch_ms(plan: StepPlan, lengths: list[int], cost: CostModel) -> list[float]:
    return [
        max(cost.group_time_ms([lengths[i] for i in g.seq_indices], g.degree) for g in mb.groups)
        for mb in plan.microbatches
    ]


def predicted_s(plan: StepPlan, lengths: list[int], cost: CostModel) -> float:
    """A plan's forward + backward time under ``cost``: Σ over micro-batches of the slowest group's time."""
    return sum(_microbatch_ms(plan, lengths, cost)) / 1e3


def bracket(plans_info: dict, executed: dict, batches: list, after: CostModel, cpu_after: CostModel) -> None:
    """Price every executed plan with the calibration made after training too, and record the
    mean of the two calibrations' prices (``bracketed_*``): the machine's speed at the midpoint
    of a run, not only at its start, for the error of the model itself."""
    for policy, plans in executed.items():
        for info, plan, lengths in zip(plans_info[policy], plans, batches):
            info.update(
                after_s=predicted_s(plan, lengths, after),
                after_step_s=predicted_step_s(plan, lengths, after),
                after_cpu_step_s=predicted_step_s(plan, lengths, cpu_after),
            )
            for name, before, later in (
                ("bracketed_s", "predicted_s", "after_s"),
                ("bracketed_step_s", "predicted_step_s", "after_step_s"),
                ("bracketed_cpu_step_s", "predicted_cpu_step_s", "after_cpu_step_s"),
            ):
                info[name] = (info[before] + info[later]) / 2


def predicted_step_s(plan: StepPlan, lengths: list[int], cost: CostModel) -> float:
    """A plan's whole step under ``cost``: the micro-batches plus the per-step term (step_ms)."""
    return cost.step_time_ms(_microbatch_ms(plan, lengths, cost)) / 1e3


def skip_reason(policy: str, batches: list[list[int]], cost: CostModel) -> str | None:
    """Why a static degree cannot run these batches (None if it can)."""
    if not policy.startswith("static-"):
        return None
    degree = int(policy.split("-")[1])
    longest = max(max(b) for b in batches)
    if longest > cost.token_capacity(degree):
        return (
            f"a {longest}-token sequence exceeds the {cost.token_capacity(degree)} tokens a group of {degree} "
            f"rank(s) holds under the cost model's memory cap"
        )
    return None


# -------------------------------------------------------------------------------------------
# Configuration and cost models


def build_config(args) -> Config:
    overrides = [
        f"--data.max_seq_len={args.max_seq_len}",
        f"--data.global_batch_sequences={args.batch_sequences}",
        f"--train.steps={args.steps + args.warmup}",
        "--train.eval_every=0",
        "--planner.async_plan=false",  # plans are made up front here (see the module docstring)
        f"--launch.nproc_per_node={args.world_size}",
        *(f"--{item}" for item in args.set),
    ]
    return load_config(str(CONFIG), overrides)


def calibrate(config: Config, args) -> tuple[CostModel, CostModel, dict, CostModel | None]:
    """(raw profile, cost model to plan with, calibration facts, the CPU-time model or None
    when a saved calibration is reused); see the module docstring."""
    from runtime.profile import profile_cost_model

    start = time.perf_counter()
    if args.cost_model:
        measured, cpu = CostModel.from_json(args.cost_model), None
        info = {"source": str(args.cost_model), "calibration_s": 0.0}
    else:
        # timed where the plans' groups fit: under the preset's synthetic cap, or the measured memory
        memory = CostModel.preset(PRESET, world_size=args.world_size) if args.memory == "preset" else None
        result = profile_cost_model(
            config,
            world_size=args.world_size,
            lengths=args.calibration_lengths,
            repeats=args.calibration_repeats,
            memory=memory,
        )
        measured, cpu = result.cost, result.cpu_cost
        info = {
            "source": "runtime.profile.profile_cost_model in this run",
            "lengths": args.calibration_lengths,
            "repeats": args.calibration_repeats,
            "fit_points": result.points,
            "fit_mean_abs_rel_error": result.mean_abs_rel_error,
            "fit_max_abs_rel_error": result.max_abs_rel_error,
            # the training steps that identify step_ms apart from beta_ms (runtime/step_profile.py)
            "step_points": result.step_points,
            "step_fit": result.step_fit,
            "step_fit_mean_abs_rel_error": result.step_mean_abs_rel_error,
            "warnings": result.warnings,
            "calibration_s": time.perf_counter() - start,
        }
    calibrated = calibrated_cost(measured, world_size=args.world_size, memory=args.memory)
    if cpu is not None:
        cpu = calibrated_cost(cpu, world_size=args.world_size, memory=args.memory)
    return measured, calibrated, info, cpu


def calibrated_cost(profiled: CostModel, *, world_size: int, memory: str = "preset") -> CostModel:
    """The profile's time coefficients with the memory side of the ``tiny-cpu`` preset for
    ``world_size`` ranks (``memory="preset"``, its synthetic cap) or as profiled ("measured")."""
    if memory == "measured":
        return dataclasses.replace(profiled, name=f"{PRESET}-calibrated")
    preset = CostModel.preset(PRESET, world_size=world_size)
    fields = {name: getattr(preset, name) for name in MEMORY_FIELDS}
    notes = f"{profiled.notes}; memory fields from the {PRESET!r} preset for {world_size} ranks (its synthetic cap)"
    return dataclasses.replace(profiled, **fields, name=f"{PRESET}-calibrated", notes=notes)


# -------------------------------------------------------------------------------------------
# The training ranks


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _measure_step(ctx, model, engine, config: Config, plan: StepPlan, batch, step: int) -> dict:
    from runtime.lr_schedule import lr_at
    from runtime.step import train_step

    t = config.train
    lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.steps)

    W = ctx.world_size
    dist.barrier(group=ctx.world)
    with comm.CommMeter() as meter:
        start, cpu = time.perf_counter(), time.process_time()
        result = train_step(model, engine, ctx, plan, batch, lr=lr)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    sent = meter.total_bytes_sent
    times = torch.zeros(W, 4, dtype=torch.float64)
    times[ctx.rank] = torch.tensor([wall, result.forward_backward_s, cpu, float(sent)], dtype=torch.float64)
    dist.all_reduce(times, group=ctx.world)
    return {
        "step_s": float(times[:, 0].max()),
        "fwd_bwd_s": float(times[:, 1].max()),
        "cpu_s_all_ranks": float(times[:, 2].sum()),
        "cpu_s_max_rank": float(times[:, 2].max()),
        "fwd_bwd_s_by_rank": times[:, 1].tolist(),
        "comm_bytes_sent_max_rank": int(times[:, 3].max()),
        "comm_by_kind": meter.summary(),  # this rank's (rank 0's in the JSON rows)
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "tokens": result.tokens,
    }


def _worker(rank: int, world: int, store: str, job: dict, out_queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the machine's cores
    _quiet_deepspeed()
    from parallel.context import ParallelContext
    from runtime.model import build_model
    from runtime.train import build_engine

    config: Config = job["config"]
    ctx = ParallelContext.initialize(backend="gloo", device="cpu", init_method=f"file://{store}")
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    seed = config.train.seed
    runs = {}
    for policy in job["policies"]:
        torch.manual_seed(seed)  # the same initial weights for every policy
        model = build_model(
            config.model,
            config.parallel,
            config.moe,
            balance_group=ctx.world,
            seed=seed,
            domain_names=dataset.domain_names,
        )
        runs[policy] = (model, build_engine(model, config))
    rows = []
    names = list(job["policies"])
    for step in range(job["num_steps"]):
        batch = dataset.train_batch(step, seed)
        for policy in names[step % len(names) :] + names[: step % len(names)]:
            model, engine = runs[policy]
            plan = StepPlan.from_json(job["plans"][policy][step])
            measured = _measure_step(ctx, model, engine, config, plan, batch, step)
            if rank == 0:
                measured.update(step=step, policy=policy)
                rows.append(measured)
                print(
                    f"step {step:>3} {policy:>15}: {measured['step_s'] * 1e3:8.1f} ms "
                    f"({measured['tokens'] / measured['step_s']:7.0f} tok/s), loss {measured['loss']:.4f}",
                    flush=True,
                )
    if rank == 0:
        out_queue.put(rows)
    ctx.destroy()


def run_workers(job: dict, world: int, timeout_s: float = 3600.0) -> list[dict]:
    return spawn_ranks(world, _worker, job, timeout_s=timeout_s)


# -------------------------------------------------------------------------------------------
# Summary


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # a fit with no time at all prices every plan at 0


def _error_stats(pairs: list[tuple[float, float]]) -> dict:
    """Relative error predicted / measured - 1 over (predicted, measured) pairs."""
    errors = [p / m - 1 for p, m in pairs]
    return {
        "median_pct": 100 * _median(errors),
        "mean_abs_pct": 100 * statistics.fmean(abs(e) for e in errors),
        "max_abs_pct": 100 * max(abs(e) for e in errors),
    }


def _cpu_error_stats(info: list[dict], rows: list[dict]) -> dict | None:
    """The CPU-time model's error against the steps' busiest-rank CPU time (None without one)."""
    pairs = [(i["predicted_cpu_step_s"], r["cpu_s_max_rank"]) for i, r in zip(info, rows)]
    if not pairs or any(p is None for p, _ in pairs):
        return None
    return _error_stats(pairs)


def _linear_fit(xs: list[float], ys: list[float]) -> dict:
    """measured ≈ slope · predicted + intercept (least squares)."""
    n, mx, my = len(xs), statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else float("nan")
    return {"slope": slope, "intercept_s": my - slope * mx, "points": n}


def repeat_noise(measured: list[dict], plans_info: dict) -> dict:
    """How far two measurements of the same plan of the same batch lie apart (policies that
    chose identical groups): |a − b| / mean, in %, for the whole step and its CPU time. A model
    cannot be judged closer than this noise floor."""
    by_plan: dict[tuple, list[dict]] = {}
    for r in measured:
        by_plan.setdefault((r["step"], repr(plans_info[r["policy"]][r["step"]]["groups"])), []).append(r)
    pairs = [(a, b) for same in by_plan.values() for i, a in enumerate(same) for b in same[i + 1 :]]

    def spread(key: str) -> float | None:
        diffs = [abs(a[key] - b[key]) / ((a[key] + b[key]) / 2) for a, b in pairs]
        return 100 * statistics.fmean(diffs) if diffs else None

    return {"pairs": len(pairs), "step_mean_abs_pct": spread("step_s"), "cpu_mean_abs_pct": spread("cpu_s_max_rank")}


def summarise(rows: list[dict], plans_info: dict, warmup: int) -> dict:
    measured = [r for r in rows if r["step"] >= warmup]
    out: dict = {"per_policy": {}, "speedups": {}, "cost_model_error": {}}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in measured if r["policy"] == policy]
        info = [plans_info[policy][r["step"]] for r in mine]
        # the background planner plans step i+1 while step i trains
        previous = {r["step"]: r["step_s"] for r in rows if r["policy"] == policy}
        overlap = [plans_info[policy][s]["solve_time_s"] <= previous[s - 1] for s in previous if s - 1 in previous]
        out["per_policy"][policy] = {
            "steps": len(mine),
            "tokens_per_s": _median([r["tokens"] / r["step_s"] for r in mine]),
            "step_s": _median([r["step_s"] for r in mine]),
            "fwd_bwd_s": _median([r["fwd_bwd_s"] for r in mine]),
            "optimizer_s": _median([r["step_s"] - r["fwd_bwd_s"] for r in mine]),
            "cpu_s_all_ranks": _median([r["cpu_s_all_ranks"] for r in mine]),
            "comm_bytes_per_step_max_rank": _median([r["comm_bytes_sent_max_rank"] for r in mine]),
            "microbatches": _median([i["microbatches"] for i in info]),
            "solve_time_s": {
                "median": _median([i["solve_time_s"] for i in info]),
                "max": max(i["solve_time_s"] for i in info),
            },
            "solve_overlappable_share": sum(overlap) / len(overlap) if overlap else None,
            "predicted_s": _median([i["predicted_s"] for i in info]),
            "predicted_preset_s": _median([i["predicted_preset_s"] for i in info]),
            "predicted_step_s": _median([i["predicted_step_s"] for i in info]),
            "cost_model_error": {
                "calibrated_vs_fwd_bwd": _error_stats([(i["predicted_s"], r["fwd_bwd_s"]) for i, r in zip(info, mine)]),
                "calibrated_vs_step": _error_stats([(i["predicted_step_s"], r["step_s"]) for i, r in zip(info, mine)]),
                "preset_vs_fwd_bwd": _error_stats(
                    [(i["predicted_preset_s"], r["fwd_bwd_s"]) for i, r in zip(info, mine)]
                ),
                "preset_vs_step": _error_stats(
                    [(i["predicted_preset_step_s"], r["step_s"]) for i, r in zip(info, mine)]
                ),
                "calibrated_cpu_time_vs_step_cpu": _cpu_error_stats(info, mine),
            },
        }
    per = out["per_policy"]
    if "flexsp" in per:
        flex = plans_info["flexsp"]
        for policy in per:
            if policy != "flexsp":
                # per-step ratios: the policies ran the same batch back to back
                ratios = [
                    a["step_s"] / b["step_s"]
                    for a in measured
                    for b in measured
                    if a["policy"] == policy and b["policy"] == "flexsp" and a["step"] == b["step"]
                ]
                out["speedups"][f"flexsp_vs_{policy}"] = {
                    "measured_median_of_step_ratios": _median(ratios),
                    "measured_tokens_per_s_ratio": per["flexsp"]["tokens_per_s"] / per[policy]["tokens_per_s"],
                    "predicted_median_ratio": _median(
                        [
                            _ratio(plans_info[policy][s]["predicted_step_s"], flex[s]["predicted_step_s"])
                            for s in {r["step"] for r in measured}
                        ]
                    ),
                }
    keys = {
        ("calibrated", "fwd_bwd_s"): "predicted_s",
        ("calibrated", "step_s"): "predicted_step_s",  # with the per-step term step_ms
        ("preset", "fwd_bwd_s"): "predicted_preset_s",
        ("preset", "step_s"): "predicted_preset_step_s",
    }
    for model in ("calibrated", "preset"):
        for part in ("fwd_bwd_s", "step_s"):
            key = keys[model, part]
            pairs = [(plans_info[r["policy"]][r["step"]][key], r[part]) for r in measured]
            out["cost_model_error"][f"{model}_vs_{part[:-2]}"] = {
                **_error_stats(pairs),
                "fit_measured_vs_predicted": _linear_fit([p for p, _ in pairs], [m for _, m in pairs]),
            }
    infos = [plans_info[r["policy"]][r["step"]] for r in measured]
    out["cost_model_error"]["calibrated_cpu_time_vs_step_cpu"] = _cpu_error_stats(infos, measured)
    if all("bracketed_step_s" in i for i in infos):  # calibrated again after training
        for part, key in (("fwd_bwd_s", "bracketed_s"), ("step_s", "bracketed_step_s")):
            pairs = [(i[key], r[part]) for i, r in zip(infos, measured)]
            out["cost_model_error"][f"bracketed_vs_{part[:-2]}"] = _error_stats(pairs)
        cpu = [(i["bracketed_cpu_step_s"], r["cpu_s_max_rank"]) for i, r in zip(infos, measured)]
        out["cost_model_error"]["bracketed_cpu_time_vs_step_cpu"] = _error_stats(cpu)
        # how far the machine moved while training: the later calibration's price over the earlier
        out["calibration_drift"] = {
            "after_over_before_median": _median([i["after_step_s"] / i["predicted_step_s"] for i in infos]),
            "cpu_after_over_before_median": _median([i["after_cpu_step_s"] / i["predicted_cpu_step_s"] for i in infos]),
        }
    out["repeat_noise"] = repeat_noise(measured, plans_info)
    losses = {r["policy"]: r["loss"] for r in rows if r["step"] == 0}
    first = next(iter(losses.values()))
    # same weights, same batch, different plans: the step-0 loss must agree (plan invariance)
    out["step0_loss_max_rel_diff"] = max(abs(v - first) / abs(first) for v in losses.values())
    return out


# -------------------------------------------------------------------------------------------
# Plot and main


def plot(summary: dict, rows: list[dict], plans_info: dict, warmup: int, skipped: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summary["per_policy"]
    names = list(per)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    ax.bar(names, [per[p]["tokens_per_s"] for p in names], color=[f"C{i}" for i in range(len(names))])
    for p in names:
        values = [r["tokens"] / r["step_s"] for r in rows if r["policy"] == p and r["step"] >= warmup]
        ax.plot([names.index(p)] * len(values), values, "k.", ms=3)
    ax.set_ylabel("tokens/s (bars: median; dots: steps)")
    ax.set_title("measured training throughput", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    if skipped:
        ax.text(
            0.01, 0.98, "skipped: " + ", ".join(skipped), transform=ax.transAxes, va="top", fontsize=7, color="dimgrey"
        )
    for ax, key, step_key, label in (
        (axes[1], "predicted_s", "predicted_step_s", "calibrated cost model"),
        (axes[2], "predicted_preset_s", "predicted_preset_step_s", f"uncalibrated {PRESET} preset"),
    ):
        top = 0.0
        for i, p in enumerate(names):
            mine = [r for r in rows if r["policy"] == p and r["step"] >= warmup]
            xs = [plans_info[p][r["step"]][key] for r in mine]
            ax.plot(xs, [r["fwd_bwd_s"] for r in mine], "o", color=f"C{i}", ms=4, label=f"{p} fwd+bwd")
            steps = [plans_info[p][r["step"]][step_key] for r in mine]
            ax.plot(steps, [r["step_s"] for r in mine], "x", color=f"C{i}", ms=4)
            top = max(top, *xs, *steps, *(r["step_s"] for r in mine))
        ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", ls="--", lw=1)
        which = "calibrated" if key == "predicted_s" else "preset"
        err, whole = (summary["cost_model_error"][f"{which}_vs_{part}"] for part in ("fwd_bwd", "step"))
        ax.set_title(
            f"{label}: mean |error| {err['mean_abs_pct']:.1f}% fwd+bwd, {whole['mean_abs_pct']:.1f}% step", fontsize=10
        )
        ax.set_xlabel("predicted (s): o micro-batches, x with step_ms")
        ax.set_ylabel("measured, slowest rank (s): o fwd+bwd, x whole step")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 measured steps, 2 calibration repeats")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--name", default="e2e", help="stem of the output files (default e2e)")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--steps", type=int, help="measured steps per policy (quick: 4, full: 24)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per policy")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="data.max_seq_len (longer documents split)")
    parser.add_argument("--batch-sequences", type=int, default=16, help="sequences per global batch")
    parser.add_argument("--time-limit", type=float, default=1.0, help="planner time limit per step (s)")
    parser.add_argument("--cost-model", type=Path, help="a `seqmoe profile` JSON to reuse (skips calibration)")
    parser.add_argument(
        "--memory",
        choices=("preset", "measured"),
        default="preset",
        help="memory side of the cost model: the preset's synthetic cap or the profile's",
    )
    parser.add_argument("--calibration-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--calibration-repeats", type=int, help="timed repeats per calibration point (quick 2, full 3)")
    parser.add_argument("--policies", nargs="+", help="subset of the policies to run (default: all)")
    parser.add_argument(
        "--recalibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate again after training and also report the error of the two calibrations' mean "
        "(a shared machine's speed drifts over minutes; default on, off with --cost-model)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config overrides of configs/tiny-cpu.toml, e.g. model.d_model=64",
    )
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 24)
    args.calibration_repeats = args.calibration_repeats or (2 if args.quick else 3)
    W = args.world_size
    if W < 2 or W & (W - 1):
        parser.error(f"--world-size must be a power of two >= 2, got {W}")
    chosen = args.policies or policies(W)
    unknown = [p for p in chosen if p not in policies(W)]
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {policies(W)}")
    start, load_start = time.perf_counter(), os.getloadavg()
    config = build_config(args)
    print(f"calibrating the cost model on {W} gloo ranks ...", flush=True)
    profiled, cost, calibration, cpu_cost = calibrate(config, args)
    for warning in calibration.get("warnings", []):
        print(f"calibration warning: {warning}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.cost_model:  # what `seqmoe profile` writes: reusable with --cost-model
        (args.out_dir / f"{args.name}_profile.json").write_text(profiled.to_json() + "\n")
    preset = CostModel.preset(PRESET, world_size=W)

    num_steps = args.warmup + args.steps
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    batches = [dataset.train_batch(s, config.train.seed).lengths for s in range(num_steps)]
    skipped = {p: r for p in chosen if (r := skip_reason(p, batches, cost)) is not None}
    for policy, reason in skipped.items():
        print(f"skipping {policy}: {reason}", flush=True)
    run = [p for p in chosen if p not in skipped]
    plans, plans_info, executed = {}, {}, {}
    for policy in run:
        plans[policy], plans_info[policy], executed[policy] = [], [], []
        for lengths in batches:
            plan = make_plan(policy, lengths, num_ranks=W, cost=cost, time_limit_s=args.time_limit)
            plan.validate(lengths, cost)
            plans[policy].append(plan.to_json())
            executed[policy].append(plan)
            plans_info[policy].append(
                {
                    "solve_time_s": plan.solve_time_s,
                    "solver": plan.solver,
                    "predicted_s": plan.predicted_time_s,
                    "predicted_preset_s": predicted_s(plan, lengths, preset),
                    "predicted_step_s": predicted_step_s(plan, lengths, cost),
                    "predicted_preset_step_s": predicted_step_s(plan, lengths, preset),
                    # the same plan priced in process CPU time, which the machine's load barely moves
                    "predicted_cpu_step_s": predicted_step_s(plan, lengths, cpu_cost) if cpu_cost else None,
                    "microbatches": len(plan.microbatches),
                    "shape": plan.shapes(),
                    # the plan's groups alone: policies that chose the same ones ran the same work
                    "groups": [[[list(g.ranks), g.seq_indices] for g in mb.groups] for mb in plan.microbatches],
                }
            )
    print(f"training {len(run)} policies x {num_steps} steps on {W} ranks ...", flush=True)
    job = {"config": config, "policies": run, "num_steps": num_steps, "plans": plans}
    train_start = time.perf_counter()
    rows = run_workers(job, W)
    train_s = time.perf_counter() - train_start
    after = None
    if args.recalibrate and not args.cost_model:
        print(f"calibrating again after training on {W} gloo ranks ...", flush=True)
        after = calibrate(config, args)
        bracket(plans_info, executed, batches, after[1], after[3])
    for r in rows:
        r.update(plans_info[r["policy"]][r["step"]])
    summary = summarise(rows, plans_info, args.warmup)
    payload = {
        "machine": machine_info(),
        "versions": {name: _package_version(name) for name in ("deepspeed", "pulp", "highspy", "seqmoe")},
        "config": {
            "world_size": W,
            "model": dataclasses.asdict(config.model),
            "moe": dataclasses.asdict(config.moe),
            "parallel": dataclasses.asdict(config.parallel),
            "data": dataclasses.asdict(config.data),
            "train": {k: v for k, v in dataclasses.asdict(config.train).items() if k in ("seed", "lr", "zero_stage")},
            "steps_measured": args.steps,
            "warmup_steps": args.warmup,
            "planner_time_limit_s": args.time_limit,
            "memory": args.memory,
            "quick": args.quick,
            "batch_lengths": batches,
            "threads_per_rank": max(1, (os.cpu_count() or 1) // W),
        },
        "cost_models": {
            "calibrated": json_fields(cost),
            "calibrated_cpu_time": json_fields(cpu_cost) if cpu_cost else None,
            "profiled": json_fields(profiled),
            "calibration": calibration,
            "calibrated_after": json_fields(after[1]) if after else None,
            "calibrated_cpu_time_after": json_fields(after[3]) if after and after[3] else None,
            "calibration_after": after[2] if after else None,
            "preset": json_fields(preset),
        },
        "policies": {
            p: ({"status": "skipped", "reason": skipped[p]} if p in skipped else {"status": "ran"}) for p in chosen
        },
        "summary": summary,
        "paper": FLEXSP_PAPER,
        "rows": rows,
        "runtime_s": {
            "calibration": calibration["calibration_s"],
            "calibration_after": after[2]["calibration_s"] if after else 0.0,
            "training": train_s,
            "total": time.perf_counter() - start,
        },
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    }
    path = write_json(args.name, payload, args.out_dir)
    memory = "synthetic memory cap" if args.memory == "preset" else "no memory cap"
    title = (
        f"seqmoe e2e (measured): {W} gloo ranks on {os.cpu_count()} CPU cores, tiny-cpu hybrid MoE, {memory}, "
        f"{args.batch_sequences} seqs/batch up to {args.max_seq_len} tokens, {args.steps} measured steps"
    )
    plot(summary, rows, plans_info, args.warmup, skipped, args.out_dir / f"{args.name}.png", title)
    for policy, s in summary["per_policy"].items():
        err = s["cost_model_error"]
        cpu = err["calibrated_cpu_time_vs_step_cpu"]
        print(
            f"{policy:>15}: {s['tokens_per_s']:7.0f} tok/s, step {s['step_s'] * 1e3:7.0f} ms "
            f"(fwd+bwd {s['fwd_bwd_s'] * 1e3:6.0f}), {s['comm_bytes_per_step_max_rank'] / 2**20:6.2f} MiB, "
            f"solve {s['solve_time_s']['median'] * 1e3:5.0f} ms, predicted step {s['predicted_step_s'] * 1e3:6.0f} ms "
            f"(calibrated mean |err| {err['calibrated_vs_step']['mean_abs_pct']:.1f}% step, "
            f"{err['calibrated_vs_fwd_bwd']['mean_abs_pct']:.1f}% fwd+bwd"
            + (f", {cpu['mean_abs_pct']:.1f}% CPU time; " if cpu else "; ")
            + f"preset {err['preset_vs_fwd_bwd']['median_pct']:+.0f}% fwd+bwd median)"
        )
    noise = summary["repeat_noise"]
    for name, e in summary["cost_model_error"].items():
        if e is not None:
            print(f"cost model {name}: mean |error| {e['mean_abs_pct']:.1f}%, median {e['median_pct']:+.1f}%")
    if noise["pairs"]:
        print(
            f"noise floor, the same plan measured twice ({noise['pairs']} pairs): "
            f"{noise['step_mean_abs_pct']:.1f}% step, {noise['cpu_mean_abs_pct']:.1f}% CPU time"
        )
    if "calibration_drift" in summary:
        drift = summary["calibration_drift"]
        print(
            f"calibration after training over before (median over the executed plans): "
            f"{drift['after_over_before_median']:.3f} wall, {drift['cpu_after_over_before_median']:.3f} CPU time"
        )
    for name, s in summary["speedups"].items():
        print(
            f"{name}: measured {s['measured_median_of_step_ratios']:.2f}x, predicted {s['predicted_median_ratio']:.2f}x"
        )
    print(f"step-0 loss max relative difference across policies: {summary['step0_loss_max_rel_diff']:.2e}")
    print(f"wrote {path} and {args.name}.png in {time.perf_counter() - start:.0f} s")


def json_fields(cost: CostModel) -> dict:
    import json

    return json.loads(cost.to_json())


if __name__ == "__main__":
    main()
