"""LASP-1: the ring (serial chain) baseline for sequence-parallel linear attention.

Same maths as LASP-2 (parallel/lasp2.py) and the same rank-local pieces; only the exchange
differs. Instead of one all-gather followed by a local scan, the state travels rank to rank:
rank t waits for S(t) from rank t-1, computes S(t+1) = c_{t+1} (E_t + s_t Gamma_t S(t)) and
sends it on, so the W-1 hops are strictly sequential (the last rank waits for all of them).
Bidirectional attention runs a second chain right to left for R; backward runs the chains
in the opposite directions for the gradients H and J.

Communication per rank and layer: one state of B*H*dk*dv elements received from the left and
one sent to the right per chain, forward and backward: about the bytes of LASP-2's gather
divided by W-1 per rank, but in W-1 dependent steps (latency grows with W).

``lasp1_attention_in_context`` takes the micro-batch's ``SPContext`` and reads nothing back;
``lasp1_attention`` (the public API) validates and, unless ``check_documents=False``, runs the
agreement all-gather of 12 int64 per rank first (the ring has no collective to fold it into).
"""

from __future__ import annotations

import torch
from torch import Tensor

from parallel import comm
from parallel.comm import Group
from parallel.lasp2 import (
    RankSpans,
    forward_intra,
    forward_pre,
    grads_through,
    inter_output,
    leaf_inputs,
    local_attention,
    output_state_grads,
    state_input_grads,
    sum_grads,
    validated_linear_context,
)
from parallel.linear_attention import validate_linear_attention_inputs
from parallel.sp_context import SPContext, validate_packed_cu_seqlens

__all__ = ["lasp1_attention", "lasp1_attention_in_context"]


def _chain(local: Tensor, spans: RankSpans, *, group: Group, rightward: bool, combine) -> Tensor:
    """One serial pass along the ranks. Returns what this rank received (zeros at the chain's
    start) after forwarding ``combine(received)`` to the next rank, if any."""
    t, W = spans.rank, spans.num_ranks
    source = t - 1 if rightward else t + 1
    target = t + 1 if rightward else t - 1
    received = comm.dist_recv(local, src=source, group=group) if 0 <= source < W else torch.zeros_like(local)
    if 0 <= target < W:
        comm.dist_send(combine(received), dst=target, group=group)
    return received


def _state_out(own: Tensor, gamma: Tensor, keep: bool, carry: bool):
    """The function a rank applies before passing a state on: c * (own + s * Gamma * received)."""

    def combine(received: Tensor) -> Tensor:
        if not keep:
            return torch.zeros_like(own)
        return own + gamma[..., None, None] * received if carry else own

    return combine


class _Lasp1Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, spans, causal, chunk_size):
        t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
        leaves = leaf_inputs(q, k, v, log_decay)
        _, states = forward_pre(leaves, spans, causal)
        E, F, g = (None if x is None else x.detach() for x in states)
        gamma = g.exp()
        # computed before the chain reaches this rank, as LASP-1 does
        o_intra = forward_intra(leaves, spans, causal, chunk_size)
        keep_right = t + 1 < W and c[t + 1]
        S_in = _chain(E, spans, group=group, rightward=True, combine=_state_out(E, gamma, keep_right, s[t]))
        R_in = None
        if not causal:
            keep_left = t >= 1 and c[t]
            R_in = _chain(F, spans, group=group, rightward=False, combine=_state_out(F, gamma, keep_left, s[t]))
        with torch.enable_grad():
            o = o_intra + inter_output(leaves[0], leaves[3], S_in, R_in, spans).to(o_intra.dtype)
        ctx.leaves, ctx.states, ctx.o, ctx.S_in, ctx.R_in, ctx.gamma = leaves, states, o, S_in, R_in, gamma
        ctx.group, ctx.spans, ctx.causal = group, spans, causal
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        spans, causal, group, gamma = ctx.spans, ctx.causal, ctx.group, ctx.gamma
        t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
        q, _, _, log_decay = ctx.leaves
        dM, dN = output_state_grads(q.detach(), None if log_decay is None else log_decay.detach(), do, spans, causal)
        local = grads_through([ctx.o], [do], ctx.leaves)
        # H(t) = dM_t + c_{t+1} s_t Gamma_t H(t+1), passed right to left; J mirrors it
        carry_h = t + 1 < W and c[t + 1] and s[t]
        H_next = _chain(dM, spans, group=group, rightward=False, combine=_state_out(dM, gamma, True, carry_h))
        J_prev = None
        if not causal:
            carry_j = t >= 1 and c[t] and s[t]
            J_prev = _chain(dN, spans, group=group, rightward=True, combine=_state_out(dN, gamma, True, carry_j))
        dE, dF, dg = state_input_grads(ctx.S_in, ctx.R_in, H_next, J_prev, gamma, spans)
        remote = grads_through(list(ctx.states), [dE, dF, dg], ctx.leaves)
        grads = sum_grads(local, remote, like=ctx.leaves)
        del ctx.leaves, ctx.states, ctx.o
        return (*grads, None, None, None, None)


def lasp1_attention_in_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sp: SPContext,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """:func:`lasp1_attention` over the micro-batch's context ``sp``; validates nothing and
    reads nothing back from the device."""
    if sp.num_ranks == 1:
        return local_attention(q, k, v, log_decay, sp.spans, causal, chunk_size)
    return _Lasp1Function.apply(q, k, v, log_decay, sp.group, sp.spans, causal, chunk_size)


def lasp1_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Group,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    check_documents: bool = True,
) -> Tensor:
    """Linear attention over ``group`` with the LASP-1 ring; same contract as ``lasp2_attention``.

    ``check_documents=False`` skips the agreement all-gather (12 int64 per rank) that makes every
    rank raise the same ValueError when the ranks' shapes or cu_seqlens differ; the inputs are
    then only checked on this rank."""
    if check_documents:
        sp = validated_linear_context(
            "lasp1_attention", q, k, v, group=group, causal=causal, log_decay=log_decay, cu_seqlens=cu_seqlens
        )
    else:
        validate_linear_attention_inputs(q, k, v, log_decay=log_decay, cu_seqlens=None)
        total = comm.group_size(group) * q.shape[1]
        bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q.shape[0], total_tokens=total)
        sp = SPContext.build(group, local_len=q.shape[1], bounds=bounds, device=q.device)
    return lasp1_attention_in_context(q, k, v, sp, causal=causal, log_decay=log_decay, chunk_size=chunk_size)
