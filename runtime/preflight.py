"""Preflight: everything that can be checked before the first step, checked before it.

``seqmoe config`` runs all of it (and says what it checked); ``seqmoe train`` runs the same
checks at start-up, before DeepSpeed is built or any step runs, so a run never fails after
its training work on something that was knowable at the start:

- ranks against the plan: the world is a power of two (the planner's buddy groups),
  ``planner.static_degree`` divides it, ``moe.ep_size`` divides it;
- files: ``data.path`` (a .jsonl file, a Megatron ``.bin``/``.idx`` pair), a cost-model file,
  a tokenizer file when the data section names one, an explicit ``train.resume`` folder;
- the cost model resolves (preset name or JSON file);
- the data loads, and a validation split exists whenever ``train.eval_every`` > 0;
- the run folder can be written and its disk has room for one more checkpoint (estimated
  from the parameter count); and what the folder already holds allows this run
  (runtime/run_dir.py: history, resume compatibility).

Each failure is one ``PreflightError`` line naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.config import Config, ConfigError

if TYPE_CHECKING:
    from planner.cost import CostModel

__all__ = [
    "PreflightError",
    "check_data",
    "check_ranks",
    "check_run_folder",
    "checkpoint_bytes",
    "preflight",
    "resolve_cost",
]

# bytes a checkpoint holds per parameter: fp32 weights (4), AdamW's two moments (8), and the
# fp32 partition ZeRO-1/2 keep of the weights (4); DeepSpeed's own overhead is small
BYTES_PER_PARAMETER = 16
MARGIN_BYTES = 4 << 20  # metrics, plots, TensorBoard events, the manifest


class PreflightError(ConfigError):
    """A setting or file that cannot work for this run; the message names it and the fix."""


def world_size_of(config: Config) -> int:
    return config.launch.nnodes * config.launch.nproc_per_node


def check_ranks(config: Config, world: int, cost: CostModel | None = None) -> None:
    """The plan's degrees and the expert-parallel size against ``world`` ranks (a power of two
    unless the cost model's ``group_sizes`` is 'any')."""
    ranks = f"{world} rank{'s' if world != 1 else ''}"
    shape = f"launch.nnodes={config.launch.nnodes} × launch.nproc_per_node={config.launch.nproc_per_node}"
    if world & (world - 1) and getattr(cost, "group_sizes", "pow2") == "pow2":
        lower = 1 << (world.bit_length() - 1)
        raise PreflightError(
            f"{shape} = {ranks}: the planner's SP groups (cost model group_sizes='pow2') need a power-of-two "
            f"number of ranks; use {lower} or {lower * 2} ranks (e.g. --launch.nproc_per_node={lower})"
        )
    if config.planner.mode == "static" and config.planner.static_degree > world:
        raise PreflightError(
            f"planner.static_degree={config.planner.static_degree} is larger than the job's {ranks} ({shape}); use "
            f"--planner.static_degree={world} or fewer, or more ranks"
        )
    if config.model.ffn == "moe" and world % config.moe.ep_size:
        raise PreflightError(
            f"moe.ep_size={config.moe.ep_size} does not divide the job's {ranks} ({shape}); pick an ep_size that "
            f"divides both {world} and moe.num_experts={config.moe.num_experts}"
        )


def _tokenizer_path(config: Config) -> str:
    """The data section's tokenizer file, if it names one (a path, not the built-in byte vocabulary)."""
    value = getattr(config.data, "tokenizer", "") or ""
    return value if isinstance(value, str) and value not in ("bytes", "byte") else ""


def check_files(config: Config) -> None:
    """Every file the config names exists (the data's own format is checked when it loads)."""
    data = config.data
    from runtime.data import DataError  # data problems keep the data's exit code (1)

    if data.source == "jsonl" and not Path(data.path).is_file():
        what = "a folder" if Path(data.path).is_dir() else "no such file"
        raise DataError(f"data.path={data.path!r}: {what}; data.source='jsonl' needs a .jsonl file")
    if data.source == "megatron":
        missing = [p for p in (f"{data.path}.bin", f"{data.path}.idx") if not Path(p).is_file()]
        if missing:
            raise DataError(
                f"data.path={data.path!r} is a Megatron dataset prefix (without .bin/.idx); missing: "
                f"{', '.join(missing)}"
            )
    tokenizer = _tokenizer_path(config)
    if tokenizer and not Path(tokenizer).is_file():
        raise DataError(f"data.tokenizer={tokenizer!r}: no such file; pass a tokenizer.json")
    resume = config.train.resume
    if resume not in ("", "auto") and not Path(resume).is_dir():
        raise PreflightError(
            f"train.resume={resume!r}: no such folder; pass a checkpoint folder (<run dir>/checkpoints/step_NNNNNN) "
            "or 'auto'"
        )


def resolve_cost(config: Config, world: int) -> CostModel:
    """The run's cost model, or a PreflightError naming planner.cost_model."""
    from runtime.train import resolve_cost_model  # the trainer's resolution (imports DeepSpeed)

    try:
        return resolve_cost_model(config, world)
    except ConfigError:
        raise  # already names planner.cost_model
    except (ValueError, OSError) as exc:
        raise PreflightError(f"config field `planner.cost_model`: {exc}") from None


def check_data(config: Config, dataset) -> None:
    """A validation split exists when the run evaluates."""
    t, data = config.train, config.data
    if t.eval_every and dataset.validation.size == 0:
        sources = len(set(dataset.train.sources.tolist()))
        why = (
            "data.validation_fraction=0 leaves none"
            if data.validation_fraction == 0
            else f"the data has only {sources} source document(s), too few to split off any"
        )
        raise PreflightError(
            f"train.eval_every={t.eval_every} evaluates on validation documents, but {why}; set "
            "--train.eval_every=0, or --data.validation_fraction=0.05 with at least 2 documents"
        )


def checkpoint_bytes(config: Config) -> tuple[int, int]:
    """(parameters, estimated bytes of one checkpoint), from a model built on the meta device."""
    import torch

    from runtime.model import build_model

    moe = dataclasses.replace(config.moe, ep_size=1)  # the parameter count does not depend on the split
    with torch.device("meta"):
        model = build_model(config.model, config.parallel, moe)
    parameters = sum(p.numel() for p in model.parameters())
    return parameters, parameters * BYTES_PER_PARAMETER + MARGIN_BYTES


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_run_folder(config: Config, world: int, *, create: bool = True, room: bool = True) -> None:
    """The run folder can be written and (``room``) its disk has room for a checkpoint. ``create``:
    make the folder (train); without it (``seqmoe config``) only the nearest existing parent is
    tested. ``room`` builds the model on the meta device: only before the process group exists
    (an MoE model makes DeepSpeed groups, which every rank would have to join)."""
    run_dir = config.resolved_run_dir
    base = _existing_ancestor(run_dir)
    if not base.is_dir():
        raise PreflightError(f"train.run_dir={str(run_dir)!r}: {base} is a file, not a folder; choose another folder")
    fix = "use --train.run_dir=A_WRITABLE_FOLDER"
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
            base = run_dir
        with tempfile.NamedTemporaryFile(dir=base, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PreflightError(f"train.run_dir={str(run_dir)!r} cannot be written ({exc.strerror}); {fix}") from None
    if not room:
        return
    parameters, need = checkpoint_bytes(config)
    free = shutil.disk_usage(base).free
    if free < need:
        raise PreflightError(
            f"train.run_dir={str(run_dir)!r}: its disk has {free / 2**20:.1f} MiB free, a checkpoint of this model "
            f"({parameters:,} parameters) needs about {need / 2**20:.1f} MiB; free some space or {fix}"
        )


def early_checks(config: Config) -> None:
    """What ``seqmoe train`` checks before it imports DeepSpeed or starts the process group, so a
    bad setting fails in seconds. Read-only; the run folder's lock and the checksummed resume
    decision follow in runtime/run_dir.py once the ranks can agree."""
    import os

    from runtime.data import build_dataset
    from runtime.run_dir import plan_resume

    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    if world is None and not any(k.startswith(("SLURM_PROCID", "PMI_", "OMPI_", "PMIX_")) for k in os.environ):
        world = 1  # one process alone
    check_files(config)
    if world is not None:
        check_ranks(config, world, resolve_cost(config, world))
    check_data(config, build_dataset(config.data, vocab_size=config.model.vocab_size))
    check_run_folder(config, world or 1, create=False)
    from runtime.run_dir import RunLock

    RunLock(config.resolved_run_dir).check()
    if world is not None:
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        plan_resume(config, world, restarted=restarted, dry_run=True)


def preflight(config: Config, *, world: int | None = None, report=print) -> None:
    """Everything ``seqmoe config`` checks: ranks, files, cost model, data, run folder (nothing is
    written). ``report`` gets one line per finding that is not an error."""
    from runtime.data import build_dataset
    from runtime.run_dir import RunDirError, plan_resume

    world = world or world_size_of(config)
    check_files(config)
    cost = resolve_cost(config, world)
    check_ranks(config, world, cost)
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    check_data(config, dataset)
    check_run_folder(config, world, create=False)
    try:
        plan = plan_resume(config, world, dry_run=True)
        start = f"resumes from {plan.checkpoint}" if plan.checkpoint else "starts at step 0"
    except RunDirError as exc:
        if config.train.resume:
            raise  # a resume that cannot work is an error of this config
        # a fresh run into a used folder: the folder's state, and printing the config still works
        start = "seqmoe train would refuse it"
        report(f"warning: {exc}")
    report(
        f"preflight: {world} ranks, cost model {cost.name!r}, {dataset.train.size} train / "
        f"{dataset.validation.size} validation documents, run folder {config.resolved_run_dir} ({start})"
    )
