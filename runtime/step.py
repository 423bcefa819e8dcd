"""Running one StepPlan on this rank: pack, shard, forward, backward, for every micro-batch.

For each micro-batch of the plan, this rank finds its SP group, packs the group's sequences
one after another (the document bounds mark where each begins), pads the packed sequence to a
multiple of the group size and takes its contiguous 1/W slice. From the bounds, host ints, it
builds the micro-batch's ``SPContext`` once (device cu_seqlens, rank spans, RoPE positions,
padding mask, one cross-rank agreement check) and every attention layer reads it. Padding is a document of its
own at the end: attention never crosses into it, its targets are ignored, and the MoE balance
and metrics skip its tokens, so padding changes no number. A group with no sequence still pads
one token per rank: every rank runs every micro-batch, because collectives (SP inside the
group, expert all-to-all and balance all-reduce across groups) need every member.

Targets are the next token *within the same document* (the last token of a document predicts
nothing). The loss of a micro-batch is its summed cross-entropy divided by the global batch's
target count, and its balance loss is a share normalised by the global batch's token count, so
the sum over micro-batches and ranks is the same whatever plan ran the batch (invariant 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel.comm import dist_all_reduce
from parallel.context import ParallelContext
from parallel.sp_context import SPContext
from planner.plan import Group as PlanGroup
from planner.plan import StepPlan
from runtime.lr_schedule import set_lr
from runtime.model import HybridLM, LMOutput

__all__ = [
    "LocalEngine",
    "LocalShard",
    "StepResult",
    "TrainStepResult",
    "evaluate_plan",
    "run_plan",
    "shard_for_rank",
    "train_step",
]

IGNORE = -100


@dataclass
class LocalShard:
    """This rank's slice of its group's packed micro-batch."""

    tokens_1T: Tensor
    targets_1T: Tensor
    domains_T: Tensor
    valid_T: Tensor
    """False on padding tokens."""
    bounds: tuple[int, ...]
    """Document boundaries of the group's whole packed sequence, host ints (padding is the last)."""
    offset: int
    ranks: tuple[int, ...]
    num_padding: int
    """Padding tokens in this slice (host int)."""

    def sp_context(self, ctx: ParallelContext, *, agree: bool = True) -> SPContext:
        """The micro-batch's SP context on ``ctx.device``, from host ints (no device read), with
        its one cross-rank agreement check (``agree``; one all-gather over the SP group)."""
        return SPContext.build(
            ctx.group(self.ranks),
            local_len=self.tokens_1T.shape[1],
            bounds=self.bounds,
            device=ctx.device,
            rank=self.ranks.index(ctx.rank),
            num_ranks=len(self.ranks),
            # no mask without padding: the MoE balance then needs no mask (and no read of it)
            valid_T=self.valid_T if self.num_padding else None,
            agree=agree,
        )


def shard_for_rank(sequences: list[Tensor], domains: list[int], group: PlanGroup, rank: int) -> LocalShard:
    """Pack ``group``'s sequences, pad to a multiple of the group size, keep ``rank``'s slice."""
    W = len(group.ranks)
    seqs = [sequences[i] for i in group.seq_indices]
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    padded = max(-(-total // W) * W, W)
    pad = padded - total
    tokens = torch.zeros(padded, dtype=torch.long)
    targets = torch.full((padded,), IGNORE, dtype=torch.long)
    doms = torch.zeros(padded, dtype=torch.long)
    valid = torch.zeros(padded, dtype=torch.bool)
    start = 0
    for seq, i in zip(seqs, group.seq_indices, strict=True):
        n = len(seq)
        tokens[start : start + n] = seq
        targets[start : start + n - 1] = seq[1:]
        doms[start : start + n] = domains[i]
        valid[start : start + n] = True
        start += n
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if pad:
        bounds.append(padded)
    T = padded // W
    r = group.ranks.index(rank)
    local = slice(r * T, (r + 1) * T)
    return LocalShard(
        tokens_1T=tokens[local][None],
        targets_1T=targets[local][None],
        domains_T=doms[local],
        valid_T=valid[local],
        bounds=tuple(bounds),
        offset=r * T,
        ranks=group.ranks,
        num_padding=max(0, (r + 1) * T - max(r * T, total)),
    )


@dataclass
class StepResult:
    """This rank's sums over one plan's micro-batches, left on the device (not read back)."""

    loss_sum: Tensor
    """Summed cross-entropy (divide by the global batch's target count)."""
    aux_loss: Tensor
    """Summed balance-loss shares."""
    tokens: int
    """Real (non-padding) tokens this rank processed (known on the host from the plan)."""


def run_plan(
    model: HybridLM,
    ctx: ParallelContext,
    plan: StepPlan,
    sequences: list[Tensor],
    domains: list[int],
    *,
    backward: Callable[[Tensor, bool], None],
    forward: Callable[..., LMOutput] | None = None,
) -> StepResult:
    """Forward and backward of every micro-batch of ``plan``; ``backward(loss, is_last)`` is the
    engine's backward (it gets the per-rank loss share; the caller scales for its reduction).
    Nothing is read back to the host: the sums stay on the device for the step's one reduction."""
    forward = forward or model
    if plan.group_sizes == "any":  # groups that are not buddy blocks: made collectively, once
        ctx.ensure_groups(g.ranks for micro in plan.microbatches for g in micro.groups)
    num_tokens = sum(len(s) for s in sequences)
    num_targets = sum(len(s) - 1 for s in sequences)
    device = ctx.device
    loss_sum = aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for m, micro in enumerate(plan.microbatches):
        shard = shard_for_rank(sequences, domains, micro.group_of(ctx.rank), ctx.rank)
        batch = shard.sp_context(ctx)  # once per micro-batch: every layer reads it, none re-derives it
        logits, balance = forward(
            shard.tokens_1T.to(device),
            batch,
            domains_T=shard.domains_T.to(device),
        )
        ce_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), shard.targets_1T.to(device).flatten(), ignore_index=IGNORE, reduction="sum"
        )
        aux = balance.share(tokens=num_tokens, sequences=len(sequences))
        backward(ce_sum / num_targets + aux, m == len(plan.microbatches) - 1)
        loss_sum = loss_sum + ce_sum.detach().double()
        aux_sum = aux_sum + aux.detach().double()
        tokens += shard.tokens_1T.shape[1] - shard.num_padding
    return StepResult(loss_sum, aux_sum, tokens)


@dataclass
class TrainStepResult:
    """One optimizer step, reduced over all ranks (the same on every rank)."""

    loss: float
    """Mean cross-entropy per target token of the global batch."""
    aux_loss: float
    """The balance (+ z) loss of the global batch (the shares of all ranks summed)."""
    grad_norm: float
    """Global gradient norm; inf or nan when the update was skipped (a non-finite gradient)."""
    tokens: int
    """Real tokens of the global batch."""
    moe: dict | None
    """Routing metrics of the step (``RoutingMetrics.summarize``), None for a dense model."""
    forward_backward_s: float
    """Host wall time of the micro-batches' forward and backward (on a GPU: until the last
    kernel was queued, not finished)."""

    @property
    def skipped(self) -> bool:
        return not (math.isfinite(self.loss) and math.isfinite(self.grad_norm))


def train_step(
    model: HybridLM,
    engine,
    ctx: ParallelContext,
    plan: StepPlan,
    batch,
    *,
    update: bool = True,
    lr: float | None = None,
) -> TrainStepResult:
    """One training step of ``batch`` (``.sequences``, ``.domains``) under ``plan``, through the
    DeepSpeed ``engine``: the balance GA buffer is emptied, every micro-batch runs forward and
    backward, the optimizer steps (skipped on a non-finite gradient), and the step's loss sums,
    token count, expert-gradient norm piece and routing metrics travel in **one** all-reduce and
    one host read. ``update=False`` stops after the backward passes and leaves the summed
    gradients in place (the plan-invariance tests compare them); grad_norm is then nan. ``lr``:
    the rate this step trains at (``runtime.lr_schedule.lr_at``), set on every parameter group
    before the update; None keeps the optimizer's.

    The engine averages gradients over ranks; our per-rank losses are shares of one global loss
    whose gradients must be *summed*, hence the factor world_size. The plan decides the number of
    micro-batches, so the accumulation boundary is marked here, not counted by DeepSpeed."""
    if model.tracker is not None:
        model.tracker.begin_step()
    if lr is not None:
        set_lr(engine.optimizer, lr)

    def backward(loss: Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss * ctx.world_size, scale_wrt_gas=False)

    began = time.perf_counter()
    sums = run_plan(model, ctx, plan, batch.sequences, batch.domains, forward=engine, backward=backward)
    forward_backward_s = time.perf_counter() - began
    device = sums.loss_sum.device
    zero_stage = engine.zero_optimization_stage()
    shared_sq = expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    if update and zero_stage == 0:
        shared_sq, expert_sq = _grad_squares(engine.module, device)
    # the shared squares are the same on every rank: summed over ranks, divided by the world below
    tokens_1 = torch.tensor([float(sums.tokens)], dtype=torch.float64)
    pieces = [sums.loss_sum, sums.aux_loss, tokens_1, shared_sq, expert_sq]
    metrics = model.routing_metrics
    if metrics is not None:
        pieces.append(metrics.stats())
    flat = torch.cat([p.to(device=device, dtype=torch.float64).reshape(-1) for p in pieces])
    if ctx.world_size > 1:
        dist_all_reduce(flat, group=ctx.world)
    host = flat.to("cpu")  # the step's one host read
    loss_sum, aux, tokens, shared_total, expert_total = host[:5].tolist()
    moe = None if metrics is None else metrics.summarize(host[5:].view_as(metrics.stats()))
    grad_norm = float("nan")
    if update:
        shared_sq = shared_total / ctx.world_size
        grad_norm = _optimizer_step(engine, zero_stage, shared_sq, expert_total, ctx.world_size, model)
    loss = loss_sum / max(sum(len(s) - 1 for s in batch.sequences), 1)
    return TrainStepResult(loss, aux, grad_norm, int(tokens), moe, forward_backward_s)


def _grad_squares(module: torch.nn.Module, device: torch.device) -> tuple[Tensor, Tensor]:
    """(Σ shared grad², Σ local expert grad²) on the device, without reading anything back."""
    from deepspeed.moe.utils import is_moe_param

    shared = [torch.zeros((), dtype=torch.float64, device=device)]
    expert = list(shared)
    for p in module.parameters():
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.detach().double().pow(2).sum())
    return torch.stack(shared).sum(), torch.stack(expert).sum()


def _ep_size(model: HybridLM) -> int:
    from moe.layer import MoELayer

    return max((m.ep_size for m in model.modules() if isinstance(m, MoELayer)), default=1)


def _optimizer_step(engine, zero_stage: int, shared_sq: float, expert_sq: float, world: int, model) -> float:
    """Clip and step; the global gradient norm (inf or nan: the update was skipped)."""
    if zero_stage > 0:
        engine.step()  # ZeRO-1/2 compute the global norm and skip a non-finite step themselves
        norm = engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)
    # stage 0: the engine summed the gradients at the last backward; check them before stepping.
    # Shared parameters are identical on every rank; each expert lives on world/ep_size ranks.
    norm = math.sqrt(shared_sq + expert_sq / (world // _ep_size(model)))
    if math.isfinite(norm):
        engine.step()
    else:
        engine.zero_grad()
    return norm


class LocalEngine:
    """The engine interface ``train_step`` uses, without DeepSpeed: one process, a torch
    optimizer and gradient clipping (no gradient reduction across ranks, no ZeRO). For
    single-process runs such as the MoE quality benchmark."""

    def __init__(self, model: HybridLM, optimizer: torch.optim.Optimizer, *, grad_clip: float = 0.0):
        self.module, self.optimizer, self.grad_clip = model, optimizer, grad_clip

    def __call__(self, *args, **kwargs) -> LMOutput:
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Gradients accumulate in ``.grad`` until ``step``; nothing to mark."""

    def backward(self, loss: Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def zero_optimization_stage(self) -> int:
        return 0

    def step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate_plan(
    model: HybridLM, ctx: ParallelContext, plan: StepPlan, sequences: list[Tensor], domains: list[int]
) -> tuple[float, int]:
    """Summed cross-entropy and target count of this rank's part of ``plan`` (no gradients);
    one host read at the end."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    targets = 0
    for micro in plan.microbatches:
        shard = shard_for_rank(sequences, domains, micro.group_of(ctx.rank), ctx.rank)
        batch = shard.sp_context(ctx)
        device = ctx.device
        logits, _ = model(shard.tokens_1T.to(device), batch, domains_T=shard.domains_T.to(device))
        tgt = shard.targets_1T.flatten()
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device), ignore_index=IGNORE, reduction="sum")
        loss_sum = loss_sum + ce.double()
        targets += int((tgt != IGNORE).sum())  # a host tensor
    return float(loss_sum), targets
