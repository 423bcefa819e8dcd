"""Planner benchmark: plan quality and planning time of seqmoe's per-step SP planner against
Megatron-core's dynamic-CP scheduler, static SP and batch-adaptive SP, side by side on the same
long-tailed batches and priced by the same cost model; and planning time and memory at
thousands of ranks.

    python benchmarks/planner.py [--quick] [--out-dir DIR]
    seqmoe bench planner [--quick]

FlexSP's setting (research/flexsp.md section 1): 64 ranks, global batches of 512 sequences capped
at 192K tokens (or the longest sequence the cluster holds), Wikipedia, GitHub and CommonCrawl
lengths (the synthetic fits of planner/distributions.py), under every cost-model preset:
``flexsp-gpt7b-a100`` (Ulysses all-to-all, GPT-7B on A100-40GB), ``hybrid-1b-h100`` (LASP-2 +
LASP-2H all-gather + MoE) and ``tiny-cpu``. Per batch:

- ``seqmoe``: ``plan_step`` (power-of-two groups), its wall and CPU time, and whether planning
  the batch again gives the same plan; ``seqmoe_any``: ``plan_step(group_sizes='any')``;
- ``megatron_dcp``: planner.megatron_dcp (Megatron-core DefaultDynamicCPScheduler, dev @
  d48bd6be), its wall and CPU time;
- ``static``: static SP at the smallest degree that holds the cap (a fixed DeepSpeed-Ulysses
  configuration); ``batch_adaptive``: the best single degree per batch (FlexSP's BatchAda);
- every plan's predicted step time, and seqmoe's gap to the step's lower bound.

Scale (``--scale-ranks``, default 1024 and 4096): batches of 8 sequences per rank planned
whole by ``plan_step``: wall and CPU time, and peak memory (tracemalloc, in a separate call).

Context sweep (``--context-caps``, 32K to 1M): ``hybrid-1b-h100`` on GitHub batches capped at
each length, the predicted speedups and softmax attention's share of the compute: where
adaptive SP pays for a hybrid LASP-2 / LASP-2H + MoE model.

Paper, for reference (measured, not predicted): up to 1.98x vs Megatron-LM, 1.72x vs
DeepSpeed-Ulysses, and up to 1.42x from mixing degrees within a batch (vs BatchAda).
Writes planner.json and planner.png under --out-dir (default runs/bench/, git-ignored; pass
``--out-dir benchmarks/results`` to update the committed results).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import tracemalloc
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# sys.path[0] is this script's folder, where this file would shadow the planner package
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.common import DEFAULT_OUT_DIR, machine_info, write_json  # noqa: E402
from planner import plan_step  # noqa: E402
from planner.baselines import batch_adaptive, smallest_static_degree, static_sp  # noqa: E402
from planner.cost import CostModel  # noqa: E402
from planner.distributions import DEFAULT_CAP, length_stats, sample_lengths  # noqa: E402
from planner.flexsp_milp import flexsp_milp_plan  # noqa: E402
from planner.megatron_dcp import megatron_dynamic_cp  # noqa: E402

COST_MODELS = CostModel.presets()
DISTRIBUTIONS = ["wikipedia", "github", "commoncrawl"]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _degrees(plan) -> list[int]:
    return sorted({len(g.ranks) for mb in plan.microbatches for g in mb.groups if g.seq_indices})


def _timed(fn):
    """(result, wall s, CPU s of this process): CPU time is what the planner costs on an idle core."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure_batch(lengths: list[int], *, cost: CostModel, num_ranks: int, static_degree: int, args) -> dict:
    """Plan one batch with every method; one result row."""
    plan, wall_s, cpu_s = _timed(lambda: plan_step(lengths, num_ranks=num_ranks, cost=cost, solver=args.solver))
    plan.validate(lengths, cost)
    again = plan_step(list(lengths), num_ranks=num_ranks, cost=cost, solver=args.solver)
    any_cost = dataclasses.replace(cost, group_sizes="any")
    anysize, any_wall_s, _ = _timed(lambda: plan_step(lengths, num_ranks=num_ranks, cost=any_cost))
    anysize.validate(lengths, any_cost)
    megatron, mega_wall_s, mega_cpu_s = _timed(lambda: megatron_dynamic_cp(lengths, num_ranks=num_ranks, cost=cost))
    static = static_sp(lengths, num_ranks=num_ranks, sp_degree=static_degree, cost=cost)
    adaptive = batch_adaptive(lengths, num_ranks=num_ranks, cost=cost)
    stats = length_stats(lengths)
    t = plan.predicted_time_s
    return {
        "tokens": stats["tokens"],
        "max_len": stats["max"],
        "plan_wall_s": wall_s,
        "plan_cpu_s": cpu_s,
        "solve_time_s": plan.solve_time_s,
        "solver": plan.solver,
        "same_plan_twice": again.microbatches == plan.microbatches and again.predicted_time_s == t,
        "predicted_time_s": t,
        "lower_bound_s": plan.lower_bound_s,
        "gap_to_lower_bound": plan.gap_to_lower_bound,
        "num_microbatches": len(plan.microbatches),
        "degrees_used": _degrees(plan),
        "dropped": len(plan.dropped),
        "any_time_s": anysize.predicted_time_s,
        "any_plan_wall_s": any_wall_s,
        "any_degrees_used": _degrees(anysize),
        "any_gain": t / anysize.predicted_time_s,
        "megatron_time_s": megatron.predicted_time_s,
        "megatron_wall_s": mega_wall_s,
        "megatron_cpu_s": mega_cpu_s,
        "megatron_microbatches": len(megatron.microbatches),
        "static_degree": static_degree,
        "static_time_s": static.predicted_time_s,
        "static_microbatches": len(static.microbatches),
        "batch_adaptive_degree": _degrees(adaptive)[0],
        "batch_adaptive_time_s": adaptive.predicted_time_s,
        "speedup_vs_static": static.predicted_time_s / t,
        "speedup_vs_batch_adaptive": adaptive.predicted_time_s / t,
        "speedup_vs_megatron": megatron.predicted_time_s / t,
    }


def run_case(cost_name: str, distribution: str, args) -> list[dict]:
    # ZeRO shards the model states over all ranks: build the preset for this cluster size
    cost = CostModel.preset(cost_name, world_size=args.num_ranks)
    cap = min(args.cap, cost.max_sequence_length(args.num_ranks))
    static_degree = smallest_static_degree([cap], num_ranks=args.num_ranks, cost=cost)
    # one draw per distribution, cut into batches: every cost model sees the same batches
    lengths = sample_lengths(distribution, args.batches * args.batch_size, seed=args.seed, cap=cap)
    rows = []
    for b in range(args.batches):
        batch = lengths[b * args.batch_size : (b + 1) * args.batch_size]
        row = measure_batch(batch, cost=cost, num_ranks=args.num_ranks, static_degree=static_degree, args=args)
        rows.append({"cost_model": cost_name, "distribution": distribution, "batch": b, "cap": cap, **row})
        print(
            f"{cost_name:>17} {distribution:>11} batch {b:>2}: {row['tokens']:>9,} tokens, "
            f"{row['num_microbatches']} mb, plan {row['plan_wall_s']:.3f} s ({row['plan_cpu_s']:.3f} CPU), "
            f"x{row['speedup_vs_megatron']:.2f} vs Megatron ({row['megatron_wall_s']:.3f} s), "
            f"x{row['speedup_vs_static']:.2f} vs SP={static_degree}, "
            f"x{row['speedup_vs_batch_adaptive']:.2f} vs batch-adaptive, any-size x{row['any_gain']:.3f}, "
            f"gap {row['gap_to_lower_bound']:.1%}",
            flush=True,
        )
    return rows


def measure_scale(num_ranks: int, cost_name: str, args) -> dict:
    """Whole-cluster plans of 8 sequences per rank: time over batches, then memory of one plan."""
    cost = CostModel.preset(cost_name, world_size=num_ranks)
    cap = min(args.cap, cost.max_sequence_length(num_ranks))
    size = 8 * num_ranks
    lengths = sample_lengths("wikipedia", args.scale_batches * size, seed=args.seed, cap=cap)
    batches = [lengths[b * size : (b + 1) * size] for b in range(args.scale_batches)]
    walls, cpus, gaps = [], [], []
    for batch in batches:
        plan, wall_s, cpu_s = _timed(lambda batch=batch: plan_step(batch, num_ranks=num_ranks, cost=cost))
        plan.validate(batch, cost)
        walls.append(wall_s)
        cpus.append(cpu_s)
        gaps.append(plan.gap_to_lower_bound)
    tracemalloc.start()
    plan_step(batches[0], num_ranks=num_ranks, cost=cost)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row = {
        "num_ranks": num_ranks,
        "cost_model": cost_name,
        "sequences": size,
        "batches": len(batches),
        "plan_wall_s": _stats(walls),
        "plan_cpu_s": _stats(cpus),
        "peak_traced_mb": peak / 2**20,
        "gap_to_lower_bound": _stats(gaps),
    }
    print(
        f"scale {cost_name:>17} {num_ranks:>5} ranks x {size:>6} sequences: "
        f"plan median {row['plan_wall_s']['median']:.2f} s (CPU {row['plan_cpu_s']['median']:.2f}, "
        f"max {row['plan_cpu_s']['max']:.2f}), peak {row['peak_traced_mb']:.0f} MB, "
        f"gap median {row['gap_to_lower_bound']['median']:.1%}",
        flush=True,
    )
    return row


def measure_context(cap: int, args) -> dict:
    """hybrid-1b-h100 on --num-ranks ranks with sequences up to ``cap``: where adaptive SP pays."""
    cost = CostModel.preset("hybrid-1b-h100", world_size=args.num_ranks)
    cap = min(cap, cost.max_sequence_length(args.num_ranks))
    static_degree = smallest_static_degree([cap], num_ranks=args.num_ranks, cost=cost)
    lengths = sample_lengths("github", args.context_batches * args.batch_size, seed=args.seed, cap=cap)
    rows = []
    for b in range(args.context_batches):
        batch = lengths[b * args.batch_size : (b + 1) * args.batch_size]
        plan = plan_step(batch, num_ranks=args.num_ranks, cost=cost)
        t = plan.predicted_time_s
        static = static_sp(batch, num_ranks=args.num_ranks, sp_degree=static_degree, cost=cost).predicted_time_s
        adaptive = batch_adaptive(batch, num_ranks=args.num_ranks, cost=cost).predicted_time_s
        megatron = megatron_dynamic_cp(batch, num_ranks=args.num_ranks, cost=cost).predicted_time_s
        quad = sum(cost.quad_ms * s * s for s in batch)
        rows.append(
            {
                "vs_static": static / t,
                "vs_batch_adaptive": adaptive / t,
                "vs_megatron": megatron / t,
                # softmax attention's share of the batch's compute (quad_ms·s² over quad + lin)
                "softmax_share": quad / (quad + sum(cost.lin_ms * s for s in batch)),
                "microbatches": len(plan.microbatches),
            }
        )
    result = {"cap": cap, "static_degree": static_degree, "batches": len(rows)}
    result.update({key: statistics.median(r[key] for r in rows) for key in rows[0]})
    print(
        f"context cap {cap:>9,}: softmax share {result['softmax_share']:.0%}, vs static SP={static_degree} "
        f"{result['vs_static']:.2f}x, vs batch-adaptive {result['vs_batch_adaptive']:.2f}x, "
        f"vs Megatron {result['vs_megatron']:.2f}x",
        flush=True,
    )
    return result


def measure_flexsp_milp(num_ranks: int, batch_size: int, cost_name: str, args) -> list[dict]:
    """FlexSP's own virtual-group MILP (planner.flexsp_milp, wall-clock limited) side by side
    with seqmoe and Megatron DCP on GitHub batches of ``batch_size`` sequences."""
    cost = CostModel.preset(cost_name, world_size=num_ranks)
    cap = min(args.cap, cost.max_sequence_length(num_ranks))
    lengths = sample_lengths("github", args.flexsp_batches * batch_size, seed=args.seed, cap=cap)
    rows = []
    for b in range(args.flexsp_batches):
        batch = lengths[b * batch_size : (b + 1) * batch_size]
        ours, ours_wall, ours_cpu = _timed(lambda batch=batch: plan_step(batch, num_ranks=num_ranks, cost=cost))
        megatron = megatron_dynamic_cp(batch, num_ranks=num_ranks, cost=cost)
        limit = args.flexsp_time_limit
        (flexsp, record), wall, cpu = _timed(
            lambda batch=batch, limit=limit: flexsp_milp_plan(batch, num_ranks=num_ranks, cost=cost, time_limit_s=limit)
        )
        flexsp.validate(batch, cost)
        row = {
            "num_ranks": num_ranks,
            "batch_size": batch_size,
            "cost_model": cost_name,
            "batch": b,
            "seqmoe_time_s": ours.predicted_time_s,
            "seqmoe_plan_wall_s": ours_wall,
            "seqmoe_plan_cpu_s": ours_cpu,
            "flexsp_milp_time_s": flexsp.predicted_time_s,
            "flexsp_milp_wall_s": wall,
            "flexsp_milp_cpu_s": cpu,
            "flexsp_milp_record": record,
            "megatron_time_s": megatron.predicted_time_s,
            "lower_bound_s": ours.lower_bound_s,
            "seqmoe_vs_flexsp_milp": flexsp.predicted_time_s / ours.predicted_time_s,
            "flexsp_milp_vs_megatron": megatron.predicted_time_s / flexsp.predicted_time_s,
        }
        rows.append(row)
        print(
            f"flexsp-milp {cost_name:>17} {num_ranks:>3} x {batch_size:>3} batch {b}: "
            f"seqmoe {ours.predicted_time_s:.3f} s ({ours_cpu:.3f} s CPU), "
            f"FlexSP MILP {flexsp.predicted_time_s:.3f} s ({wall:.1f} s wall, "
            f"{record['milps']} MILPs, {record['hit_limit']} at the {limit:g} s limit), "
            f"Megatron {megatron.predicted_time_s:.3f} s",
            flush=True,
        )
    return rows


def _stats(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


_SUMMARISED = (
    "plan_wall_s",
    "plan_cpu_s",
    "megatron_wall_s",
    "megatron_cpu_s",
    "speedup_vs_static",
    "speedup_vs_batch_adaptive",
    "speedup_vs_megatron",
    "any_gain",
    "gap_to_lower_bound",
)


def summarise(rows: list[dict]) -> dict:
    """Per cost model and distribution, and per cost model over all distributions."""

    def block(mine: list[dict]) -> dict:
        result = {"batches": len(mine), "static_degree": mine[0]["static_degree"]}
        result.update({key: _stats([r[key] for r in mine]) for key in _SUMMARISED})
        result["same_plan_twice"] = all(r["same_plan_twice"] for r in mine)
        return result

    summary: dict = {}
    for cost_name in dict.fromkeys(r["cost_model"] for r in rows):
        mine = [r for r in rows if r["cost_model"] == cost_name]
        summary[cost_name] = {"all": block(mine)}
        for distribution in dict.fromkeys(r["distribution"] for r in mine):
            summary[cost_name][distribution] = block([r for r in mine if r["distribution"] == distribution])
    return summary


def plot(rows: list[dict], scale: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = list(dict.fromkeys(r["cost_model"] for r in rows))
    dists = list(dict.fromkeys(r["distribution"] for r in rows))
    panels = [
        ("speedup_vs_megatron", "predicted speedup vs Megatron-core dynamic CP", 1.0),
        ("speedup_vs_static", "predicted speedup vs static SP (smallest degree fitting the cap)", 1.0),
        ("speedup_vs_batch_adaptive", "predicted speedup vs batch-adaptive SP (best single degree)", 1.0),
        ("any_gain", "predicted gain of any group size over powers of two", 1.0),
        ("gap_to_lower_bound", "seqmoe: gap to the step's lower bound", None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    width = 0.8 / len(costs)
    for ax, (key, title, reference) in zip(axes.flat, panels):
        for c, cost_name in enumerate(costs):
            for d, dist in enumerate(dists):
                values = [r[key] for r in rows if r["cost_model"] == cost_name and r["distribution"] == dist]
                x = d + (c - (len(costs) - 1) / 2) * width
                ax.bar(x, statistics.median(values), width * 0.9, color=f"C{c}", label=cost_name if d == 0 else None)
                ax.plot([x] * len(values), values, "k.", ms=3)
        if reference is not None:
            ax.axhline(reference, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(dists)), dists)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    axes.flat[4].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax = axes.flat[5]
    for method, key, marker in (("seqmoe", "plan_cpu_s", "o"), ("Megatron DCP", "megatron_cpu_s", "x")):
        ax.plot([0] * len(rows), [r[key] for r in rows], marker, ms=4, alpha=0.5, label=f"{method}, 64 ranks")
    for c, cost_name in enumerate(dict.fromkeys(r["cost_model"] for r in scale)):
        mine = [r for r in scale if r["cost_model"] == cost_name]
        xs = [1 + i for i in range(len(mine))]
        ax.plot(xs, [r["plan_cpu_s"]["median"] for r in mine], "s-", color=f"C{c + 3}", label=f"seqmoe, {cost_name}")
        ax.set_xticks([0, *xs], ["64", *[str(r["num_ranks"]) for r in mine]])
    ax.axhline(0.1, color="grey", ls=":", lw=1)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("ranks (8 sequences per rank above 64)")
    ax.set_title("planning CPU time per batch (s); targets 0.1 s at 64 ranks, 1 s at scale", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(
        f"seqmoe planner vs baselines: {rows[0]['num_ranks']} ranks, batches of {rows[0]['batch_size']} "
        "sequences (bars: median, dots: batches; all times are cost-model predictions except planning)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flexsp_size(text: str) -> tuple[tuple[int, int], list[str] | None]:
    """'64x512:a,b' -> ((64, 512), ['a', 'b']); no ':' means every cost model."""
    size, _, names = text.partition(":")
    try:
        ranks, seqs = (int(x) for x in size.lower().split("x"))
    except ValueError:
        hint = "expected RANKSxSEQUENCES, e.g. 16x64 or 64x512:hybrid-1b-h100"
        raise SystemExit(f"--flexsp-sizes: got {text!r}; {hint}") from None
    return (ranks, seqs), (names.split(",") if names else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 batches per case instead of 20, scale 1024 only")
    parser.add_argument("--batches", type=int, help="batches per cost model and distribution")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-ranks", type=int, default=64)
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solver", default="highs", help="MILP backend for small micro-batches")
    parser.add_argument("--cost-models", nargs="+", default=COST_MODELS, choices=CostModel.presets())
    parser.add_argument("--distributions", nargs="+", default=DISTRIBUTIONS)
    parser.add_argument("--scale-ranks", nargs="*", type=int, help="whole-cluster planning sizes (default 1024 4096)")
    parser.add_argument("--scale-batches", type=int, help="batches per scale size (default 5; quick 1)")
    parser.add_argument(
        "--context-caps",
        nargs="*",
        type=int,
        default=[32 * 1024, 64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024],
        help="hybrid-1b-h100 context-length sweep: longest sequence per batch",
    )
    parser.add_argument("--context-batches", type=int, help="GitHub batches per context cap (default 5; quick 1)")
    parser.add_argument(
        "--flexsp-sizes",
        nargs="*",
        help="RANKSxSEQUENCES[:COST_MODEL,...] for FlexSP's own MILP baseline (default 8x32 16x64 on every "
        "cost model and 64x512 on flexsp-gpt7b-a100 and hybrid-1b-h100; quick: 8x32 on hybrid-1b-h100); none to skip",
    )
    parser.add_argument("--flexsp-batches", type=int, help="GitHub batches per FlexSP MILP size (default 2; quick 1)")
    parser.add_argument(
        "--flexsp-time-limit", type=float, help="FlexSP MILP wall-clock limit per micro-batch, s (default 5; quick 1)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="folder for the JSON and PNG results (default runs/bench/, git-ignored; pass "
        "--out-dir benchmarks/results to update the committed results)",
    )
    args = parser.parse_args()
    args.context_batches = args.context_batches or (1 if args.quick else 5)
    args.batches = args.batches or (2 if args.quick else 20)
    if args.scale_ranks is None:
        args.scale_ranks = [1024] if args.quick else [1024, 4096]
    args.scale_batches = args.scale_batches or (1 if args.quick else 5)
    args.flexsp_batches = args.flexsp_batches or (1 if args.quick else 2)
    if args.flexsp_sizes is None:
        big = "64x512:flexsp-gpt7b-a100,hybrid-1b-h100"
        args.flexsp_sizes = ["8x32:hybrid-1b-h100"] if args.quick else ["8x32", "16x64", big]
    args.flexsp_time_limit = args.flexsp_time_limit or (1.0 if args.quick else 5.0)
    # wall times depend on how busy the machine was: record it (CPU times much less so)
    load_at_start = os.getloadavg()[0]
    rows = []
    for cost_name in args.cost_models:
        for distribution in args.distributions:
            rows += run_case(cost_name, distribution, args)
    for row in rows:
        row.update(num_ranks=args.num_ranks, batch_size=args.batch_size)
    scale = [
        measure_scale(n, cost_name, args)
        for n in args.scale_ranks
        for cost_name in ("flexsp-gpt7b-a100", "hybrid-1b-h100")
        if cost_name in args.cost_models
    ]
    context = [measure_context(cap, args) for cap in args.context_caps] if "hybrid-1b-h100" in args.cost_models else []
    flexsp = [
        row
        for size, names in map(_flexsp_size, args.flexsp_sizes)
        for cost_name in args.cost_models
        if names is None or cost_name in names
        for row in measure_flexsp_milp(*size, cost_name, args)
    ]
    config = {
        "num_ranks": args.num_ranks,
        "batch_size": args.batch_size,
        "cap": args.cap,
        "batches": args.batches,
        "seed": args.seed,
        "solver": args.solver,
        "cost_models": args.cost_models,
        "distributions": args.distributions,
        "scale_ranks": args.scale_ranks,
        "scale_batches": args.scale_batches,
        "context_caps": args.context_caps,
        "context_batches": args.context_batches,
        "flexsp_sizes": args.flexsp_sizes,
        "flexsp_batches": args.flexsp_batches,
        "flexsp_time_limit_s": args.flexsp_time_limit,
        "quick": args.quick,
        "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
        "megatron_source": "NVIDIA/Megatron-LM dev @ d48bd6be0a85cc0d6d3cc71e8750cf357cc6bdb1",
        "pulp": _package_version("pulp"),
        "highspy": _package_version("highspy"),
    }
    summary = summarise(rows)
    payload = {
        "machine": machine_info(),
        "config": config,
        "summary": summary,
        "scale": scale,
        "context_sweep": context,
        "flexsp_milp": flexsp,
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json("planner", payload, args.out_dir)
    plot(rows, scale, args.out_dir / "planner.png")
    for cost_name, per in summary.items():
        s = per["all"]
        print(
            f"{cost_name}: plan median {s['plan_wall_s']['median']:.3f} s wall / {s['plan_cpu_s']['median']:.3f} s CPU "
            f"(max {s['plan_wall_s']['max']:.3f} / {s['plan_cpu_s']['max']:.3f}); "
            f"Megatron {s['megatron_wall_s']['median']:.3f} s; "
            f"speedup vs Megatron median {s['speedup_vs_megatron']['median']:.2f}x "
            f"[{s['speedup_vs_megatron']['min']:.2f}, {s['speedup_vs_megatron']['max']:.2f}], vs static "
            f"SP={s['static_degree']} {s['speedup_vs_static']['median']:.2f}x, vs batch-adaptive "
            f"{s['speedup_vs_batch_adaptive']['median']:.2f}x; any-size gain median {s['any_gain']['median']:.3f}x "
            f"(max {s['any_gain']['max']:.3f}x); gap median {s['gap_to_lower_bound']['median']:.1%} "
            f"(max {s['gap_to_lower_bound']['max']:.1%}); same plan twice: {s['same_plan_twice']}"
        )
    print(f"wrote {path} and {args.out_dir / 'planner.png'}")


if __name__ == "__main__":
    main()
