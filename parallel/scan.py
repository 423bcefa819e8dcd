"""Pipelined state scan (ZeCO's "All-Scan") for both linear layer types: linear attention and the
gated delta rule. ``parallel.linear_sp = "scan"``.

LASP-2 all-gathers every rank's state (W-1 states received per rank, growing with W); the LASP-1
ring passes one state per hop but each hop waits for the whole state of the previous one. The
scan passes ONE combined prefix state per rank, like the ring, but cut into pieces of heads:

    rank t:  post the receives of S(t)'s pieces from t-1  ->  local intra-rank work  ->
             for each piece i: wait S(t)_i, send S(t+1)_i = combine_t(S(t)_i) to t+1

so rank t+1 works on piece i while rank t sends piece i+1: the chain's latency is about
(W-1) piece hops + one full state instead of (W-1) full states, and the first rank sends before
its own intra work. Volume per rank and layer (elements each way): one state of B*H*dk*dv in
forward and one in backward, independent of W and T (the delta rule sends no transition).
The public wrappers add the agreement all-gather of parallel/sp_context.py (12 int64 per rank);
the ``*_in_context`` entries (the runtime's, one SPContext per micro-batch) do not.

Combines (pieces are head slices; c, s as in parallel/lasp2.py):
  linear attention: S(t+1) = c_{t+1} (E_t + s_t Gamma_t S(t));   H(t) = dM_t + c_{t+1} s_t Gamma_t H(t+1)
  delta rule:       S(t+1) = c_{t+1} (E_t + s_t P_t S(t));       H(t) = dM_t + c_{t+1} s_t P_t^T H(t+1)
(bidirectional linear attention adds the mirrored R / J chains). Backward is the reverse scan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from parallel import comm, lasp2_delta
from parallel.comm import Group
from parallel.delta_rule import DEFAULT_CHUNK_SIZE, validate_delta_rule_inputs
from parallel.lasp2 import (
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
from parallel.sp_context import RankSpans, SPContext, validate_packed_cu_seqlens

__all__ = [
    "pipelined_chain",
    "scan_attention",
    "scan_attention_in_context",
    "scan_delta_rule_attention",
    "scan_delta_rule_attention_in_context",
]

DEFAULT_PIECES = 4


def _head_slices(H: int, pieces: int) -> list[slice]:
    n = max(1, min(pieces, H))
    bounds = [round(i * H / n) for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def pipelined_chain(like: Tensor, combine, *, group: Group, spans: RankSpans, rightward: bool, pieces: int, work=None):
    """One pipelined pass along the ranks over head pieces of a ``[B, H, ...]`` state.

    ``combine(received_piece, heads)`` gives the piece this rank passes on; ``work()`` (optional)
    is the local computation to overlap with the wait. Returns (what this rank received, zeros at
    the chain's start; work's result)."""
    t, W = spans.rank, spans.num_ranks
    source, target = (t - 1, t + 1) if rightward else (t + 1, t - 1)
    slices = _head_slices(like.shape[1], pieces)
    has_source, has_target = 0 <= source < W, 0 <= target < W
    sends = []
    if not has_source:
        if has_target:  # the chain's start sends at once, before its own work
            for i, heads in enumerate(slices):
                out = combine(torch.zeros_like(like[:, heads]), heads)
                sends.append(comm.dist_isend(out, dst=target, group=group, tag=i))
        result = work() if work is not None else None
        for handle in sends:
            handle.wait()
        return torch.zeros_like(like), result
    posted = [comm.dist_irecv(like[:, heads], src=source, group=group, tag=i) for i, heads in enumerate(slices)]
    result = work() if work is not None else None
    received = []
    for i, (heads, (piece, handle)) in enumerate(zip(slices, posted)):
        handle.wait()
        received.append(piece)
        if has_target:
            sends.append(comm.dist_isend(combine(piece, heads), dst=target, group=group, tag=i))
    for handle in sends:
        handle.wait()
    return torch.cat(received, dim=1), result


def _unchecked_context(q, validate, *, group: Group, cu_seqlens) -> SPContext:
    """This rank's checks only (``check_documents=False``: no agreement all-gather)."""
    validate()
    total = comm.group_size(group) * q.shape[1]
    bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q.shape[0], total_tokens=total)
    return SPContext.build(group, local_len=q.shape[1], bounds=bounds, device=q.device)


# --------------------------------------------------------------------------------------------
# Linear attention.
# --------------------------------------------------------------------------------------------


def _affine(own: Tensor, gamma: Tensor, keep: bool, carry: bool):
    """combine(received, heads) = keep * (own + carry * Gamma * received) on a head piece."""

    def combine(received: Tensor, heads: slice) -> Tensor:
        if not keep:
            return torch.zeros_like(received)
        mine = own[:, heads]
        return mine + gamma[:, heads, None, None] * received if carry else mine.clone()

    return combine


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, spans, causal, chunk_size, pieces):
        t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
        leaves = leaf_inputs(q, k, v, log_decay)
        _, states = forward_pre(leaves, spans, causal)
        E, F, g = (None if x is None else x.detach() for x in states)
        gamma = g.exp()
        keep_right = t + 1 < W and c[t + 1]
        S_in, o_intra = pipelined_chain(
            E,
            _affine(E, gamma, keep_right, s[t]),
            group=group,
            spans=spans,
            rightward=True,
            pieces=pieces,
            work=lambda: forward_intra(leaves, spans, causal, chunk_size),
        )
        R_in = None
        if not causal:
            keep_left = t >= 1 and c[t]
            R_in, _ = pipelined_chain(
                F, _affine(F, gamma, keep_left, s[t]), group=group, spans=spans, rightward=False, pieces=pieces
            )
        with torch.enable_grad():
            o = o_intra + inter_output(leaves[0], leaves[3], S_in, R_in, spans).to(o_intra.dtype)
        ctx.leaves, ctx.states, ctx.o, ctx.S_in, ctx.R_in, ctx.gamma = leaves, states, o, S_in, R_in, gamma
        ctx.group, ctx.spans, ctx.causal, ctx.pieces = group, spans, causal, pieces
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        spans, causal, group, gamma, pieces = ctx.spans, ctx.causal, ctx.group, ctx.gamma, ctx.pieces
        t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
        q, _, _, log_decay = ctx.leaves
        dM, dN = output_state_grads(q.detach(), None if log_decay is None else log_decay.detach(), do, spans, causal)
        carry_h = t + 1 < W and c[t + 1] and s[t]
        H_next, local = pipelined_chain(
            dM,
            _affine(dM, gamma, True, carry_h),
            group=group,
            spans=spans,
            rightward=False,
            pieces=pieces,
            work=lambda: grads_through([ctx.o], [do], ctx.leaves),
        )
        J_prev = None
        if not causal:
            carry_j = t >= 1 and c[t] and s[t]
            J_prev, _ = pipelined_chain(
                dN, _affine(dN, gamma, True, carry_j), group=group, spans=spans, rightward=True, pieces=pieces
            )
        dE, dF, dg = state_input_grads(ctx.S_in, ctx.R_in, H_next, J_prev, gamma, spans)
        remote = grads_through(list(ctx.states), [dE, dF, dg], ctx.leaves)
        grads = sum_grads(local, remote, like=ctx.leaves)
        del ctx.leaves, ctx.states, ctx.o
        return (*grads, None, None, None, None, None)


def scan_attention_in_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sp: SPContext,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    chunk_size: int = 64,
    pieces: int = DEFAULT_PIECES,
) -> Tensor:
    """:func:`scan_attention` over the micro-batch's context ``sp``; validates nothing and reads
    nothing back from the device."""
    if sp.num_ranks == 1:
        return local_attention(q, k, v, log_decay, sp.spans, causal, chunk_size)
    return _ScanFunction.apply(q, k, v, log_decay, sp.group, sp.spans, causal, chunk_size, pieces)


def scan_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Group,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    pieces: int = DEFAULT_PIECES,
    check_documents: bool = True,
) -> Tensor:
    """Linear attention over ``group`` with the pipelined scan; same contract as ``lasp2_attention``.

    ``pieces``: how many head pieces the state travels in. ``check_documents=False`` skips the
    agreement all-gather (12 int64 per rank) that makes every rank raise the same ValueError when
    the ranks' shapes or cu_seqlens differ."""
    if check_documents:
        sp = validated_linear_context(
            "scan_attention", q, k, v, group=group, causal=causal, log_decay=log_decay, cu_seqlens=cu_seqlens
        )
    else:

        def validate():
            validate_linear_attention_inputs(q, k, v, log_decay=log_decay, cu_seqlens=None)

        sp = _unchecked_context(q, validate, group=group, cu_seqlens=cu_seqlens)
    return scan_attention_in_context(
        q, k, v, sp, causal=causal, log_decay=log_decay, chunk_size=chunk_size, pieces=pieces
    )


# --------------------------------------------------------------------------------------------
# Gated delta rule.
# --------------------------------------------------------------------------------------------


def _delta_forward_combine(E: Tensor, P: Tensor, keep: bool, carry: bool):
    def combine(received: Tensor, heads: slice) -> Tensor:
        if not keep:
            return torch.zeros_like(received)
        return E[:, heads] + P[:, heads] @ received if carry else E[:, heads].clone()

    return combine


def _delta_backward_combine(dM: Tensor, P: Tensor, carry: bool):
    def combine(received: Tensor, heads: slice) -> Tensor:
        return dM[:, heads] + P[:, heads].transpose(-1, -2) @ received if carry else dM[:, heads].clone()

    return combine


class _ScanDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, group, spans, chunk_size, pieces):
        t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
        leaves = lasp2_delta.leaf_inputs(q, k, v, beta, log_decay)
        with torch.enable_grad():
            E, P, prepared = lasp2_delta.local_prepare(leaves, spans, chunk_size)
        E_d, P_d = E.detach(), P.detach()
        keep_right = t + 1 < W and c[t + 1]
        S_in, intra = pipelined_chain(
            E_d,
            _delta_forward_combine(E_d, P_d, keep_right, s[t]),
            group=group,
            spans=spans,
            rightward=True,
            pieces=pieces,
            work=lambda: lasp2_delta.forward_intra(leaves, (E, P, prepared)),
        )
        o0, q_eff = intra
        with torch.enable_grad():
            o = (o0 + torch.einsum("bthk,bhkv->bthv", q_eff, S_in)).to(q.dtype)
        ctx.leaves, ctx.E, ctx.P, ctx.q_eff, ctx.o, ctx.S_in = leaves, E, P, q_eff, o, S_in
        ctx.group, ctx.spans, ctx.pieces = group, spans, pieces
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        spans = ctx.spans
        t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
        q_eff = ctx.q_eff.detach()
        dM = torch.einsum("bthk,bthv->bhkv", q_eff, do.to(q_eff.dtype))
        carry_h = t + 1 < W and c[t + 1] and s[t]
        H_next, _ = pipelined_chain(
            dM,
            _delta_backward_combine(dM, ctx.P.detach(), carry_h),
            group=ctx.group,
            spans=spans,
            rightward=False,
            pieces=ctx.pieces,
        )
        dE, dP = lasp2_delta.transition_input_grads(ctx.S_in, H_next, spans)
        grads = grads_through([ctx.o, ctx.E, ctx.P], [do, dE, dP], ctx.leaves)
        grads = [None if g is None or x is None else g.to(x.dtype) for g, x in zip(grads, ctx.leaves)]
        del ctx.leaves, ctx.E, ctx.P, ctx.q_eff, ctx.o
        return (*grads, None, None, None, None)


def scan_delta_rule_attention_in_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    sp: SPContext,
    *,
    log_decay: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pieces: int = DEFAULT_PIECES,
) -> Tensor:
    """:func:`scan_delta_rule_attention` over the micro-batch's context ``sp``; validates nothing
    and reads nothing back from the device."""
    if sp.num_ranks == 1:
        return lasp2_delta.local_delta_rule(q, k, v, beta, log_decay, sp.spans, chunk_size)
    return _ScanDeltaFunction.apply(q, k, v, beta, log_decay, sp.group, sp.spans, chunk_size, pieces)


def scan_delta_rule_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    group: Group,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pieces: int = DEFAULT_PIECES,
    check_documents: bool = True,
) -> Tensor:
    """The gated delta rule over ``group`` with the pipelined scan; same contract as
    ``lasp2_delta_rule_attention`` (``check_documents`` as for :func:`scan_attention`)."""
    if check_documents:
        sp = lasp2_delta.validated_delta_context(
            "scan_delta_rule_attention", q, k, v, beta, group=group, log_decay=log_decay, cu_seqlens=cu_seqlens
        )
    else:

        def validate():
            validate_delta_rule_inputs(q, k, v, beta, log_decay=log_decay, cu_seqlens=None)

        sp = _unchecked_context(q, validate, group=group, cu_seqlens=cu_seqlens)
    return scan_delta_rule_attention_in_context(
        q, k, v, beta, sp, log_decay=log_decay, chunk_size=chunk_size, pieces=pieces
    )
