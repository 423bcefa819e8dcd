"""The ``seqmoe`` command: train, launch, plan, profile, bench, config.

Config-driven subcommands take ``--config PATH`` plus any number of ``--section.key=value``
overrides (``seqmoe config --config configs/tiny-cpu.toml --train.steps=20``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from runtime.config import ConfigError, load_config, to_toml

# Exit code of a subcommand whose feature has not landed yet: distinct from success (0),
# failure (1) and usage errors (2), so scripts can tell them apart.
EXIT_NOT_AVAILABLE = 3

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SUITES = {
    "sp": ("sp_ops.py", "sequence-parallel ops: LASP-2 vs LASP-1 vs Ulysses, LASP-2H vs Ulysses"),
    "planner": ("planner.py", "planner solve time and predicted speedups"),
    "moe": ("moe.py", "MoE balance, router and Chain-of-Experts overheads and quality"),
    "e2e": ("e2e.py", "end-to-end training throughput of adaptive vs static SP"),
}
NOT_YET = {
    "train": "training (runtime/: model, data, train loop, checkpoints)",
    "launch": "launchers (launchers/: torchrun, Slurm, mpirun)",
    "plan": "the planner (planner/: per-step SP planning by linear programming)",
    "profile": "cost-model calibration (planner/cost.py)",
}


def _not_available(command: str) -> int:
    print(
        f"seqmoe {command}: not available yet. It arrives with {NOT_YET[command]}, which has not landed "
        "in this version. Nothing was run.",
        file=sys.stderr,
    )
    return EXIT_NOT_AVAILABLE


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML preset (see configs/); defaults apply when omitted")
    parser.epilog = (
        "Any field can be overridden as --section.key=value, e.g. --train.steps=20 --model.d_model=64 "
        "--planner.mode=static. Sections: model, parallel, moe, planner, data, train, launch."
    )


def _cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    print(to_toml(config), end="")
    return 0


def _cmd_needs_config(args: argparse.Namespace, overrides: list[str]) -> int:
    # validate first: a bad config is reported as such even before the feature lands
    load_config(args.config, overrides)
    return _not_available(args.command)


def _cmd_plan_or_profile(args: argparse.Namespace, overrides: list[str]) -> int:
    return _not_available(args.command)


def _cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    script_name, _ = BENCH_SUITES[args.suite]
    script = REPO_ROOT / "benchmarks" / script_name
    if not (REPO_ROOT / "benchmarks").is_dir():
        print(
            "seqmoe bench runs the scripts in benchmarks/ and needs a source checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 1
    if not script.is_file():
        print(
            f"seqmoe bench {args.suite}: not available yet (benchmarks/{script_name} has not landed). Nothing was run.",
            file=sys.stderr,
        )
        return EXIT_NOT_AVAILABLE
    command = [sys.executable, str(script), *args.bench_args]
    return subprocess.call(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqmoe",
        description="Distributed training of long-context hybrid linear/softmax-attention + MoE models: "
        "per-step SP planning, LASP-2 / LASP-2H sequence parallelism, global-batch load balancing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train on the ranks of this launch (run under `seqmoe launch` or torchrun)")
    _add_config_args(train)
    train.set_defaults(handler=_cmd_needs_config, takes_overrides=True)

    launch = sub.add_parser("launch", help="start a multi-process training job with torchrun, Slurm or mpirun")
    _add_config_args(launch)
    launch.set_defaults(handler=_cmd_needs_config, takes_overrides=True)

    plan = sub.add_parser("plan", help="dry-run the per-step planner on a length distribution (no GPU needed)")
    plan.set_defaults(handler=_cmd_plan_or_profile, takes_overrides=False)

    profile = sub.add_parser("profile", help="measure this machine and fit a cost model for the planner")
    profile.set_defaults(handler=_cmd_plan_or_profile, takes_overrides=False)

    bench = sub.add_parser("bench", help="run a benchmark suite; writes JSON + PNG under benchmarks/results/")
    bench.add_argument(
        "suite",
        choices=sorted(BENCH_SUITES),
        help="; ".join(f"{name}: {text}" for name, (_, text) in sorted(BENCH_SUITES.items())),
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the suite (e.g. --quick)")
    bench.set_defaults(handler=_cmd_bench, takes_overrides=False)

    config = sub.add_parser("config", help="print the resolved config (preset + overrides) as TOML, validated")
    _add_config_args(config)
    config.set_defaults(handler=_cmd_config, takes_overrides=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --section.key=value)")
    if overrides and not args.takes_overrides:
        parser.error(f"`seqmoe {args.command}` takes no --section.key=value overrides, got {' '.join(overrides)}")
    try:
        return args.handler(args, overrides)
    except ConfigError as exc:
        print(f"seqmoe {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
