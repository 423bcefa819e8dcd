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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel.context import ParallelContext
from parallel.sp_context import SPContext
from planner.plan import Group as PlanGroup
from planner.plan import StepPlan
from runtime.model import HybridLM

__all__ = ["LocalShard", "StepResult", "run_plan", "shard_for_rank"]

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
    loss_sum: float
    """This rank's summed cross-entropy over the step (divide by the global target count)."""
    aux_loss: float
    """This rank's summed balance-loss shares."""
    tokens: int
    """Real (non-padding) tokens this rank processed."""


def run_plan(
    model: HybridLM,
    ctx: ParallelContext,
    plan: StepPlan,
    sequences: list[Tensor],
    domains: list[int],
    *,
    backward: Callable[[Tensor, bool], None],
    forward: Callable[..., Tensor] | None = None,
) -> StepResult:
    """Forward and backward of every micro-batch of ``plan``; ``backward(loss, is_last)`` is the
    engine's backward (it gets the per-rank loss share; the caller scales for its reduction)."""
    forward = forward or model
    if plan.group_sizes == "any":  # groups that are not buddy blocks: made collectively, once
        ctx.ensure_groups(g.ranks for micro in plan.microbatches for g in micro.groups)
    num_tokens = sum(len(s) for s in sequences)
    num_targets = sum(len(s) - 1 for s in sequences)
    loss_sum = aux_sum = 0.0
    tokens = 0
    for m, micro in enumerate(plan.microbatches):
        shard = shard_for_rank(sequences, domains, micro.group_of(ctx.rank), ctx.rank)
        device = ctx.device
        batch = shard.sp_context(ctx)  # once per micro-batch: every layer reads it, none re-derives it
        logits = forward(
            shard.tokens_1T.to(device),
            batch,
            token_normalizer=num_tokens,
            num_sequences=len(sequences),
            domains_T=shard.domains_T.to(device),
        )
        ce_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), shard.targets_1T.to(device).flatten(), ignore_index=IGNORE, reduction="sum"
        )
        aux = model.aux_loss()
        backward(ce_sum / num_targets + aux, m == len(plan.microbatches) - 1)
        loss_sum += float(ce_sum.detach())
        aux_sum += float(aux.detach())
        tokens += shard.tokens_1T.shape[1] - shard.num_padding
    return StepResult(loss_sum, aux_sum, tokens)


@torch.no_grad()
def evaluate_plan(
    model: HybridLM, ctx: ParallelContext, plan: StepPlan, sequences: list[Tensor], domains: list[int]
) -> tuple[float, int]:
    """Summed cross-entropy and target count of this rank's part of ``plan`` (no gradients)."""
    loss_sum, targets = 0.0, 0
    for micro in plan.microbatches:
        shard = shard_for_rank(sequences, domains, micro.group_of(ctx.rank), ctx.rank)
        batch = shard.sp_context(ctx)
        device = ctx.device
        logits = model(shard.tokens_1T.to(device), batch, domains_T=shard.domains_T.to(device))
        tgt = shard.targets_1T.to(ctx.device).flatten()
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), tgt, ignore_index=IGNORE, reduction="sum"))
        targets += int((tgt != IGNORE).sum())
    return loss_sum, targets
