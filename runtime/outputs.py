"""What a run leaves behind (rank 0 writes): metrics.jsonl, TensorBoard events, loss.png,
plan.png, config.toml; and GPU telemetry through nvml when a GPU exists.

``metrics.jsonl`` has one JSON object per step with at least ``step``, ``loss``, ``grad_norm``,
``tokens``, ``step_time_s`` and a ``plan`` summary (DESIGN.md), plus ``aux_loss``, ``lr``,
``tokens_per_s``, ``skipped``, the MoE routing summary under ``moe`` and ``eval_loss`` on
evaluation steps. Lines are appended and flushed every step, so a killed run keeps its history;
a resumed run first drops the lines of steps it is about to redo (and TensorBoard purges
its events from the resume step on). Nothing is left half-written: the rewritten
metrics.jsonl and the plots go to a temporary file that replaces the old one, and an append
that fails (a full disk) is cut back to the last whole line before the error is raised.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from planner.plan import StepPlan

__all__ = ["RunOutputs", "atomic_write", "gpu_telemetry", "plan_summary"]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: ``path`` is the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plan_summary(plan: StepPlan) -> dict:
    """Micro-batch count, SP degrees used (degree -> number of groups) and the planner's figures."""
    degrees = Counter(len(g.ranks) for mb in plan.microbatches for g in mb.groups if g.seq_indices)
    return {
        "microbatches": len(plan.microbatches),
        "degrees": {str(d): n for d, n in sorted(degrees.items())},
        "predicted_time_s": plan.predicted_time_s,
        "solve_time_s": plan.solve_time_s,
        "solver": plan.solver,
    }


def plan_shape(summary: dict) -> str:
    """'3mb 4×d1 2×d2' for the progress bar."""
    groups = " ".join(f"{n}×d{d}" for d, n in summary["degrees"].items())
    return f"{summary['microbatches']}mb {groups}"


def gpu_telemetry() -> dict:
    """Per-GPU memory (GiB), utilisation (%) and power (W); {} without a GPU or nvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU, or no library: telemetry is optional
        return {}
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out[f"gpu{i}"] = {
                "memory_used_gib": mem.used / 2**30,
                "memory_total_gib": mem.total / 2**30,
                "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            }
        return out
    except pynvml.NVMLError:
        return {}
    finally:
        pynvml.nvmlShutdown()


class RunOutputs:
    """Rank 0's writer of the run folder."""

    def __init__(self, run_dir: Path, *, start_step: int):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        # a resumed run keeps the rows of the steps before it; nothing is held in memory after
        # this (a long run's rows would grow rank 0's RSS): the plots read the file back
        kept = [row for row in self._read_rows() if start_step and row.get("step", start_step) < start_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics_path, lambda tmp: tmp.write_text(text))
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's re-run steps replace the old events instead of doubling them
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def _read_rows(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill mid-write
        return rows

    def log(self, row: dict) -> None:
        with self.metrics_path.open("ab", buffering=0) as f:
            size = f.tell()
            try:
                f.write((json.dumps(row) + "\n").encode())
            except OSError:
                f.truncate(size)  # a full disk must not leave half a line
                raise
        step = row["step"]
        for key in ("loss", "aux_loss", "grad_norm", "tokens_per_s", "step_time_s", "lr", "eval_loss"):
            if isinstance(row.get(key), int | float):
                self.tb.add_scalar(f"train/{key}", row[key], step)
        for key in ("max_vio", "dead_experts", "topk_score_sum", "entropy"):
            if key in row.get("moe", {}):
                self.tb.add_scalar(f"moe/{key}", row["moe"][key], step)
        self.tb.add_scalar("plan/predicted_time_s", row["plan"]["predicted_time_s"], step)
        self.tb.add_scalar("plan/solve_time_s", row["plan"]["solve_time_s"], step)

    def close(self) -> None:
        self.tb.close()
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self._read_rows() if not r.get("skipped")]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        evals = [r for r in rows if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _savefig(fig, self.run_dir / "loss.png")

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        steps = [r["step"] for r in rows]
        degrees = sorted({int(d) for r in rows for d in r["plan"]["degrees"]})
        base = [0] * len(rows)
        for d in degrees:
            counts = [r["plan"]["degrees"].get(str(d), 0) for r in rows]
            top.bar(steps, counts, bottom=base, label=f"SP degree {d}")
            base = [b + c for b, c in zip(base, counts, strict=True)]
        top.set_ylabel("groups per step")
        top.legend(fontsize=8)
        bottom.plot(steps, [r["step_time_s"] for r in rows], label="measured step time")
        bottom.plot(steps, [r["plan"]["predicted_time_s"] for r in rows], label="planner's prediction")
        bottom.plot(steps, [r["plan"]["solve_time_s"] for r in rows], label="planner solve time")
        bottom.set_xlabel("step")
        bottom.set_ylabel("seconds")
        bottom.legend(fontsize=8)
        fig.tight_layout()
        _savefig(fig, self.run_dir / "plan.png")


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
