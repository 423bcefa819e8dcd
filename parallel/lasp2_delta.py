"""LASP-2 for the gated delta rule: one all-gather of (state, transition) per layer.

The delta rule's map from the state entering a rank to the state leaving it is affine,
``h_out = P_t h_in + E_t``, but its transition ``P_t = prod exp(g)(I - beta k k^T)`` is a dense
K x K matrix per head (linear attention's is a scalar), so the ranks' pieces must be composed
in order (matrix products do not commute). Per rank t, from its own tokens only (fp32 or fp64):

  E_t   the state leaving the rank when it is entered with zero               [B, H, K, V]
  P_t   its transition (0 when a document starts strictly inside the rank)   [B, H, K, K]
  q~_t  effective queries: o_t(h_in) = o_t(0) + h_in^T q~_t (first document piece only)

All three come from ONE run of the chunk kernel on an augmented state ``[K, V + K]`` entered
with ``[0 | I]`` and with values ``[v | 0]``: its outputs are ``[o(0) | q~]`` and its final state
``[E | P]``. With c_u (rank u's first token continues a document) and s_u (no document starts
strictly inside rank u) from the global cu_seqlens:

  forward:  S(0) = 0,  S(u+1) = c_{u+1} (E_u + s_u P_u S(u));   o_t = o_t(0) + S(t)^T q~_t
  backward: dM_t = q~_t^T dO_t (= dL/dS(t) through rank t's own output), all-gathered; then
            H(u) = dM_u + c_{u+1} s_u P_u^T H(u+1),  H(W) = 0
            dL/dE_t = c_{t+1} H(t+1),   dL/dP_t = c_{t+1} s_t H(t+1) S(t)^T
  and autograd through the rank's kernel graph turns these into dq, dk, dv, dbeta, dlog_decay.

Communication per rank and layer: forward (W-1) * B*H*K*(V+K) elements, backward
(W-1) * B*H*K*V, each way. Independent of T. The public wrapper adds one agreement all-gather
(12 int64 per rank); the runtime's entry (``*_in_context``, an SPContext per micro-batch) does not.

The backward collective is an all-gather of dM (the autograd dual, a reduce-scatter of the
gradients of every gathered (E, P), would move K*(V+K) per rank instead of K*V).
"""

from __future__ import annotations

import torch
from torch import Tensor

from parallel import comm
from parallel.comm import Group
from parallel.delta_rule import (
    DEFAULT_CHUNK_SIZE,
    chunk_delta_rule,
    chunk_outputs,
    prepare_chunks,
    reset_mask,
    state_pass,
    validate_delta_rule_inputs,
)
from parallel.lasp2 import grads_through
from parallel.linear_attention import compute_dtype, decay_BTH
from parallel.sp_context import RankSpans, SPContext, check_shards_agree, validate_packed_cu_seqlens

__all__ = ["lasp2_delta_rule_attention", "lasp2_delta_rule_attention_in_context", "validated_delta_context"]


def validated_delta_context(op: str, q, k, v, beta, *, group: Group, log_decay, cu_seqlens) -> SPContext:
    """The public wrappers' checks (LASP-2 and the scan): this rank's shard (host reads of
    cu_seqlens, the decay's and beta's range), then one agreement all-gather (12 int64 per rank)
    so that every rank raises the same ValueError before any state travels."""
    size = comm.group_size(group)
    problem, bounds = None, None
    try:
        validate_delta_rule_inputs(q, k, v, beta, log_decay=log_decay, cu_seqlens=None)
        bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q.shape[0], total_tokens=size * q.shape[1])
    except ValueError as exc:
        problem = f"{op}: {exc}"
    kind = 0 if problem is not None or log_decay is None else log_decay.dim()
    check_shards_agree(
        op, q, k, v, causal=True, bounds=bounds, extra=("log_decay kind", kind), problem=problem, group=group
    )
    return SPContext.build(group, local_len=q.shape[1], bounds=bounds, device=q.device)


def local_delta_rule(q, k, v, beta, log_decay, spans: RankSpans, chunk_size: int) -> Tensor:
    """The delta rule among this rank's own tokens (all of it when the group has one rank)."""
    o, _ = chunk_delta_rule(
        q, k, v, beta, log_decay=log_decay, cu_seqlens=spans.local_cu_seqlens, chunk_size=chunk_size, check=False
    )
    return o


# --------------------------------------------------------------------------------------------
# Rank-local pieces (differentiable; no communication).
# --------------------------------------------------------------------------------------------


def local_prepare(leaves, spans: RankSpans, chunk_size: int):
    """The augmented kernel up to its final state: (E, P, chunk pieces and entering states)."""
    q, k, v, beta, log_decay = leaves
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    v_aug = torch.cat([v.to(cdt), v.new_zeros(B, T, H, K, dtype=cdt)], dim=-1)
    eye = torch.eye(K, dtype=cdt, device=q.device).expand(B, H, K, K)
    h0_aug = torch.cat([q.new_zeros(B, H, K, V, dtype=cdt), eye], dim=-1)
    a_BTH = decay_BTH(log_decay, B, T, H, cdt, q.device)
    reset_T = reset_mask(spans.local_cu_seqlens, T, q.device)
    pieces = prepare_chunks(q.to(cdt), k.to(cdt), v_aug, beta.to(cdt), a_BTH, reset_T, chunk_size)
    S_chunks, final = state_pass(pieces["P"], pieces["E"], h0_aug)
    E, P = final.split([V, K], dim=-1)
    return E, P, (pieces, S_chunks)


def local_outputs(prepared, V: int) -> tuple[Tensor, Tensor]:
    """(o(0), q~) of this rank from the prepared chunks: the bulk of the work, no remote data."""
    pieces, S_chunks = prepared
    o_aug = chunk_outputs(pieces, S_chunks)
    return o_aug[..., :V], o_aug[..., V:]


def scan_transitions(E_W: Tensor, P_W: Tensor, spans: RankSpans) -> Tensor:
    """S(t), the state entering this rank t, from every rank's (E, P): [W, B, H, K, V|K]."""
    t, c, s = spans.rank, spans.continues, spans.single
    S = torch.zeros_like(E_W[0])
    for u in range(t):
        S = E_W[u] + P_W[u] @ S if s[u] else E_W[u]
        S = S if c[u + 1] else torch.zeros_like(S)
    return S


def scan_transition_grads(dM_W: Tensor, P_W: Tensor, spans: RankSpans) -> Tensor:
    """H(t+1): the total gradient w.r.t. the state leaving this rank t to the right."""
    t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
    H_next = torch.zeros_like(dM_W[0])
    for u in range(W - 1, t, -1):
        carried = u + 1 < W and c[u + 1] and s[u]
        H_next = dM_W[u] + P_W[u].transpose(-1, -2) @ H_next if carried else dM_W[u]
    return H_next


def transition_input_grads(S_in: Tensor, H_next: Tensor, spans: RankSpans) -> tuple[Tensor, Tensor]:
    """(dL/dE_t, dL/dP_t) from H(t+1) and S(t)."""
    t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
    right = t + 1 < W and c[t + 1]
    dE = H_next if right else torch.zeros_like(H_next)
    if right and s[t]:
        dP = H_next @ S_in.transpose(-1, -2)
    else:
        dP = H_next.new_zeros(*H_next.shape[:-1], H_next.shape[-2])
    return dE, dP


# --------------------------------------------------------------------------------------------
# Payload of the forward all-gather: [E, P], flat.
# --------------------------------------------------------------------------------------------


def pack(E: Tensor, P: Tensor) -> Tensor:
    return torch.cat([E.reshape(-1), P.reshape(-1)])


def unpack(payload_W: Tensor, E: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    """(E_W, P_W) from the gathered payloads."""
    W, nE = payload_W.shape[0], E.numel()
    return payload_W[:, :nE].reshape(W, *E.shape), payload_W[:, nE:].reshape(W, *P.shape)


# --------------------------------------------------------------------------------------------
# Per-rank phases (tests run W ranks through them in one process, with stacks for gathers).
# --------------------------------------------------------------------------------------------


def leaf_inputs(*tensors):
    return [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in tensors]


def forward_pre(leaves, spans: RankSpans, chunk_size: int):
    """This rank's payload for the forward gather, and its local graph (E, P, prepared)."""
    with torch.enable_grad():
        E, P, prepared = local_prepare(leaves, spans, chunk_size)
    return pack(E.detach(), P.detach()), (E, P, prepared)


def forward_intra(leaves, local) -> tuple[Tensor, Tensor]:
    """(o(0), q~) with their graph; runs while the gather is in flight."""
    with torch.enable_grad():
        return local_outputs(local[2], leaves[2].shape[-1])


def forward_post(leaves, intra, payload_W, local, spans: RankSpans):
    """o_t (with its local graph) and what backward needs (S(t), P_W)."""
    E, P, _ = local
    E_W, P_W = unpack(payload_W, E.detach(), P.detach())
    S_in = scan_transitions(E_W, P_W, spans)
    o0, q_eff = intra
    with torch.enable_grad():
        o = o0 + torch.einsum("bthk,bhkv->bthv", q_eff, S_in)
    return o.to(leaves[0].dtype), (S_in, P_W)


def backward_pre(intra, do: Tensor) -> Tensor:
    """dM_t = q~^T dO, flattened: this rank's payload for the backward gather."""
    q_eff = intra[1].detach()
    return torch.einsum("bthk,bthv->bhkv", q_eff, do.to(q_eff.dtype)).reshape(-1)


def backward_post(leaves, o, do, local, dM_W_flat, saved, spans: RankSpans):
    """Gradients of the inputs, from everyone's dM: one backward pass through the rank's graph
    for its own output and its outgoing (E, P) together (they share the kernel's graph)."""
    S_in, P_W = saved
    dM_W = dM_W_flat.reshape(spans.num_ranks, *S_in.shape)
    H_next = scan_transition_grads(dM_W, P_W, spans)
    dE, dP = transition_input_grads(S_in, H_next, spans)
    E, P, _ = local
    grads = grads_through([o, E, P], [do, dE, dP], leaves)
    return [None if g is None or x is None else g.to(x.dtype) for g, x in zip(grads, leaves)]


class _Lasp2DeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, group, spans, chunk_size):
        leaves = leaf_inputs(q, k, v, beta, log_decay)
        payload, local = forward_pre(leaves, spans, chunk_size)
        payload_W, handle = comm.dist_all_gather(payload, group=group, async_op=True)
        intra = forward_intra(leaves, local)
        handle.wait()
        o, saved = forward_post(leaves, intra, payload_W, local, spans)
        # graphs, not just tensors, go to backward: kept as attributes, released with ctx
        ctx.leaves, ctx.local, ctx.intra, ctx.o, ctx.saved = leaves, local, intra, o, saved
        ctx.group, ctx.spans = group, spans
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        payload = backward_pre(ctx.intra, do)
        dM_W, _ = comm.dist_all_gather(payload, group=ctx.group)
        grads = backward_post(ctx.leaves, ctx.o, do, ctx.local, dM_W, ctx.saved, ctx.spans)
        del ctx.leaves, ctx.local, ctx.intra, ctx.o, ctx.saved
        return (*grads, None, None, None)


def lasp2_delta_rule_attention_in_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    sp: SPContext,
    *,
    log_decay: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """:func:`lasp2_delta_rule_attention` over the micro-batch's context ``sp``; validates nothing
    and reads nothing back from the device: one all-gather forward, one backward."""
    if sp.num_ranks == 1:
        return local_delta_rule(q, k, v, beta, log_decay, sp.spans, chunk_size)
    return _Lasp2DeltaFunction.apply(q, k, v, beta, log_decay, sp.group, sp.spans, chunk_size)


def lasp2_delta_rule_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    group: Group,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """The gated delta rule over the ranks of ``group`` (LASP-2 style); inputs are this rank's shard.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` in [0, 1] — tokens
            [rT, (r+1)T) of the sequence on group rank r (every rank holds the same T).
        group: the SP group (``comm.SOLO`` for a single rank).
        log_decay: None, ``[H]`` or ``[B, T, H]`` (this rank's gates), <= 0.
        cu_seqlens: document boundaries of the WHOLE packed sequence ``[0, ..., W*T]``, identical
            on every rank (B must be 1).

    Returns ``[B, T, H, V]``, this rank's shard of ``delta_rule_attention`` of the whole sequence.
    Validates its inputs (host reads) and checks that the ranks agree (one all-gather of 12
    int64), then runs :func:`lasp2_delta_rule_attention_in_context`.
    """
    sp = validated_delta_context(
        "lasp2_delta_rule_attention", q, k, v, beta, group=group, log_decay=log_decay, cu_seqlens=cu_seqlens
    )
    return lasp2_delta_rule_attention_in_context(q, k, v, beta, sp, log_decay=log_decay, chunk_size=chunk_size)
