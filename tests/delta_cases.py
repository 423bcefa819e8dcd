"""Shared inputs and references of the gated-delta-rule tests (single device, simulated ranks, gloo)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.delta_rule import delta_rule_recurrent
from tests.sp_sim import documents, shard

H, DK, DV = 2, 3, 4
NAMES = ["o", "dq", "dk", "dv", "dbeta", "dlog_decay"]

# (decay, documents) cases run over real gloo ranks
GLOO_CASES = [("none", "none"), ("head", "inside"), ("token", "on_cut"), ("token", "span3"), ("token", "mixed")]


def make_delta_inputs(W: int, T: int, decay: str, docs: str, dtype=torch.float64, seed: int = 0):
    """(q, k, v, beta, log_decay, cu_seqlens, do) for a packed sequence of W x T tokens; k is
    L2-normalised (as the model does), so the transitions are contractions."""
    g = torch.Generator().manual_seed(seed)
    B = 1 if docs != "none" else 2
    shape = (B, W * T, H)
    q = torch.randn(*shape, DK, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(*shape, DK, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(*shape, DV, generator=g, dtype=torch.float64)
    beta = torch.rand(*shape, generator=g, dtype=torch.float64)
    if decay == "none":
        a = None
    elif decay == "head":
        a = -torch.rand(H, generator=g, dtype=torch.float64) * 0.5
    else:
        a = -torch.rand(*shape, generator=g, dtype=torch.float64) * 0.5
    bounds = documents(docs, W, T)
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int64)
    do = torch.randn(B, W * T, H, DV, generator=g, dtype=torch.float64)
    cast = [None if x is None else x.to(dtype) for x in (q, k, v, beta, a, do)]
    return (*cast[:5], cu, cast[5])


def delta_reference(q, k, v, beta, a, cu, do):
    """(o, dq, dk, dv, dbeta, dlog_decay) of the naive recurrence over the whole sequence, fp64."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, beta, a)]
    o, _ = delta_rule_recurrent(*leaves[:4], log_decay=leaves[4], cu_seqlens=cu)
    wanted = [x for x in leaves if x is not None]
    grads = list(torch.autograd.grad(o, wanted, do.double()))
    return (o.detach(), *grads, *([None] * (5 - len(grads))))


def shard_leaves(inputs, W: int, rank: int):
    """Rank's leaf copies of (q, k, v, beta, log_decay): token slices, a per-head decay replicated."""
    return [None if x is None else shard(x, W, rank).detach().clone().requires_grad_() for x in inputs]


def gather_grads(per_rank, log_decay):
    """Whole-sequence [o, dq, dk, dv, dbeta, dlog_decay] from per-rank lists of the same; a
    per-head decay is one parameter shared by the ranks, so its gradients sum."""
    got = [torch.cat([r[i] for r in per_rank], dim=1) for i in range(5)]
    if log_decay is None:
        got.append(None)
    elif log_decay.dim() == 1:
        got.append(sum(r[5] for r in per_rank))
    else:
        got.append(torch.cat([r[5] for r in per_rank], dim=1))
    return got
