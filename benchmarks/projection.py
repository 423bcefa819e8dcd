"""Scaling PROJECTION of per-step SP planning: predicted step times from the cost models at 8 to
4096 ranks. Nothing is trained or measured here except the planner's own solve time.

    python benchmarks/projection.py [--quick] [--out-dir DIR]
    seqmoe bench projection [--quick]

For each cost model, each length distribution (synthetic fits of Wikipedia, CommonCrawl and
GitHub from planner/distributions.py) and each cluster size N, global batches of
``--seqs-per-rank`` x N sequences are planned. Cost models:

- ``flexsp-gpt7b-a100``: FlexSP's published GPT-7B / A100-40GB coefficients;
- ``hybrid-1b-h100``: our 1.3B hybrid MoE on H100s, FLOP-derived (not measured);
- ``tiny-cpu-calibrated``, when ``results/e2e_profile.json`` exists: the time coefficients
  ``benchmarks/e2e.py`` measured on this machine, with the memory the profile found here
  (0.8 x RAM / 4 ranks) and the 4-rank gloo loopback bandwidth for every degree above 4: a
  cluster of machines like this one, as if their links were as fast as loopback.

Policies:

- ``flexsp``: planner.solver.plan_step (mixed SP degrees per micro-batch);
- ``static``: planner.baselines.static_sp at every degree that holds the longest allowed
  sequence; "best static" is the degree with the least total predicted time over the batches
  of that (cost model, distribution, N), i.e. the best fixed configuration in hindsight, and
  "smallest static" the smallest degree that fits (what planner.py compares against);
- ``batch_adaptive``: the best single degree per batch (FlexSP-BatchAda).

Sequences are capped at min(192K, the longest sequence N ranks can hold), longer draws redrawn
(FlexSP drops them). ZeRO shards the model states over all N ranks (the presets are built for
N). Every cluster up to 4096 ranks is planned whole (``plan_step`` cuts micro-batches in
O(M log K log S) and plans 4096 ranks x 8 sequences in well under a second of CPU time). With
``--pod-ranks`` P smaller than N the cluster is planned as independent pods of P ranks, each
with its own share of the batch, and the step lasts as long as the slowest pod, for every
policy alike.

Writes projection.json and projection.png under --out-dir (default runs/bench/). Every
number except ``plan_wall_s`` is a cost-model prediction, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# sys.path[0] is this script's folder: put the repository first (benchmarks/planner.py would
# otherwise shadow the planner package)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, RESULTS_DIR, machine_info, write_json  # noqa: E402
from benchmarks.e2e import calibrated_cost  # noqa: E402
from planner.baselines import batch_adaptive, static_sp  # noqa: E402
from planner.cost import CostModel  # noqa: E402
from planner.distributions import DEFAULT_CAP, sample_lengths  # noqa: E402
from planner.solver import plan_step  # noqa: E402

KIND = "PROJECTION: cost-model predictions, not measurements (only plan_wall_s is measured, on this machine)"
PRESETS = ["flexsp-gpt7b-a100", "hybrid-1b-h100"]
CPU_MODEL = "tiny-cpu-calibrated"
DISTRIBUTIONS = ["wikipedia", "commoncrawl", "github"]
PAPER = "FlexSP (measured, 64 A100s): up to 1.72x vs DeepSpeed-Ulysses, 1.98x vs Megatron-LM, 1.42x vs BatchAda"


def cost_model(name: str, num_ranks: int, profile: Path | None) -> CostModel:
    if name == CPU_MODEL:
        # as profiled: this machine's memory (0.8 x RAM / 4 ranks), not e2e's synthetic cap, under
        # which 8 sequences per rank need dozens of micro-batches and planning takes minutes
        return calibrated_cost(CostModel.from_json(profile), world_size=num_ranks, memory="measured")
    return CostModel.preset(name, world_size=num_ranks)


def pods(num_ranks: int, pod_ranks: int) -> tuple[int, int]:
    """(number of pods, ranks per pod)."""
    if num_ranks <= pod_ranks:
        return 1, num_ranks
    if num_ranks % pod_ranks:
        raise ValueError(f"{num_ranks} ranks do not split into pods of {pod_ranks}")
    return num_ranks // pod_ranks, pod_ranks


def plan_batch(
    lengths: list[int], *, cost: CostModel, num_ranks: int, pod_ranks: int, degrees: list[int], time_limit_s: float
) -> dict:
    """Every policy on one global batch; pods take consecutive equal shares of it."""
    num_pods, ranks = pods(num_ranks, pod_ranks)
    share = len(lengths) // num_pods
    flexsp, adaptive, wall = [], [], []
    static: dict[int, list[float]] = {d: [] for d in degrees}
    used: set[int] = set()
    microbatches, solvers = [], []
    for p in range(num_pods):
        mine = lengths[p * share : (p + 1) * share]
        start = time.perf_counter()
        plan = plan_step(mine, num_ranks=ranks, cost=cost, time_limit_s=time_limit_s)
        wall.append(time.perf_counter() - start)
        flexsp.append(plan.predicted_time_s)
        microbatches.append(len(plan.microbatches))
        solvers.append(plan.solver)
        used |= {len(g.ranks) for mb in plan.microbatches for g in mb.groups if g.seq_indices}
        adaptive.append(batch_adaptive(mine, num_ranks=ranks, cost=cost).predicted_time_s)
        for d in degrees:
            static[d].append(static_sp(mine, num_ranks=ranks, sp_degree=d, cost=cost).predicted_time_s)
    return {
        "pods": num_pods,
        "pod_ranks": ranks,
        "tokens": sum(lengths),
        "max_len": max(lengths),
        "flexsp_s": max(flexsp),  # the step ends when the slowest pod ends
        "batch_adaptive_s": max(adaptive),
        "static_s": {str(d): max(t) for d, t in static.items()},
        "plan_wall_s": max(wall),
        "plan_wall_s_all_pods": sum(wall),
        "microbatches": max(microbatches),
        "degrees_used": sorted(used),
        # 'greedy': a MILP found nothing within the time left and that micro-batch got the best
        # single-degree packing; 'batch_adaptive': the best single-degree plan of the batch won
        "solvers": solvers,
    }


def run_case(name: str, distribution: str, num_ranks: int, args) -> list[dict]:
    cost = cost_model(name, num_ranks, args.cpu_profile)
    _, ranks = pods(num_ranks, args.pod_ranks)
    cap = min(DEFAULT_CAP, cost.max_sequence_length(ranks))
    degrees = [d for d in cost.degrees(ranks) if cost.token_capacity(d) >= cap]
    # the same seed for every cost model: they see the same batches wherever their caps agree
    # a batch of a cluster of pods already holds one batch per pod: one is enough there
    batches = args.batches if num_ranks <= args.pod_ranks else 1
    lengths = sample_lengths(distribution, batches * args.seqs_per_rank * num_ranks, seed=args.seed, cap=cap)
    size = args.seqs_per_rank * num_ranks
    rows = []
    for b in range(batches):
        batch = lengths[b * size : (b + 1) * size]
        row = plan_batch(
            batch,
            cost=cost,
            num_ranks=num_ranks,
            pod_ranks=args.pod_ranks,
            degrees=degrees,
            time_limit_s=args.time_limit,
        )
        rows.append(
            {
                "cost_model": name,
                "distribution": distribution,
                "num_ranks": num_ranks,
                "batch": b,
                "cap": cap,
                "batch_sequences": size,
                **row,
            }
        )
    # the best fixed degree in hindsight for this case, and the smallest that fits
    best = min(degrees, key=lambda d: (sum(r["static_s"][str(d)] for r in rows), d))
    for r in rows:
        r.update(
            best_static_degree=best,
            best_static_s=r["static_s"][str(best)],
            smallest_static_degree=degrees[0],
            smallest_static_s=r["static_s"][str(degrees[0])],
            speedup_vs_best_static=r["static_s"][str(best)] / r["flexsp_s"],
            speedup_vs_smallest_static=r["static_s"][str(degrees[0])] / r["flexsp_s"],
            speedup_vs_batch_adaptive=r["batch_adaptive_s"] / r["flexsp_s"],
            # the runtime plans step i+1 in the background while step i trains
            plan_overlappable=r["plan_wall_s"] <= r["flexsp_s"],
        )
        print(
            f"{name:>19} {distribution:>11} N={num_ranks:>4} batch {r['batch']}: {r['tokens']:>11,} tokens, "
            f"flexsp {r['flexsp_s']:8.3f} s ({r['microbatches']} mb, degrees {r['degrees_used']}), "
            f"x{r['speedup_vs_best_static']:.2f} vs best static SP={best}, "
            f"x{r['speedup_vs_batch_adaptive']:.2f} vs batch-adaptive, plan {r['plan_wall_s']:.2f} s",
            flush=True,
        )
    return rows


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict]) -> dict:
    keys = (
        "speedup_vs_best_static",
        "speedup_vs_smallest_static",
        "speedup_vs_batch_adaptive",
        "flexsp_s",
        "plan_wall_s",
    )
    summary: dict = {}
    for name in dict.fromkeys(r["cost_model"] for r in rows):
        summary[name] = {}
        for n in sorted({r["num_ranks"] for r in rows if r["cost_model"] == name}):
            mine = [r for r in rows if r["cost_model"] == name and r["num_ranks"] == n]
            entry = {key: _stats([r[key] for r in mine]) for key in keys}
            entry["best_static_degree"] = {r["distribution"]: r["best_static_degree"] for r in mine}
            entry["plan_overlappable_share"] = sum(r["plan_overlappable"] for r in mine) / len(mine)
            solvers = [s for r in mine for s in r["solvers"]]
            entry["solvers"] = {s: solvers.count(s) for s in sorted(set(solvers))}
            entry["cap"] = mine[0]["cap"]
            entry["pods"] = mine[0]["pods"]
            entry["per_distribution"] = {
                dist: {key: statistics.median(r[key] for r in mine if r["distribution"] == dist) for key in keys}
                for dist in dict.fromkeys(r["distribution"] for r in mine)
            }
            summary[name][str(n)] = entry
    return summary


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("speedup_vs_best_static", "predicted speedup vs best static SP degree"),
        ("speedup_vs_batch_adaptive", "predicted speedup vs batch-adaptive SP"),
        ("plan_wall_s", "plan_step wall time per pod (s), measured on this CPU\n(dashed: predicted flexsp step time)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for ax, (key, label) in zip(axes, panels):
        for c, (name, per) in enumerate(summary.items()):
            ns = [int(n) for n in per]
            med = [per[str(n)][key]["median"] for n in ns]
            lo = [per[str(n)][key]["min"] for n in ns]
            hi = [per[str(n)][key]["max"] for n in ns]
            ax.plot(ns, med, "o-", color=f"C{c}", label=name)
            ax.fill_between(ns, lo, hi, color=f"C{c}", alpha=0.15)
            if key == "plan_wall_s":  # planning overlaps a step when it is below that step's time
                ax.plot(ns, [per[str(n)]["flexsp_s"]["median"] for n in ns], "--", color=f"C{c}", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (GPUs); > 512: pods of 512 planned independently")
        ax.set_title(label, fontsize=10)
        if key == "plan_wall_s":
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\nfor scale: {PAPER}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 batch per case, Wikipedia only")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--seqs-per-rank", type=int, default=8, help="global batch = this x ranks sequences")
    parser.add_argument(
        "--batches", type=int, help="batches per case up to --pod-ranks ranks, 1 above (quick 1, full 2)"
    )
    parser.add_argument("--distributions", nargs="+", help="default: wikipedia commoncrawl github (quick: wikipedia)")
    parser.add_argument("--cost-models", nargs="+", help=f"default: {' '.join(PRESETS)} and {CPU_MODEL} if profiled")
    parser.add_argument(
        "--cpu-profile",
        type=Path,
        help=f"`seqmoe profile` JSON of the tiny-cpu model for {CPU_MODEL} (default: e2e_profile.json in --out-dir, "
        "else in benchmarks/results/)",
    )
    parser.add_argument("--pod-ranks", type=int, default=4096, help="plan larger clusters as pods of this many ranks")
    parser.add_argument(
        "--time-limit", type=float, default=5.0, help="plan_step time limit per pod (s; FlexSP uses 5-15 s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.batches = args.batches or (1 if args.quick else 2)
    if args.cpu_profile is None:  # what benchmarks/e2e.py wrote, in this run's folder first
        found = [d / "e2e_profile.json" for d in (args.out_dir, RESULTS_DIR) if (d / "e2e_profile.json").is_file()]
        args.cpu_profile = found[0] if found else RESULTS_DIR / "e2e_profile.json"
    distributions = args.distributions or (["wikipedia"] if args.quick else DISTRIBUTIONS)
    names = args.cost_models or PRESETS + ([CPU_MODEL] if args.cpu_profile.is_file() else [])
    if CPU_MODEL in names and not args.cpu_profile.is_file():
        parser.error(f"{CPU_MODEL} needs --cpu-profile (run benchmarks/e2e.py first); {args.cpu_profile} is missing")
    for n in args.ranks:
        if n < 1 or n & (n - 1):
            parser.error(f"--ranks: {n} is not a power of two")
        try:
            pods(n, args.pod_ranks)
        except ValueError as exc:
            parser.error(str(exc))
    start, load_start = time.perf_counter(), os.getloadavg()
    rows = []
    for name in names:
        for distribution in distributions:
            for n in args.ranks:
                rows += run_case(name, distribution, n, args)
    summary = summarise(rows)
    cost_models = {}
    for name in names:
        cost = cost_model(name, max(args.ranks), args.cpu_profile)
        cost_models[name] = {"notes": cost.notes, "coefficients_at_largest_N": cost.to_json()}
    payload = {
        "kind": KIND,
        "machine": machine_info(),
        "config": {
            "ranks": args.ranks,
            "seqs_per_rank": args.seqs_per_rank,
            "batches": args.batches,
            "distributions": distributions,
            "cost_models": names,
            "cpu_profile": str(args.cpu_profile) if CPU_MODEL in names else None,
            "pod_ranks": args.pod_ranks,
            "time_limit_s": args.time_limit,
            "seed": args.seed,
            "max_cap": DEFAULT_CAP,
            "quick": args.quick,
        },
        "cost_models": cost_models,
        "summary": summary,
        "paper": PAPER,
        "rows": rows,
        "runtime_s": time.perf_counter() - start,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    }
    path = write_json("projection", payload, args.out_dir)
    title = (
        f"PROJECTION (cost-model predictions, not measurements): {args.seqs_per_rank} sequences per rank, "
        f"{', '.join(distributions)}; bands: min-max over batches and distributions"
    )
    plot(summary, args.out_dir / "projection.png", title)
    for name, per in summary.items():
        for n, s in per.items():
            print(
                f"PROJECTION {name:>19} N={n:>4}: x{s['speedup_vs_best_static']['median']:.2f} vs best static, "
                f"x{s['speedup_vs_batch_adaptive']['median']:.2f} vs batch-adaptive, "
                f"plan {s['plan_wall_s']['median']:.2f} s (max {s['plan_wall_s']['max']:.2f})"
            )
    print(f"wrote {path} and projection.png in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
