"""The ``seqmoe`` command: train, launch, plan, profile, bench, config, tokenizer, export, generate.

Config-driven subcommands take ``--config PATH`` plus any number of ``--section.key=value``
overrides (``seqmoe config --config configs/tiny-cpu.toml --train.steps=20``).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from launchers.errors import ERROR_DIR_ENV, first_error, write_error
from parallel.op_build import use_venv_extensions_dir
from runtime import __version__
from runtime.cli_io import register as register_io_commands
from runtime.config import ConfigError, load_config, to_toml

# Exit code of a subcommand whose feature has not landed yet: distinct from success (0),
# failure (1) and usage errors (2), so scripts can tell them apart.
EXIT_NOT_AVAILABLE = 3
# set by `seqmoe launch --verbose` for its ranks: tracebacks with the one-line errors
VERBOSE_ENV = "SEQMOE_VERBOSE"

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SUITES = {
    "sp": ("sp_ops.py", "sequence-parallel ops: LASP-2 vs LASP-1 vs Ulysses, LASP-2H vs Ulysses"),
    "planner": ("planner.py", "planner solve time and predicted speedups"),
    "moe": ("moe.py", "MoE balance, router and Chain-of-Experts overheads and quality"),
    "e2e": ("e2e.py", "end-to-end training throughput of adaptive vs static SP"),
    "projection": ("projection.py", "PROJECTED (cost-model) scaling of adaptive vs static SP to 4096 ranks"),
    "kernels": ("kernels.py", "per-document vs packed softmax attention, grouped vs looped experts (CPU)"),
    "scaling": ("scaling.py", "weak/strong scaling of every plan policy, one launch per world size"),
    "soak": ("soak.py", "1,000-step run: RSS, descriptors and process groups stay flat (--quick: 60 steps)"),
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML preset (see configs/); defaults apply when omitted")
    parser.epilog = (
        "Any field can be overridden as --section.key=value, e.g. --train.steps=20 --model.d_model=64 "
        "--planner.mode=static. Sections: model, parallel, moe, planner, data, train, launch."
    )


def _error(command: str, message: str, code: int, *, verbose: bool = False) -> int:
    """One line for the user: on stderr, or (a rank of `seqmoe launch`) in the job's error folder,
    from which the launcher prints it once. ``verbose`` adds the traceback."""
    line = f"seqmoe {command}: {message}"
    if verbose:
        traceback.print_exc()
    if not write_error(line, code) or verbose:
        print(line, file=sys.stderr, flush=True)
    return code


def os_error_message(exc: OSError) -> str:
    """A failed write or read as one line: which file, what the system said, what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device{where}; what was written before is intact: free some space, then resume "
            "with --train.resume=auto (or use --train.run_dir on another disk)"
        )
    return f"{exc.strerror or exc}{where}"


def _cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from runtime.tokenizer import check_vocab_size

    config = load_config(args.config, overrides)
    check_vocab_size(config.data.tokenizer, config.model.vocab_size)  # a tokenizer file and the model agree
    from runtime.data import DataError
    from runtime.preflight import preflight

    try:
        # what `seqmoe train` checks before its first step; the TOML stays clean on stdout
        preflight(config, report=lambda line: print(f"# {line}", file=sys.stderr))
    except DataError as exc:
        return _error("config", str(exc), 1)
    print(to_toml(config), end="")
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.config_file and args.config:
        raise ConfigError(f"got the config twice ({args.config_file} and --config {args.config}); give it once")
    config = load_config(args.config_file or args.config, overrides)
    from launchers.env import LaunchEnvError
    from runtime.checkpoint import CheckpointError
    from runtime.data import DataError
    from runtime.preflight import early_checks
    from runtime.signals import EXIT_INTERRUPTED, Interrupted

    verbose = args.verbose or os.environ.get(VERBOSE_ENV) == "1"
    try:
        early_checks(config)  # seconds, before DeepSpeed is imported
    except DataError as exc:
        return _error("train", str(exc), 1, verbose=verbose)
    from runtime.train import TrainingError, main_train
    from runtime.watchdog import StepHangError

    try:
        return main_train(config)
    except Interrupted as exc:
        return _error("train", str(exc), EXIT_INTERRUPTED)
    except (TrainingError, DataError, LaunchEnvError, CheckpointError, StepHangError) as exc:
        # bad data, a launcher environment that does not add up, an impossible batch: the
        # message names the problem and the fix, a traceback would only hide it
        return _error("train", str(exc), 1, verbose=verbose)
    except OSError as exc:  # a full disk, a folder that became unwritable
        return _error("train", os_error_message(exc), 1, verbose=verbose)
    except KeyboardInterrupt:
        message = "stopped at once by a repeated signal; resume from the last checkpoint with --train.resume=auto"
        return _error("train", message, 130, verbose=verbose)


def _cmd_launch(args: argparse.Namespace, overrides: list[str]) -> int:
    # imported here: the other subcommands do not need the launchers
    from launchers import LaunchError, check_program, launch, train_program

    if args.config_file and args.config:
        raise ConfigError(f"got the config twice ({args.config_file} and --config {args.config}); give it once")
    config_path = args.config_file or args.config
    config = load_config(config_path, overrides)
    if args.check:
        out_dir = config.resolved_run_dir / "check"
        # a rank file left by an earlier check must not pass for one of this job's ranks
        for stale in out_dir.glob("rank*.json"):
            stale.unlink()
        world_size = config.launch.nnodes * config.launch.nproc_per_node
        program, script_name = check_program(out_dir, world_size), "check.sbatch"
    else:
        program, script_name = train_program(config_path, overrides), "launch.sbatch"
    if config.launch.launcher == "slurm" or args.dry_run:  # Slurm's ranks may not see this machine's /tmp
        try:
            return launch(config, program, script_name=script_name, wait=args.wait, dry_run=args.dry_run)
        except LaunchError as exc:
            print(f"seqmoe launch: {exc}", file=sys.stderr)
            return 1
    errors = tempfile.mkdtemp(prefix="seqmoe-errors-")
    os.environ[ERROR_DIR_ENV] = errors  # the ranks write their one line here (launchers/errors.py)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        code = launch(config, program, script_name=script_name, wait=args.wait, verbose=args.verbose)
        record = first_error(errors)
    except LaunchError as exc:
        print(f"seqmoe launch: {exc}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(ERROR_DIR_ENV, None)
        os.environ.pop(VERBOSE_ENV, None)
    shutil.rmtree(errors, ignore_errors=True)
    if record is None:
        return code
    if code == 0:  # a rank failed, torchrun restarted the job and it finished: say what happened
        print(f"seqmoe launch: an elastic restart recovered from: {record['message']}", file=sys.stderr, flush=True)
        return 0
    print(record["message"], file=sys.stderr, flush=True)
    return int(record["code"]) or code or 1


def _add_launch_args(launch: argparse.ArgumentParser) -> None:
    launch.add_argument("config_file", nargs="?", metavar="CONFIG", help="TOML preset (same as --config PATH)")
    _add_config_args(launch)
    launch.add_argument(
        "--check",
        action="store_true",
        help="run the cluster-setup check instead of training: rank discovery, a gloo all_reduce, one "
        "<run dir>/check/rank<k>.json per rank",
    )
    launch.add_argument(
        "--wait", action="store_true", help="slurm with launch.submit=true: wait for the job and return its exit code"
    )
    launch.add_argument(
        "--dry-run", action="store_true", help="print the command (slurm: write the sbatch script) and start nothing"
    )
    launch.add_argument(
        "--verbose", action="store_true", help="torchrun's own logs, and every rank's errors with their tracebacks"
    )


def _cmd_profile(args: argparse.Namespace, overrides: list[str]) -> int:
    from runtime.profile import profile_cost_model

    config = load_config(args.config, overrides)
    nproc = args.nproc or config.launch.nproc_per_node
    try:
        result = profile_cost_model(config, world_size=nproc, lengths=args.lengths, repeats=args.repeats)
    except ValueError as exc:
        print(f"seqmoe profile: {exc}", file=sys.stderr)
        return 2
    print(f"{'degree':>6} {'length':>7} {'docs':>5} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    for p in result.points:
        print(
            f"{p['degree']:>6} {p['length']:>7} {p['documents']:>5} {p['measured_ms']:>12.1f} "
            f"{p['predicted_ms']:>13.1f} {p['rel_error']:>+7.1%}"
        )
    bandwidth = ", ".join(f"d={d}: {bw:.2f} GB/s" for d, bw in sorted(result.bandwidth_gbps.items()))
    print(f"all-gather bandwidth: {bandwidth or 'n/a (one process)'}")
    print(f"fit: mean |error| {result.mean_abs_rel_error:.1%}, max {result.max_abs_rel_error:.1%}")
    cost = result.cost
    source = "fitted" if result.step_fit["quad_sp_factor_fitted"] else "softmax kernel's ratio"
    print(
        f"per-step term: {cost.step_ms:.1f} ms; above one rank: softmax factor q {cost.quad_sp_factor:.2f} "
        f"({source}), per-token factor r {cost.lin_sp_factor:.2f}"
    )
    fit = result.step_fit
    print(
        f"training steps of 1-8 micro-batches: beta {fit['bare_beta_ms']:.1f} ms bare -> {result.cost.beta_ms:.1f} ms "
        f"in the engine; whole-step mean |error| {result.step_mean_abs_rel_error:.1%}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(result.cost.to_json())
    tmp.replace(out)  # never leave a half-written cost model where the planner would read it
    print(f"wrote {out} (use it with: seqmoe plan --cost {out})")
    for warning in result.warnings:
        print(f"seqmoe profile: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    # imported here: numpy, PuLP and matplotlib are not needed by the other subcommands
    from planner.distributions import DEFAULT_CAP
    from planner.dryrun import DryRunError, DryRunSpec, run_plan_command

    if args.lengths_file is not None and (args.cap is not None or args.seed is not None):
        print(
            "seqmoe plan: --seed and --cap apply to built-in distributions; ignored with --lengths-file",
            file=sys.stderr,
        )

    if args.plot is not None and (problem := _unwritable(args.plot)):
        print(f"seqmoe plan: --plot {args.plot}: {problem}; give a PNG path in a folder you can write", file=sys.stderr)
        return 2
    spec = DryRunSpec(
        lengths_file=args.lengths_file,
        distribution=args.distribution or "wikipedia",
        seed=args.seed or 0,
        cap=DEFAULT_CAP if args.cap is None else args.cap,
        batch_size=args.batch_size,
        steps=args.steps,
        num_ranks=args.num_ranks,
        cost=args.cost,
        time_limit_s=args.time_limit,
    )
    try:
        run_plan_command(spec, as_json=args.json, plot=args.plot, all_groups=args.all_groups, out=sys.stdout)
    except DryRunError as exc:
        print(f"seqmoe plan: {exc}", file=sys.stderr)
        return 2
    return 0


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (checked before any work), or None. Missing
    folders are fine (they are created), unless what stands in their place is a file."""
    if path.is_dir():
        return "is a folder"
    folder = path.parent if str(path.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def _add_plan_args(plan: argparse.ArgumentParser) -> None:
    source = plan.add_mutually_exclusive_group()
    source.add_argument(
        "--lengths-file",
        type=Path,
        metavar="PATH",
        help="one token count per line, or JSONL with a `length` field or a `text` field (UTF-8 bytes = tokens)",
    )
    source.add_argument(
        "--distribution",
        metavar="NAME",
        help="built-in length distribution: wikipedia (default), commoncrawl, github, python-stdlib",
    )
    plan.add_argument("--seed", type=int, help="seed of the built-in distribution (default 0)")
    plan.add_argument("--cap", type=int, help="longest length a distribution draws (default 192K = 196,608 tokens)")
    plan.add_argument("--batch-size", type=int, default=512, help="sequences per step (default 512, as FlexSP)")
    plan.add_argument("--steps", type=int, default=1, help="steps to plan (default 1)")
    plan.add_argument("--num-ranks", type=int, default=64, help="GPUs, a power of two (default 64)")
    plan.add_argument(
        "--cost",
        default="flexsp-gpt7b-a100",
        metavar="PRESET|PATH",
        help="cost-model preset (flexsp-gpt7b-a100, hybrid-1b-h100, tiny-cpu) or JSON file (default flexsp-gpt7b-a100)",
    )
    plan.add_argument("--time-limit", type=float, default=1.0, metavar="S", help="solver time limit per step")
    plan.add_argument("--json", action="store_true", help="print plans and the comparison as JSON on stdout")
    plan.add_argument(
        "--all-groups", action="store_true", help="one table row per SP group (default: one per degree and micro-batch)"
    )
    plan.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG timeline of each step's SP groups")


def _cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.suite != "all":
        return _run_suite(args.suite, args.bench_args)
    # every suite, one after another, with the same arguments (--quick, --out-dir)
    for suite in BENCH_SUITES:
        print(f"seqmoe bench all: {suite}", flush=True)
        code = _run_suite(suite, args.bench_args)
        if code:
            print(f"seqmoe bench all: suite {suite} failed (exit code {code}); later suites not run", file=sys.stderr)
            return code
    return 0


def _run_suite(suite: str, bench_args: list[str]) -> int:
    script_name, _ = BENCH_SUITES[suite]
    script = REPO_ROOT / "benchmarks" / script_name
    if not (REPO_ROOT / "benchmarks").is_dir():
        print(
            "seqmoe bench runs the scripts in benchmarks/ and needs a source checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 1
    if not script.is_file():
        print(
            f"seqmoe bench {suite}: not available yet (benchmarks/{script_name} has not landed). Nothing was run.",
            file=sys.stderr,
        )
        return EXIT_NOT_AVAILABLE
    command = [sys.executable, str(script), *bench_args]
    return subprocess.call(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqmoe",
        description="Distributed training of long-context hybrid linear/softmax-attention + MoE models: "
        "per-step SP planning, LASP-2 / LASP-2H sequence parallelism, global-batch load balancing.",
    )
    parser.add_argument("--version", action="version", version=f"seqmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train on the ranks of this launch (run under `seqmoe launch` or torchrun)")
    train.add_argument("config_file", nargs="?", metavar="CONFIG", help="TOML preset (same as --config PATH)")
    _add_config_args(train)
    train.add_argument("--verbose", action="store_true", help="print tracebacks with the one-line errors")
    train.set_defaults(handler=_cmd_train, takes_overrides=True)

    launch = sub.add_parser(
        "launch",
        help="start a multi-process training job with torchrun, Slurm or mpirun",
        description="Run `seqmoe train` on launch.nnodes × launch.nproc_per_node ranks with launch.launcher "
        "(torchrun | slurm | mpirun); --check runs a cluster-setup check instead.",
    )
    _add_launch_args(launch)
    launch.set_defaults(handler=_cmd_launch, takes_overrides=True)

    plan = sub.add_parser(
        "plan",
        help="dry-run the per-step planner on a length distribution (no GPU needed)",
        description="Plan each step's SP groups for a batch of sequence lengths and compare the predicted step "
        "time with static SP (smallest degree that fits) and batch-adaptive SP. No GPU needed.",
    )
    _add_plan_args(plan)
    plan.set_defaults(handler=_cmd_plan, takes_overrides=False)

    profile = sub.add_parser("profile", help="measure this machine and fit a cost model for the planner")
    _add_config_args(profile)
    profile.add_argument("--nproc", type=int, help="processes to profile on (default: launch.nproc_per_node)")
    profile.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[512, 1024, 2048, 4096],
        help="sequence lengths to time (multiples of --nproc)",
    )
    profile.add_argument("--repeats", type=int, default=3, help="timed repeats per point (median is used)")
    profile.add_argument("--out", default="cost-model.json", help="where to write the fitted cost model (JSON)")
    profile.set_defaults(handler=_cmd_profile, takes_overrides=True)

    bench = sub.add_parser(
        "bench", help="run a benchmark suite; writes JSON + PNG under runs/bench/ (--out-dir DIR to choose)"
    )
    bench.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=["all", *sorted(BENCH_SUITES)],
        help="all (the default): every suite in turn; "
        + "; ".join(f"{name}: {text}" for name, (_, text) in sorted(BENCH_SUITES.items())),
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the suite (e.g. --quick)")
    bench.set_defaults(handler=_cmd_bench, takes_overrides=False)

    config = sub.add_parser("config", help="print the resolved config (preset + overrides) as TOML, validated")
    _add_config_args(config)
    config.set_defaults(handler=_cmd_config, takes_overrides=True)
    register_io_commands(sub, _add_config_args)  # tokenizer train, export, generate (runtime/cli_io.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_venv_extensions_dir()  # parallel/op_build.py: one build of DeepSpeed's op per venv
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        argv.insert(1, "all")  # `seqmoe bench --quick`: every suite, with the suite arguments
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
        return _error(args.command, str(exc), 2, verbose=getattr(args, "verbose", False))


if __name__ == "__main__":
    sys.exit(main())
