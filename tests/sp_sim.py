"""In-process simulation of W ranks for the SP ops: the ops' own per-rank phase functions, with
each all-gather replaced by a stack of every rank's payload. Exact maths, no processes, fp64."""

from __future__ import annotations

import zlib

import torch

from parallel import comm, lasp2
from parallel.linear_attention import linear_attention_recurrent

H, DK, DV = 2, 3, 4

# (decay, documents, causal) cases run over real gloo ranks by the LASP-2 and ring tests
GLOO_CASES = [
    ("none", "none", True),
    ("head", "inside", True),
    ("token", "on_cut", True),
    ("token", "span3", True),
    ("token", "mixed", False),
    ("head", "none", False),
    ("none", "span3", False),
]


def shard(x: torch.Tensor | None, W: int, rank: int) -> torch.Tensor | None:
    """Rank's contiguous slice along the token dim (dim 1); per-head tensors ([H]) are replicated."""
    if x is None or x.dim() == 1:
        return x
    return x.chunk(W, dim=1)[rank]


def simulate_lasp2(q, k, v, log_decay, cu_seqlens, *, W: int, causal: bool, do: torch.Tensor, chunk_size: int = 8):
    """(o, dq, dk, dv, dlog_decay) of LASP-2 over W simulated ranks, each tensor for the whole sequence."""
    T = q.shape[1] // W
    spans = [lasp2.rank_spans(cu_seqlens, num_ranks=W, rank=r, local_len=T) for r in range(W)]
    shards = [[shard(x, W, r) for x in (q, k, v, log_decay)] for r in range(W)]
    leaves = [[None if x is None else x.detach().requires_grad_() for x in s] for s in shards]

    # forward: each rank's pre-gather phase, the gather (a stack), each rank's post-gather phase
    pre = [lasp2.forward_pre(leaves[r], spans[r], causal) for r in range(W)]
    payload_W = torch.stack([payload for payload, _ in pre])
    outs, saved = [], []
    for r in range(W):
        o_intra = lasp2.forward_intra(leaves[r], spans[r], causal, chunk_size)
        o_r, saved_r = lasp2.forward_post(leaves[r], o_intra, payload_W, pre[r][1], spans[r])
        outs.append(o_r)
        saved.append(saved_r)

    # backward, the same way
    do_shards = [shard(do, W, r) for r in range(W)]
    dMN_W = torch.stack(
        [lasp2.backward_pre(lv[0], lv[3], do_shards[r], spans[r], causal) for r, lv in enumerate(leaves)]
    )
    grads = []
    for r in range(W):
        local = lasp2.grads_through([outs[r]], [do_shards[r]], leaves[r])
        remote = lasp2.backward_post(leaves[r], pre[r][1], dMN_W, saved[r], spans[r], causal)
        grads.append(lasp2.sum_grads(local, remote, like=leaves[r]))
    outs = [o.detach() for o in outs]
    dq, dk, dv = (torch.cat([g[i] for g in grads], dim=1) for i in range(3))
    if log_decay is None:
        da = None
    elif log_decay.dim() == 1:
        # a per-head decay is shared by all ranks: the runtime sums its gradient over the group
        da = sum(g[3] for g in grads)
    else:
        da = torch.cat([g[3] for g in grads], dim=1)
    return torch.cat(outs, dim=1), dq, dk, dv, da


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def documents(case: str, W: int, T: int) -> list[int] | None:
    """Global document boundaries for a named layout of W ranks x T tokens."""
    total = W * T
    if case == "none":
        return None
    if case == "inside":  # a boundary strictly inside every rank that has room for one
        inner = [r * T + T // 2 for r in range(W) if T >= 2]
    elif case == "on_cut":  # boundaries exactly on every rank cut
        inner = [r * T for r in range(1, W)]
    elif case == "span3":  # one document from inside rank 0 to inside rank 2
        inner = [T // 2, 2 * T + T // 2] if T >= 2 else [1, 2 * T + 1]
    elif case == "mixed":  # seeded random boundaries, incl. 1-token documents
        g = torch.Generator().manual_seed(zlib.crc32(f"{W},{T}".encode()))
        inner = torch.randperm(total - 1, generator=g)[: max(1, total // 3)].add(1).tolist()
    else:
        raise ValueError(case)
    return sorted({b for b in inner if 0 < b < total} | {0, total})


def make_inputs(W: int, T: int, decay: str, docs: str, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = 1 if docs != "none" else 2
    shape = (B, W * T, H)
    q = torch.randn(*shape, DK, generator=g, dtype=dtype)
    k = torch.randn(*shape, DK, generator=g, dtype=dtype)
    v = torch.randn(*shape, DV, generator=g, dtype=dtype)
    if decay == "none":
        a = None
    elif decay == "head":
        a = -torch.rand(H, generator=g, dtype=dtype) * 0.5
    else:
        a = -torch.rand(*shape, generator=g, dtype=dtype) * 0.5
    bounds = documents(docs, W, T)
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int64)
    do = torch.randn(B, W * T, H, DV, generator=g, dtype=dtype)
    return q, k, v, a, cu, do


def reference(q, k, v, a, cu, do, causal):
    """(o, dq, dk, dv, da) of the single-device naive reference, in fp64."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, a)]
    o, _ = linear_attention_recurrent(*leaves[:3], causal=causal, log_decay=leaves[3], cu_seqlens=cu)
    grads = torch.autograd.grad(o, [x for x in leaves if x is not None], do.double())
    grads = list(grads) + [None] * (4 - len(grads))
    return (o.detach(), *grads)


def run_linear_sp_rank(
    ctx, op_name: str, T: int, decay: str, docs: str, causal: bool, seed: int, in_context: bool = False
):
    """On one gloo rank: this rank's shard through LASP-2 or LASP-1, forward and backward, by the
    public function or (``in_context``) by the op's SPContext entry, as the runtime calls it (the
    context is built before the meter starts). Returns ([o, dq, dk, dv, dlog_decay], CommMeter summary)."""
    from parallel.ring import lasp1_attention, lasp1_attention_in_context
    from parallel.sp_context import SPContext

    W, r = ctx.world_size, ctx.rank
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs, dtype=torch.float32, seed=seed)
    leaves = [None if x is None else shard(x, W, r).clone().requires_grad_() for x in (q, k, v, a)]
    if in_context:
        sp = SPContext.from_cu_seqlens(ctx.world, cu, local_len=T)
        entry = {"lasp1": lasp1_attention_in_context, "lasp2": lasp2.lasp2_attention_in_context}[op_name]

        def op(q, k, v, *, causal, log_decay):
            return entry(q, k, v, sp, causal=causal, log_decay=log_decay)
    else:
        public = {"lasp1": lasp1_attention, "lasp2": lasp2.lasp2_attention}[op_name]

        def op(q, k, v, *, causal, log_decay):
            return public(q, k, v, group=ctx.world, causal=causal, log_decay=log_decay, cu_seqlens=cu)

    with comm.CommMeter() as meter:
        o = op(*leaves[:3], causal=causal, log_decay=leaves[3])
        o.backward(shard(do, W, r))
    return [o.detach()] + [None if x is None else x.grad for x in leaves], meter.summary()


def gather_full(results, log_decay):
    """Whole-sequence [o, dq, dk, dv, dlog_decay] from every rank's ``run_linear_sp_rank`` result.
    A per-head decay is one parameter shared by the ranks: its gradients sum."""
    got = [torch.cat([res[0][i] for res in results], dim=1) for i in range(4)]
    if log_decay is None:
        got.append(None)
    elif log_decay.dim() == 1:
        got.append(sum(res[0][4] for res in results))
    else:
        got.append(torch.cat([res[0][4] for res in results], dim=1))
    return got
