"""In-process simulation of W ranks for the SP ops: the ops' own per-rank phase functions, with
each all-gather replaced by a stack of every rank's payload. Exact maths, no processes, fp64."""

from __future__ import annotations

import torch

from parallel import lasp2
from parallel.linear_attention import chunk_linear_attention


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

    # forward
    pre = [lasp2.forward_pre(s[1], s[2], s[3], spans[r], causal) for r, s in enumerate(shards)]
    payload_W = torch.stack([p for p, _ in pre])
    outs, saved = [], []
    for r, (qr, kr, vr, ar) in enumerate(shards):
        o_intra, _ = chunk_linear_attention(
            qr, kr, vr, causal=causal, log_decay=ar, cu_seqlens=spans[r].local_cu_seqlens, chunk_size=chunk_size
        )
        o_r, saved_r = lasp2.forward_post(qr, ar, o_intra, payload_W, pre[r][1], spans[r])
        outs.append(o_r)
        saved.append(saved_r)

    # backward
    do_shards = [shard(do, W, r) for r in range(W)]
    dMN_W = torch.stack([lasp2.backward_pre(s[0], s[3], do_shards[r], spans[r], causal) for r, s in enumerate(shards)])
    grads = []
    for r, s in enumerate(shards):
        inputs = [None if x is None else x.detach().requires_grad_() for x in s]
        local = lasp2.backward_local(inputs, do_shards[r], saved[r], spans[r], causal, chunk_size)
        remote = lasp2.backward_post(inputs, dMN_W, saved[r], spans[r], causal)
        grads.append(lasp2.sum_grads(local, remote, like=s))
    dq, dk, dv = (torch.cat([g[i] for g in grads], dim=1) for i in range(3))
    if log_decay is None:
        da = None
    elif log_decay.dim() == 1:
        # a per-head decay is shared by all ranks: the runtime sums its gradient over the group
        da = sum(g[3] for g in grads)
    else:
        da = torch.cat([g[3] for g in grads], dim=1)
    return torch.cat(outs, dim=1), dq, dk, dv, da
