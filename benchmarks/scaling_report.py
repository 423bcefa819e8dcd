"""The scaling report: per-size summaries, merged over world sizes, efficiencies and the plot.

``summarise_mode`` reduces one mode's step rows at one world size; ``merge_report`` reads every
``<name>_w<W>.json`` of the same sweep (same fingerprint) in the folder and writes ``<name>.json``
and ``<name>.png``. Efficiency is computed against W0, the smallest world size at which the
policy ran:

- weak scaling (tokens per rank fixed): efficiency t(W0) / t(W), 1 is ideal;
- strong scaling (global batch fixed): speedup t(W0) / t(W), ideal speedup W / W0, efficiency
  speedup / ideal;

t is the median step time over the measured steps (a step's time is its slowest rank's). The
throughput efficiency (tokens/s per rank at W over that at W0) is reported too: in weak scaling
the batches of different sizes hold slightly different token counts (a batch stops before its
target), which it accounts for.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from benchmarks.common import machine_info, write_json
from benchmarks.scaling_sweep import Sweep

__all__ = ["efficiency_table", "merge_report", "summarise_mode"]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise_mode(stage: dict) -> dict:
    """Per policy of one mode at one size: medians over the measured steps, the cost-model error,
    and the step-0 loss (same weights, same batch, different plans: it must agree)."""
    rows = stage["rows"]
    out: dict = {"per_policy": {}}
    for policy, planned in stage["policies"].items():
        if planned["status"] != "ran":
            out["per_policy"][policy] = {"status": planned["status"], "reason": planned.get("reason", "")}
            continue
        mine = [r for r in rows if r["policy"] == policy and r["measured"]]
        errors = [r["predicted_step_s"] / r["step_s"] - 1 for r in mine]
        out["per_policy"][policy] = {
            "status": "ran",
            "steps": len(mine),
            "tokens": _median([r["tokens"] for r in mine]),
            "tokens_per_s": _median([r["tokens"] / r["step_s"] for r in mine]),
            "step_s": _median([r["step_s"] for r in mine]),
            "fwd_bwd_s": _median([r["fwd_bwd_s"] for r in mine]),
            # CPU seconds of all ranks: what a loaded shared machine changes least (wall time it stretches)
            "cpu_s_all_ranks": _median([r["cpu_s_all_ranks"] for r in mine]),
            "predicted_step_s": _median([r["predicted_step_s"] for r in mine]),
            "step_time_error_pct": {
                "median": 100 * _median(errors),
                "mean_abs": 100 * statistics.fmean(abs(e) for e in errors) if errors else float("nan"),
            },
            "solve_time_s_max": max((r["solve_time_s"] for r in mine), default=float("nan")),
            "microbatches": _median([r["microbatches"] for r in mine]),
        }
    losses = {r["policy"]: r["loss"] for r in rows if r["step"] == 0}
    out["step0_loss"] = losses
    if losses:
        first = next(iter(losses.values()))
        out["step0_loss_max_rel_diff"] = max(abs(v - first) / abs(first) for v in losses.values())
    return out


def efficiency_table(mode: str, by_size: dict[int, dict]) -> dict:
    """{policy: {"world_sizes", "tokens_per_s", "step_s", "predicted_step_s", "efficiency", ...}}
    from {W: summary["per_policy"]} (module docstring for the definitions)."""
    policies = list(dict.fromkeys(p for summary in by_size.values() for p in summary))
    table: dict = {}
    for policy in policies:
        status = {W: s.get(policy, {}).get("status") for W, s in by_size.items()}
        ran = sorted((W, s[policy]) for W, s in by_size.items() if status[W] == "ran" and s[policy]["steps"])
        skipped = {str(W): s[policy]["reason"] for W, s in by_size.items() if status[W] == "skipped"}
        if not ran:
            table[policy] = {"world_sizes": [], "skipped": skipped}
            continue
        W0, base = ran[0]
        entry = {
            "baseline_world_size": W0,
            "world_sizes": [W for W, _ in ran],
            "tokens_per_s": [s["tokens_per_s"] for _, s in ran],
            "step_s": [s["step_s"] for _, s in ran],
            "predicted_step_s": [s["predicted_step_s"] for _, s in ran],
            "step_time_error_pct": [s["step_time_error_pct"]["median"] for _, s in ran],
            "cpu_s_all_ranks": [s["cpu_s_all_ranks"] for _, s in ran],
            "throughput_efficiency": [(s["tokens_per_s"] / W) / (base["tokens_per_s"] / W0) for W, s in ran],
            "skipped": skipped,
        }
        if mode == "weak":
            entry["efficiency"] = [base["step_s"] / s["step_s"] for _, s in ran]
        else:
            entry["speedup"] = [base["step_s"] / s["step_s"] for _, s in ran]
            entry["ideal_speedup"] = [W / W0 for W, _ in ran]
            entry["efficiency"] = [sp / ideal for sp, ideal in zip(entry["speedup"], entry["ideal_speedup"])]
        table[policy] = entry
    return table


def _flexsp_ratios(by_size: dict[int, dict]) -> dict:
    """flexsp's tokens/s over each other policy's, per world size (measured in the same job)."""
    out: dict = {}
    for W, summary in sorted(by_size.items()):
        mine = summary.get("flexsp", {})
        if mine.get("status") != "ran":
            continue
        out[str(W)] = {
            p: mine["tokens_per_s"] / s["tokens_per_s"]
            for p, s in summary.items()
            if p != "flexsp" and s.get("status") == "ran" and s["tokens_per_s"] > 0
        }
    return out


def load_results(sweep: Sweep, out_dir: Path) -> dict[int, dict]:
    """{W: per-size payload} of this sweep found in ``out_dir`` (other sweeps' files are ignored)."""
    found: dict[int, dict] = {}
    fingerprint = sweep.fingerprint()
    for path in sorted(Path(out_dir).glob(f"{sweep.name}_w*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if payload.get("fingerprint") == fingerprint and payload.get("world_size") in sweep.world_sizes:
            found[int(payload["world_size"])] = payload
    return found


def merge_report(sweep: Sweep, out_dir: Path) -> Path:
    """Write ``<name>.json`` and ``<name>.png`` from the per-size results; the JSON path."""
    results = load_results(sweep, out_dir)
    report: dict = {
        "sweep": sweep.as_json(),
        "fingerprint": sweep.fingerprint(),
        "machine": machine_info(),
        "world_sizes": sorted(results),
        "missing_world_sizes": [W for W in sweep.world_sizes if W not in results],
        "incomplete_world_sizes": [W for W, p in sorted(results.items()) if not p.get("complete")],
        "per_size": {},
        "scaling": {},
        "flexsp_tokens_per_s_ratio": {},
        "load_average_1_5_15min": {str(W): p.get("load_average_1_5_15min") for W, p in sorted(results.items())},
        "report_load_average_1_5_15min": os.getloadavg(),
    }
    for W, payload in sorted(results.items()):
        report["per_size"][str(W)] = {
            "launch": payload["launch"],
            "backend": payload["backend"],
            "device": payload["device"],
            "cost_model": payload["cost_model"]["name"],
            "machine": payload["machine"],
            "modes": {m: summarise_mode(stage) for m, stage in payload["modes"].items()},
        }
    for mode in sweep.modes:
        # summaries from the rows (not the stored ones): the report always follows this module
        by_size = {W: summarise_mode(p["modes"][mode])["per_policy"] for W, p in results.items() if mode in p["modes"]}
        report["scaling"][mode] = efficiency_table(mode, by_size)
        report["flexsp_tokens_per_s_ratio"][mode] = _flexsp_ratios(by_size)
    path = write_json(sweep.name, report, out_dir)
    plot(report, results, out_dir / f"{sweep.name}.png")
    return path


def plot(report: dict, results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["scaling"]) or ["weak"]
    fig, axes = plt.subplots(len(modes), 3, figsize=(16, 4.4 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        table = report["scaling"].get(mode, {})
        colours = {p: f"C{i}" for i, p in enumerate(table)}
        ax_tps, ax_eff, ax_err = axes[row]
        for policy, entry in table.items():
            if not entry["world_sizes"]:
                continue
            ws = entry["world_sizes"]
            ax_tps.plot(ws, entry["tokens_per_s"], "o-", color=colours[policy], label=policy)
            ax_eff.plot(ws, entry["efficiency"], "o-", color=colours[policy], label=policy)
        top = 0.0
        for _, payload in sorted(results.items()):
            for r in payload["modes"].get(mode, {}).get("rows", []):
                if r["measured"]:
                    ax_err.plot(r["predicted_step_s"], r["step_s"], "o", ms=4, color=colours.get(r["policy"], "k"))
                    top = max(top, r["predicted_step_s"], r["step_s"])
        ax_err.plot([0, top * 1.05 or 1], [0, top * 1.05 or 1], color="grey", ls="--", lw=1)
        for ax in (ax_tps, ax_eff):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("world size W (ranks)")
            ax.legend(fontsize=7)
        ax_tps.set_ylabel("tokens/s (median step)")
        ax_tps.set_title(f"{mode} scaling: measured throughput", fontsize=10)
        what = "t(W0)/t(W)" if mode == "weak" else "speedup / ideal"
        ax_eff.set_ylabel(f"efficiency ({what})")
        ax_eff.axhline(1.0, color="grey", ls="--", lw=1)
        ax_eff.set_title(f"{mode} scaling efficiency", fontsize=10)
        ax_err.set_xlabel("predicted step time (s, cost model)")
        ax_err.set_ylabel("measured step time (s, slowest rank)")
        ax_err.set_title(f"{mode}: measured vs predicted (every measured step)", fontsize=10)
    devices = sorted({p["device"].split(":")[0] for p in results.values()})
    fig.suptitle(
        f"seqmoe scaling (measured): sweep {report['sweep']['name']}, W = {report['world_sizes']}, "
        f"{'/'.join(devices) or 'no results'}, cost model {_cost_names(results)}, 1-min load average "
        f"{_load_range(results)}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load_range(results: dict[int, dict]) -> str:
    loads = [p["load_average_1_5_15min"][k][0] for p in results.values() for k in ("start", "end")
             if k in p.get("load_average_1_5_15min", {})]  # fmt: skip
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"


def _cost_names(results: dict[int, dict]) -> str:
    names = sorted({p["cost_model"]["name"] for p in results.values()})
    return ", ".join(names) if names else "n/a"
