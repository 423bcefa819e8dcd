"""`seqmoe train`: the training loop. Every step runs the planner's plan for that step's batch.

    seqmoe launch configs/tiny-cpu.toml          # torchrun / Slurm / mpirun, one process per rank
    seqmoe train  configs/tiny-cpu.toml          # what each rank runs (or one process alone)

One step, as DESIGN.md draws it: the data gives step i's global batch (it depends only on the
seed and i); rank 0's planner has already planned it while step i-1 trained and broadcasts the
plan; each rank runs the plan's micro-batches with the plan's SP groups (runtime/step.py); the
DeepSpeed engine sums gradients over all ranks (experts over their expert-data-parallel group),
clips, and steps AdamW at the rate runtime/lr_schedule.py gives that step (warmup, then
cosine) (``runtime.step.train_step``: the MoE balance buffer is emptied as the step begins,
losses stay on the device until the step's one reduction); rank 0 logs. Before the first step,
runtime/preflight.py and runtime/run_dir.py check the settings, files and run folder and take
the folder's lock; a SIGINT or SIGTERM ends the run after the current step with a checkpoint
(runtime/signals.py). A step whose loss or gradient norm is not finite is skipped (ZeRO-1/2
skip it inside the engine), reported, and the run stops after ``train.max_bad_steps`` in a row.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launchers.env import discover_environment
from parallel.context import ParallelContext
from parallel.op_build import one_op_build
from planner.baselines import batch_adaptive, static_sp
from planner.cost import CostModel
from planner.cost_spec import CostSpecError, resolve_cost
from planner.plan import StepPlan
from runtime.checkpoint import load_checkpoint
from runtime.config import Config, ConfigError, to_toml
from runtime.data import build_dataset
from runtime.lr_schedule import lr_at
from runtime.model import HybridLM, build_model
from runtime.outputs import RunOutputs, gpu_telemetry, plan_summary
from runtime.preflight import check_data
from runtime.progress import Progress
from runtime.run_dir import RunFolder
from runtime.startup import startup_lines
from runtime.step import evaluate_plan, train_step
from runtime.watchdog import StepWatchdog

__all__ = [
    "TrainingError",
    "all_sum",
    "build_engine",
    "resolve_cost_model",
    "train",
    "train_in_context",
]


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite steps, a batch the cluster cannot hold, ...)."""


def resolve_cost_model(config: Config, world_size: int) -> CostModel:
    """``planner.cost_model``: a preset name, a JSON path, or auto (on CPU the model's FLOP-derived
    coefficients with a budget from this machine's memory, planner.presets.cpu_cost_model; on a
    GPU the hybrid-1b-h100 preset with its memory budget taken from the real device memory)."""
    spec = config.planner.cost_model
    if spec != "auto":
        try:
            return resolve_cost(spec, world_size)
        except CostSpecError as exc:
            raise ConfigError(f"config field `planner.cost_model`: {exc}") from None
    if not torch.cuda.is_available():
        from planner.presets import HybridShape, cpu_cost_model

        shape = HybridShape.of_model(config.model, config.moe, act_bytes=4)
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, config.launch.nproc_per_node)))
        stage = config.train.zero_stage
        return cpu_cost_model(shape, world_size=world_size, ranks_per_machine=per_machine, zero_stage=stage)
    import dataclasses

    cost = CostModel.preset("hybrid-1b-h100", world_size=world_size)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    budget = 0.9 * total_gb - cost.model_state_gb
    return dataclasses.replace(cost, memory_budget_gb=budget, notes=cost.notes + f" Budget from {total_gb:.0f} GB.")


def build_engine(model: HybridLM, config: Config):
    """DeepSpeed engine: AdamW (MoE parameters in their own groups), clipping, ZeRO stage
    ``train.zero_stage``. No DeepSpeed scheduler: the loop sets each step's rate (lr_schedule.py)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    t = config.train
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if model.tracker is not None:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95))
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # the plan decides micro-batches; we mark the boundary
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    with one_op_build():  # without MoE this brings up DeepSpeed's process group and builds its op
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


class StepPlanner:
    """Plans on rank 0 (step i+1 in the background while step i trains), broadcasts to all."""

    def __init__(self, config: Config, cost: CostModel, ctx: ParallelContext, lengths_of):
        self.mode, self.ctx, self.cost, self.lengths_of = config.planner.mode, ctx, cost, lengths_of
        self.static_degree = config.planner.static_degree
        self.kwargs = {"time_limit_s": config.planner.time_limit_s, "solver": config.planner.solver}
        self.kwargs["group_sizes"] = config.planner.group_sizes
        self.async_planner = None
        if ctx.rank == 0 and self.mode == "flexsp" and config.planner.async_plan:
            from planner.async_plan import AsyncPlanner

            self.async_planner = AsyncPlanner(num_ranks=ctx.world_size, cost=cost, **self.kwargs)

    def _plan_now(self, lengths: list[int]) -> StepPlan:
        W = self.ctx.world_size
        if self.mode == "static":
            return static_sp(lengths, num_ranks=W, sp_degree=self.static_degree, cost=self.cost)
        if self.mode == "batch_adaptive":
            return batch_adaptive(lengths, num_ranks=W, cost=self.cost)
        from planner.solver import plan_step

        return plan_step(lengths, num_ranks=W, cost=self.cost, **self.kwargs)

    def plan(self, step: int, last_step: int) -> StepPlan:
        text = [None]
        if self.ctx.rank == 0:
            if self.async_planner is None:
                plan = self._plan_now(self.lengths_of(step))
            else:
                plan = self._async_plan(step, last_step)
            text = [plan.to_json()]
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(text, src=0, group=self.ctx.world)
        return StepPlan.from_json(text[0])

    def _async_plan(self, step: int, last_step: int) -> StepPlan:
        """Step's plan from the background worker (and submit the next); if the worker process died,
        plan in this process from now on."""
        from concurrent.futures.process import BrokenProcessPool

        from planner.async_plan import PlanningError

        try:
            if step not in self.async_planner.pending():
                self.async_planner.submit(step, self.lengths_of(step))
            plan = self.async_planner.result(step)
            if step + 1 < last_step:
                self.async_planner.submit(step + 1, self.lengths_of(step + 1))
            return plan
        except (PlanningError, BrokenProcessPool) as exc:
            if not isinstance(exc, BrokenProcessPool) and not isinstance(exc.__cause__, BrokenProcessPool):
                raise
        warning = f"warning: step {step}: the planner worker process died; planning in the training process from now on"
        print(warning, flush=True)
        self.async_planner.shutdown(wait=False)
        self.async_planner = None
        return self._plan_now(self.lengths_of(step))

    def close(self) -> None:
        if self.async_planner is not None:
            self.async_planner.shutdown()


def all_sum(ctx: ParallelContext, values: list[float]) -> list[float]:
    """Host values summed over all ranks (on the context's device: an NCCL group takes no CPU tensor)."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(t, group=ctx.world)
    return t.tolist()


def _check_fits(dataset, cost: CostModel, world: int, policy: str) -> None:
    longest = int(max(dataset.train.lengths.max(), dataset.validation.lengths.max(initial=0)))
    capacity = cost.max_sequence_length(world)
    if longest > capacity:
        raise TrainingError(
            f"the data has a sequence of {longest} tokens but {world} ranks hold at most {capacity} tokens in one SP "
            f"group under cost model {cost.name!r}: lower data.max_seq_len to <= {capacity} (policy "
            f"{policy!r} then splits or truncates), use more ranks, or a cost model with more memory per rank"
        )


def train(config: Config, *, report=print, on_step_start=None) -> dict:
    """Run ``config``; returns the last step's metrics row (on every rank). ``on_step_start(ctx,
    step)``, if given, runs on every rank as each step starts (benchmarks/soak.py samples memory)."""
    discover_environment(expected_world_size=config.launch.nnodes * config.launch.nproc_per_node).export()
    ctx = ParallelContext.initialize(
        backend=config.parallel.backend, device=config.parallel.device, timeout_s=config.parallel.timeout_s
    )
    try:
        return train_in_context(ctx, config, report=report, on_step_start=on_step_start)
    finally:
        ctx.destroy()  # also on errors: a caller in the same process may start another job


def train_in_context(ctx: ParallelContext, config: Config, *, report=print, on_step_start=None) -> dict:
    """:func:`train` on ranks whose process group already exists (``ctx``); leaves it alive."""
    watch = StepWatchdog(ctx, config.parallel.timeout_s, on_begin=on_step_start)
    try:
        with RunFolder(ctx, config, report) as folder:  # preflight, the folder's lock, what to resume
            return _train(ctx, config, report, watch, folder)
    except RuntimeError as exc:  # a collective that timed out: say which rank, at which step
        hang = watch.explain(exc)
        if hang is None:
            raise
        raise hang from exc


def _train(ctx: ParallelContext, config: Config, report, watch: StepWatchdog, folder: RunFolder) -> dict:
    t = config.train
    torch.manual_seed(t.seed)  # identical non-expert parameters on every rank
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    check_data(config, dataset)
    cost = resolve_cost_model(config, ctx.world_size)
    _check_fits(dataset, cost, ctx.world_size, config.data.long_sequence_policy)
    model = build_model(
        config.model,
        config.parallel,
        config.moe,
        balance_group=ctx.world,
        seed=t.seed,
        domain_names=dataset.domain_names,
    ).to(ctx.device)
    if ctx.rank == 0:
        for line in startup_lines(config, ctx, dataset, model, cost):
            report(line)
    engine = build_engine(model, config)
    run_dir = config.resolved_run_dir
    # checked against this job by RunFolder (a restart resumes by itself); under resume=auto the
    # loader takes the newest valid checkpoint again and falls back past one that fails as it is read
    resume = folder.checkpoint
    if resume and config.train.resume in ("", "auto"):
        resume = "auto"
    start = load_checkpoint(engine, ctx, resume, run_dir / "checkpoints", report) if resume else 0
    out = RunOutputs(run_dir, start_step=start) if ctx.rank == 0 else None
    if out is not None:
        (run_dir / "config.toml").write_text(to_toml(config))
    planner = StepPlanner(config, cost, ctx, lambda i: dataset.train_batch(i, t.seed).lengths)
    progress = Progress(start=start, steps=t.steps, log_every=t.log_every, enabled=ctx.rank == 0)
    bad_in_a_row, row = 0, {}
    try:
        for step in range(start, t.steps):
            watch.begin(step)
            began = time.perf_counter()
            lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.steps)
            batch = dataset.train_batch(step, t.seed)
            plan = planner.plan(step, t.steps)
            result = train_step(model, engine, ctx, plan, batch, lr=lr)
            loss, grad_norm, skipped = result.loss, result.grad_norm, result.skipped
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
            step_time = time.perf_counter() - began
            row = {
                "step": step,
                "loss": loss,
                "aux_loss": result.aux_loss,
                "grad_norm": grad_norm,
                "tokens": result.tokens,
                "step_time_s": step_time,
                "tokens_per_s": result.tokens / step_time,
                "lr": lr,
                "skipped": skipped,
                "plan": plan_summary(plan),
            }
            if result.moe is not None:
                row["moe"] = result.moe
            if skipped and ctx.rank == 0:
                report(f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}; update skipped")
            if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                row["eval_loss"] = _evaluate(model, ctx, dataset, planner, config)
            if ctx.rank == 0:
                row["gpu"] = gpu_telemetry() or None
                out.log(row)
                progress.update(row)
            if bad_in_a_row >= t.max_bad_steps:
                raise TrainingError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last: step {step}); "
                    "lower train.lr, raise train.warmup_steps or check the data"
                )
            every = t.checkpoint_every
            saved = bool(every and (step + 1) % every == 0) or step + 1 == t.steps
            if saved:
                folder.save(engine, step + 1)
            folder.after_step(engine, step, saved=saved)  # a SIGINT/SIGTERM: checkpoint, then stop
    finally:
        planner.close()
        if ctx.rank == 0:
            progress.close()
            if out is not None:
                out.close()
    return row


@torch.no_grad()
def _evaluate(model: HybridLM, ctx: ParallelContext, dataset, planner: StepPlanner, config: Config) -> float:
    model.eval()
    loss_sum = targets = 0.0
    for i in range(config.train.eval_batches):
        batch = dataset.validation_batch(i, config.train.seed)
        plan = batch_adaptive(batch.lengths, num_ranks=ctx.world_size, cost=planner.cost)
        s, n = evaluate_plan(model, ctx, plan, batch.sequences, batch.domains)
        loss_sum, targets = loss_sum + s, targets + n
    model.train()
    if model.routing_metrics is not None:
        model.routing_metrics.reset()  # evaluation routing is not training routing
    loss_sum, targets = all_sum(ctx, [loss_sum, targets])
    return loss_sum / max(targets, 1.0)


def main_train(config: Config) -> int:
    """Entry point of ``seqmoe train`` (after the config is loaded)."""
    row = train(config)
    path = Path(config.resolved_run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if row:
        print(f"done: step {row['step']} loss {row['loss']:.4f}; outputs in {path}")
    else:  # resumed from a checkpoint at or past train.steps
        print(f"nothing to do: {path} has already trained train.steps={config.train.steps}; raise --train.steps")
    return 0
