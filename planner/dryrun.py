"""``seqmoe plan``: run the per-step planner on real or synthetic lengths, without a GPU.

For each step the planner's mixed-degree plan is compared with the two baselines it must
beat, planned by the same cost model on the same lengths:

- static SP at the smallest degree that fits the longest sequence the run can see (the cap of
  a built-in distribution, or the longest sequence of a lengths file): what a fixed
  DeepSpeed-Ulysses / Megatron-CP configuration has to use for the whole run;
- batch-adaptive: the best single degree for this batch (FlexSP's BatchAda).

Every problem with the user's input raises :class:`DryRunError` with a message that names the
problem and the fix; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from planner import cost_spec, plan_step
from planner.baselines import batch_adaptive, smallest_static_degree, static_sp
from planner.cost import CostModel, is_power_of_two
from planner.distributions import DEFAULT_CAP, distribution_names, length_stats, sample_lengths

DEFAULT_BATCH_SIZE = 512  # FlexSP's global batch, in sequences
FILE_FORMAT_HINT = (
    "a lengths file holds one positive integer per line, or JSONL records with an integer "
    '`length` field or a `text` field (its UTF-8 byte count is the length), e.g. {"length": 4096}'
)


class DryRunError(ValueError):
    """Bad input to the dry run; the message says what is wrong and how to fix it."""


@dataclass(frozen=True, kw_only=True)
class DryRunSpec:
    """What to plan. Lengths come from ``lengths_file`` or, without one, ``distribution``."""

    lengths_file: Path | None = None
    distribution: str = "wikipedia"
    seed: int = 0
    cap: int = DEFAULT_CAP
    batch_size: int = DEFAULT_BATCH_SIZE
    steps: int = 1
    num_ranks: int = 64
    cost: str = "flexsp-gpt7b-a100"
    time_limit_s: float = 1.0


@dataclass(frozen=True)
class StepReport:
    """One step's lengths, the planner's plan and both baselines' plans."""

    step: int
    lengths: list[int]
    plan: object
    static_degree: int
    static_plan: object
    adaptive_plan: object

    @property
    def speedup_vs_static(self) -> float:
        return self.static_plan.predicted_time_s / self.plan.predicted_time_s

    @property
    def speedup_vs_adaptive(self) -> float:
        return self.adaptive_plan.predicted_time_s / self.plan.predicted_time_s


@dataclass(frozen=True)
class DryRunResult:
    spec: DryRunSpec
    source: str
    cost: CostModel
    reference_length: int
    steps: list[StepReport]


# ---- input -------------------------------------------------------------------------------


def _parse_length_line(line: str, where: str) -> int:
    text = line.strip()
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DryRunError(f"{where}: not valid JSON ({exc.msg}); {FILE_FORMAT_HINT}") from None
        if isinstance(record.get("length"), int) and not isinstance(record["length"], bool):
            value = record["length"]
        elif isinstance(record.get("text"), str):
            value = len(record["text"].encode("utf-8"))
        else:
            raise DryRunError(f"{where}: the JSON record has no integer `length` or string `text`; {FILE_FORMAT_HINT}")
    else:
        try:
            value = int(text)
        except ValueError:
            raise DryRunError(f"{where}: {text[:40]!r} is not an integer token count; {FILE_FORMAT_HINT}") from None
    if value <= 0:
        raise DryRunError(f"{where}: length {value} is not positive; every sequence needs at least one token")
    return value


def read_lengths_file(path: Path | str) -> list[int]:
    """Lengths from a file: one integer per line, or JSONL with ``length`` or ``text``.
    Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DryRunError(f"lengths file {str(path)!r} does not exist (or is not a file); {FILE_FORMAT_HINT}")
    lengths = []
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    lengths.append(_parse_length_line(line, f"{path} line {number}"))
        except UnicodeDecodeError:
            raise DryRunError(f"{path} is not UTF-8 text; {FILE_FORMAT_HINT}") from None
    if not lengths:
        raise DryRunError(f"{path} holds no lengths; {FILE_FORMAT_HINT}")
    return lengths


def resolve_cost(spec: str, num_ranks: int) -> CostModel:
    """A cost model from a preset name or a path to a JSON file written by ``CostModel.to_json``
    (``planner.cost_spec.resolve_cost``, its errors as ``DryRunError``)."""
    try:
        return cost_spec.resolve_cost(spec, num_ranks)
    except cost_spec.CostSpecError as exc:
        raise DryRunError(str(exc)) from None


def _check_spec(spec: DryRunSpec) -> None:
    if not is_power_of_two(spec.num_ranks):
        raise DryRunError(
            f"--num-ranks {spec.num_ranks} is not a power of two: SP groups are power-of-two buddy groups "
            "that tile the ranks; use e.g. 8, 16, 64"
        )
    for flag, value in (("--batch-size", spec.batch_size), ("--steps", spec.steps), ("--cap", spec.cap)):
        if value < 1:
            raise DryRunError(f"{flag} must be a positive integer, got {value}")
    if not spec.time_limit_s > 0:
        raise DryRunError(f"--time-limit must be positive (seconds per step's solve), got {spec.time_limit_s}")
    if spec.lengths_file is None and spec.distribution not in distribution_names():
        raise DryRunError(
            f"unknown distribution {spec.distribution!r}; choose one of {', '.join(distribution_names())}"
        )


def load_batches(spec: DryRunSpec) -> tuple[list[list[int]], str, int]:
    """The steps' lengths, a description of their source, and the longest length the run must
    handle (what a static SP degree has to fit)."""
    if spec.lengths_file is not None:
        lengths = read_lengths_file(spec.lengths_file)
        # file order, consecutive batches (FlexSP's protocol); the last one may be short
        batches = [lengths[i : i + spec.batch_size] for i in range(0, len(lengths), spec.batch_size)]
        batches = batches[: spec.steps]
        planned = [x for batch in batches for x in batch]
        return batches, f"{spec.lengths_file} ({len(planned)} of {len(lengths)} lengths)", max(planned)
    lengths = sample_lengths(spec.distribution, spec.batch_size * spec.steps, seed=spec.seed, cap=spec.cap)
    batches = [lengths[i * spec.batch_size : (i + 1) * spec.batch_size] for i in range(spec.steps)]
    return batches, f"distribution {spec.distribution} (seed {spec.seed}, cap {spec.cap:,})", spec.cap


def _check_fits(longest: int, num_ranks: int, cost: CostModel, where: str) -> None:
    # the largest allowed degree holds the most (max_degree may be below num_ranks)
    capacity = cost.max_sequence_length(num_ranks)
    if longest > capacity:
        raise DryRunError(
            f"{where}: a sequence of {longest:,} tokens does not fit the cluster: {num_ranks} ranks hold at most "
            f"{capacity:,} tokens in one SP group under this cost model. Use more ranks (--num-ranks), "
            "a smaller --cap, drop or split the long sequences, or a cost model with more memory per rank"
        )


# ---- planning ----------------------------------------------------------------------------


def plan_one_step(
    step: int, lengths: list[int], *, num_ranks: int, cost: CostModel, static_degree: int, time_limit_s: float
) -> StepReport:
    try:
        plan = plan_step(lengths, num_ranks=num_ranks, cost=cost, time_limit_s=time_limit_s)
    except ValueError as exc:
        raise DryRunError(f"step {step}: the planner rejected the batch: {exc}") from None
    return StepReport(
        step=step,
        lengths=lengths,
        plan=plan,
        static_degree=static_degree,
        static_plan=static_sp(lengths, num_ranks=num_ranks, sp_degree=static_degree, cost=cost),
        adaptive_plan=batch_adaptive(lengths, num_ranks=num_ranks, cost=cost),
    )


def run_dry_run(spec: DryRunSpec) -> DryRunResult:
    """Plan every step of ``spec`` and its baselines."""
    _check_spec(spec)
    cost = resolve_cost(spec.cost, spec.num_ranks)
    batches, source, reference_length = load_batches(spec)
    where = f"lengths file {spec.lengths_file}" if spec.lengths_file else f"--cap {spec.cap:,}"
    _check_fits(reference_length, spec.num_ranks, cost, where)
    static_degree = smallest_static_degree([reference_length], num_ranks=spec.num_ranks, cost=cost)
    reports = [
        plan_one_step(
            step,
            lengths,
            num_ranks=spec.num_ranks,
            cost=cost,
            static_degree=static_degree,
            time_limit_s=spec.time_limit_s,
        )
        for step, lengths in enumerate(batches)
    ]
    return DryRunResult(spec=spec, source=source, cost=cost, reference_length=reference_length, steps=reports)


# ---- output ------------------------------------------------------------------------------


def format_ranks(ranks: Iterable[int]) -> str:
    """``0-7`` for a contiguous block, ``0,2,5`` otherwise."""
    ranks = sorted(ranks)
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def group_rows(report: StepReport, cost: CostModel) -> list[dict]:
    """One row per group of the planner's plan, with its predicted time."""
    rows = []
    for mb, microbatch in enumerate(report.plan.microbatches):
        for g, group in enumerate(microbatch.groups):
            seq_lengths = [report.lengths[i] for i in group.seq_indices]
            degree = len(group.ranks)
            rows.append(
                {
                    "microbatch": mb,
                    "group": g,
                    "ranks": list(group.ranks),
                    "degree": degree,
                    "num_seqs": len(seq_lengths),
                    "tokens": sum(seq_lengths),
                    "predicted_ms": cost.group_time_ms(seq_lengths, degree) if seq_lengths else 0.0,
                }
            )
    return rows


def _microbatches(plan: object) -> str:
    count = len(plan.microbatches)
    return f"{count} micro-batch" if count == 1 else f"{count} micro-batches"


def _degree_of(plan: object) -> int:
    return len(plan.microbatches[0].groups[0].ranks)


def _collapse(rows: list[dict]) -> list[dict]:
    """Merge the groups of one degree within a micro-batch into one row: 64 one-rank groups
    read better as one line. ``pred ms`` of a merged row is its slowest group's."""
    merged: list[dict] = []
    for row in rows:
        last = merged[-1] if merged else None
        if last and (last["microbatch"], last["degree"]) == (row["microbatch"], row["degree"]):
            last["ranks"] += row["ranks"]
            last["groups"] += 1
            last["num_seqs"] += row["num_seqs"]
            last["tokens"] += row["tokens"]
            last["predicted_ms"] = max(last["predicted_ms"], row["predicted_ms"])
        else:
            merged.append({**row, "ranks": list(row["ranks"]), "groups": 1})
    return merged


def format_step(report: StepReport, cost: CostModel, *, all_groups: bool = False) -> str:
    """The step's table (one row per group, or per degree within a micro-batch) and comparison."""
    stats = length_stats(report.lengths)
    rows = group_rows(report, cost)
    rows = [{**row, "groups": 1} for row in rows] if all_groups else _collapse(rows)
    lines = [
        f"step {report.step}: {stats['count']} sequences, {stats['tokens']:,} tokens "
        f"(median {stats['median']:,.0f}, max {stats['max']:,})",
        f"  {'mb':>3}  {'ranks':<12} {'degree':>6} {'groups':>6} {'#seqs':>6} {'tokens':>10} {'pred ms':>10}",
    ]
    for row in rows:
        lines.append(
            f"  {row['microbatch']:>3}  {format_ranks(row['ranks']):<12} {row['degree']:>6} {row['groups']:>6} "
            f"{row['num_seqs']:>6} {row['tokens']:>10,} {row['predicted_ms']:>10,.1f}"
        )
    plan = report.plan
    gap = plan.predicted_time_s / plan.lower_bound_s - 1 if plan.lower_bound_s else math.nan
    lines += [
        f"  predicted step time: planner {plan.predicted_time_s:.3f} s "
        f"({_microbatches(plan)}, lower bound {plan.lower_bound_s:.3f} s, gap {gap:.1%})",
        f"    static SP={report.static_degree}: {report.static_plan.predicted_time_s:.3f} s "
        f"-> speedup {report.speedup_vs_static:.2f}x",
        f"    batch-adaptive SP={_degree_of(report.adaptive_plan)}: "
        f"{report.adaptive_plan.predicted_time_s:.3f} s -> speedup {report.speedup_vs_adaptive:.2f}x",
        f"  solve time {plan.solve_time_s:.3f} s ({plan.solver})",
    ]
    if plan.dropped:
        lines.append(f"  dropped sequences (too long): {list(plan.dropped)}")
    return "\n".join(lines)


def totals(result: DryRunResult) -> dict:
    """Sums over all steps: predicted times, speedups, solve times."""
    planner_s = sum(r.plan.predicted_time_s for r in result.steps)
    static_s = sum(r.static_plan.predicted_time_s for r in result.steps)
    adaptive_s = sum(r.adaptive_plan.predicted_time_s for r in result.steps)
    solve = [r.plan.solve_time_s for r in result.steps]
    return {
        "steps": len(result.steps),
        "planner_time_s": planner_s,
        "static_time_s": static_s,
        "batch_adaptive_time_s": adaptive_s,
        "speedup_vs_static": static_s / planner_s,
        "speedup_vs_batch_adaptive": adaptive_s / planner_s,
        "solve_time_median_s": statistics.median(solve),
        "solve_time_max_s": max(solve),
    }


def format_report(result: DryRunResult, *, all_groups: bool = False) -> str:
    spec = result.spec
    header = (
        f"seqmoe plan: {spec.num_ranks} ranks, cost model {spec.cost}, lengths from {result.source}, "
        f"{len(result.steps)} step(s); static SP degree {result.steps[0].static_degree} fits "
        f"{result.reference_length:,} tokens"
    )
    parts = [header, *(format_step(r, result.cost, all_groups=all_groups) for r in result.steps)]
    if len(result.steps) > 1:
        t = totals(result)
        parts.append(
            f"all {t['steps']} steps: planner {t['planner_time_s']:.3f} s, static {t['static_time_s']:.3f} s "
            f"({t['speedup_vs_static']:.2f}x), batch-adaptive {t['batch_adaptive_time_s']:.3f} s "
            f"({t['speedup_vs_batch_adaptive']:.2f}x); solve time median {t['solve_time_median_s']:.3f} s, "
            f"max {t['solve_time_max_s']:.3f} s"
        )
    return "\n\n".join(parts)


def _baseline_json(plan: object) -> dict:
    return {
        "degree": _degree_of(plan),
        "predicted_time_s": plan.predicted_time_s,
        "num_microbatches": len(plan.microbatches),
    }


def result_to_json(result: DryRunResult) -> dict:
    """Everything the human report shows, plus the full plans (``StepPlan.to_json``)."""
    spec = result.spec
    config = {
        "lengths_file": str(spec.lengths_file) if spec.lengths_file else None,
        "distribution": None if spec.lengths_file else spec.distribution,
        "seed": spec.seed,
        "cap": spec.cap,
        "batch_size": spec.batch_size,
        "steps": spec.steps,
        "num_ranks": spec.num_ranks,
        "cost": spec.cost,
        "time_limit_s": spec.time_limit_s,
        "reference_length": result.reference_length,
    }
    steps = [
        {
            "step": r.step,
            "lengths": r.lengths,
            "length_stats": length_stats(r.lengths),
            "plan": json.loads(r.plan.to_json()),
            "groups": group_rows(r, result.cost),
            "predicted_time_s": r.plan.predicted_time_s,
            "lower_bound_s": r.plan.lower_bound_s,
            "solve_time_s": r.plan.solve_time_s,
            "static_sp": _baseline_json(r.static_plan),
            "batch_adaptive": _baseline_json(r.adaptive_plan),
            "speedup_vs_static": r.speedup_vs_static,
            "speedup_vs_batch_adaptive": r.speedup_vs_adaptive,
        }
        for r in result.steps
    ]
    return {"config": config, "cost_model": json.loads(result.cost.to_json()), "steps": steps, "totals": totals(result)}


def run_plan_command(
    spec: DryRunSpec, *, as_json: bool = False, plot: Path | None = None, all_groups: bool = False, out: TextIO
) -> None:
    """What ``seqmoe plan`` does: plan, print (human or JSON), optionally plot."""
    result = run_dry_run(spec)
    if as_json:
        out.write(json.dumps(result_to_json(result), indent=2) + "\n")
    else:
        out.write(format_report(result, all_groups=all_groups) + "\n")
    if plot is not None:
        plot_timeline(result, plot)
        if not as_json:
            out.write(f"\nwrote {plot}\n")


# ---- plot --------------------------------------------------------------------------------

MAX_PLOTTED_STEPS = 4


def _contiguous_runs(ranks: Iterable[int]) -> list[tuple[int, int]]:
    """(first rank, count) of each block of consecutive ranks: a bar per block."""
    runs: list[tuple[int, int]] = []
    for rank in sorted(ranks):
        if runs and runs[-1][0] + runs[-1][1] == rank:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((rank, 1))
    return runs


def _draw_step(ax, report: StepReport, cost: CostModel, num_ranks: int) -> None:
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("viridis")
    top_degree = max(1, int(math.log2(num_ranks)))
    rows = group_rows(report, cost)
    start_s = 0.0
    for mb in range(len(report.plan.microbatches)):
        mine = [row for row in rows if row["microbatch"] == mb]
        # a micro-batch ends when its slowest group does: the next one starts there
        span_s = max(row["predicted_ms"] for row in mine) / 1e3
        for row in mine:
            width = row["predicted_ms"] / 1e3
            colour = colours(math.log2(row["degree"]) / top_degree)
            for first, count in _contiguous_runs(row["ranks"]):
                ax.broken_barh([(start_s, width)], (first, count), facecolors=colour, edgecolors="white", lw=0.5)
            first = min(row["ranks"])
            ax.text(
                start_s + width / 2,
                first + len(row["ranks"]) / 2,
                f"d={row['degree']}, {row['num_seqs']} seq",
                ha="center",
                va="center",
                fontsize=6 if row["degree"] > 1 else 4,
                color="white" if row["degree"] < num_ranks / 4 else "black",
                clip_on=True,
            )
        start_s += span_s
        ax.axvline(start_s, color="grey", lw=0.8, ls=":")
    # different dash styles: the two lines coincide when the longest sequence forces one degree
    for plan, label, colour, style in (
        (report.static_plan, f"static SP={report.static_degree}", "tab:red", "--"),
        (report.adaptive_plan, f"batch-adaptive SP={_degree_of(report.adaptive_plan)}", "tab:orange", ":"),
    ):
        ax.axvline(
            plan.predicted_time_s, color=colour, lw=1.5, ls=style, label=f"{label}: {plan.predicted_time_s:.2f} s"
        )
    longest_s = max(report.static_plan.predicted_time_s, report.adaptive_plan.predicted_time_s, start_s)
    ax.set_xlim(0, 1.03 * longest_s)
    ax.set_ylim(num_ranks, 0)
    ax.set_ylabel("rank")
    ax.set_title(
        f"step {report.step}: planner {report.plan.predicted_time_s:.2f} s in "
        f"{_microbatches(report.plan)} ({report.speedup_vs_static:.2f}x vs static, "
        f"{report.speedup_vs_adaptive:.2f}x vs "
        "batch-adaptive)",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=7)


def plot_timeline(result: DryRunResult, path: Path | str) -> None:
    """PNG: one panel per step (the first ``MAX_PLOTTED_STEPS``); x = predicted time, y = ranks,
    one bar per SP group labelled with its degree and number of sequences; micro-batches follow
    each other in time; dashed lines mark where the baselines' steps would end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = result.steps[:MAX_PLOTTED_STEPS]
    num_ranks = result.spec.num_ranks
    height = 1.2 + min(6.0, 0.09 * num_ranks + 1.5)
    fig, axes = plt.subplots(len(reports), 1, figsize=(11, height * len(reports)), squeeze=False)
    for ax, report in zip(axes[:, 0], reports):
        _draw_step(ax, report, result.cost, num_ranks)
    axes[-1, 0].set_xlabel("predicted time (s)")
    shown = (
        "" if len(result.steps) <= MAX_PLOTTED_STEPS else f" (first {MAX_PLOTTED_STEPS} of {len(result.steps)} steps)"
    )
    fig.suptitle(f"seqmoe plan: {num_ranks} ranks, {result.spec.cost}, {result.source}{shown}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
