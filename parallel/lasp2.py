"""LASP-2: sequence-parallel linear attention with one all-gather of fixed-size states per layer.

Notation (parallel/README.md has the full derivation): W ranks of an SP group, rank t holds
tokens [tT, (t+1)T) of the packed sequence. Per rank, from its own tokens only:
  E_t   state of its last document span, decayed to the rank's end       [B, H, dk, dv]
  F_t   state of its first document span, decayed to the rank's start    (bidirectional only)
  g_t   total log-decay over the rank, Gamma_t = exp(g_t)                 [B, H]
and, from the global cu_seqlens (identical on every rank): c_u = rank u's first token continues
a document from rank u-1; s_u = no document starts strictly inside rank u.

Forward: all-gather (E, F, g) once, then every rank scans locally, in fp32:
  S(u+1) = c_{u+1} (E_u + s_u Gamma_u S(u)),   S(0) = 0       (state entering rank u+1 from the left)
  R(u-1) = c_u (F_u + s_u Gamma_u R(u)),       R(W-1) = 0     (state entering rank u-1 from the right)
  o_t = o_intra + exp(b) (q . S(t)) [first span] + exp(b') (q . R(t)) [last span, bidirectional]
where b (b') is the cumulative log-decay from the rank's start (to its end, exclusive).

Backward: dM_t = dL/dS(t) = (q exp(b))^T dO and dN_t = dL/dR(t) are all-gathered once, then
  H(u) = dM_u + c_{u+1} s_u Gamma_u H(u+1)      dL/dE_t = c_{t+1} H(t+1)
  J(u) = dN_u + c_u s_u Gamma_u J(u-1)          dL/dF_t = c_t J(t-1)
  dL/dGamma_t = c_{t+1} s_t <S(t), H(t+1)> + c_t s_t <R(t), J(t-1)>   (the decay's boundary term)
and autograd over the rank-local pieces turns these into dq, dk, dv, d(log_decay).

Communication per rank and layer: (W-1) * B*H*dk*dv elements sent and received in forward and
the same in backward (twice that for bidirectional attention with decay or documents, plus
B*H values of g per rank for per-token decay). Independent of the sequence length.

Entry points: ``lasp2_attention_in_context`` takes the micro-batch's ``SPContext``
(parallel/sp_context.py: spans, device cu_seqlens, one agreement check per micro-batch) and
reads nothing back from the device. ``lasp2_attention`` (the public API) is its validating
wrapper for direct callers: it reads cu_seqlens back and runs one agreement all-gather of 12
int64 per rank per call (``sp_context.check_shards_agree``) before the two state gathers.

The phases are plain functions so that tests can run W ranks in one process (fp64) through the
same code, with the all-gather simulated by a stack.
"""

from __future__ import annotations

import torch
from torch import Tensor

from parallel import comm
from parallel.comm import Group
from parallel.linear_attention import (
    chunk_linear_attention,
    compute_dtype,
    decay_BTH,
    first_segment_decay,
    last_segment_decay,
    last_segment_state,
    validate_linear_attention_inputs,
)
from parallel.sp_context import (
    RankSpans,
    SPContext,
    check_shards_agree,
    rank_spans,
    validate_packed_cu_seqlens,
)

__all__ = ["RankSpans", "lasp2_attention", "lasp2_attention_in_context", "rank_spans"]


def validated_linear_context(
    op: str, q, k, v, *, group: Group, causal: bool, log_decay: Tensor | None, cu_seqlens: Tensor | None
) -> SPContext:
    """The public wrappers' checks (shared by LASP-2 and the LASP-1 ring): this rank's shard
    (host reads of cu_seqlens and the decay's range), then one agreement all-gather, so that
    every rank raises the same ValueError before any state travels; returns the shard's context."""
    size = comm.group_size(group)
    problem, bounds = None, None
    try:
        validate_linear_attention_inputs(q, k, v, log_decay=log_decay, cu_seqlens=None)
        bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q.shape[0], total_tokens=size * q.shape[1])
    except ValueError as exc:
        problem = f"{op}: {exc}"
    kind = 0 if problem is not None or log_decay is None else log_decay.dim()
    check_shards_agree(
        op, q, k, v, causal=causal, bounds=bounds, extra=("log_decay kind", kind), problem=problem, group=group
    )
    return SPContext.build(group, local_len=q.shape[1], bounds=bounds, device=q.device)


# --------------------------------------------------------------------------------------------
# Rank-local pieces (differentiable; no communication).
# --------------------------------------------------------------------------------------------


def _first_span_state(k: Tensor, v: Tensor, log_decay: Tensor | None, local_cu: Tensor | None) -> Tensor:
    """F = sum_{j in first span} exp(b_j) k_j^T v_j with b the inclusive log-decay from the rank's start."""
    B, T, H, _ = k.shape
    cdt = compute_dtype(k.dtype)
    b_BTH = first_segment_decay(log_decay, local_cu, B, T, H, dtype=cdt, device=k.device)
    return torch.einsum("bthk,bthv->bhkv", k.to(cdt) * b_BTH.exp()[..., None], v.to(cdt))


def _first_span_state_is_last(log_decay: Tensor | None, spans: RankSpans) -> bool:
    """True when F == E on every rank: no decay and no document boundary anywhere. A global
    decision, so that every rank packs the same payload."""
    has_documents = not all(spans.single) or not all(spans.continues[1:])
    return log_decay is None and not has_documents


def local_states(k, v, log_decay, spans: RankSpans, causal: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(E_t, F_t, g_t): this rank's contribution to the scans, in the compute dtype.

    F is None for causal attention and the very tensor E when they coincide (bidirectional, no
    decay, no documents): autograd then sums the gradients that reach E through both roles."""
    B, T, H, _ = k.shape
    E_BHKV, _ = last_segment_state(k, v, log_decay=log_decay, cu_seqlens=spans.local_cu_seqlens, check=False)
    if causal:
        F_BHKV = None
    elif _first_span_state_is_last(log_decay, spans):
        F_BHKV = E_BHKV
    else:
        F_BHKV = _first_span_state(k, v, log_decay, spans.local_cu_seqlens)
    g_BH = decay_BTH(log_decay, B, T, H, E_BHKV.dtype, k.device).sum(1)
    return E_BHKV, F_BHKV, g_BH


def inter_output(q, log_decay, S_in, R_in, spans: RankSpans) -> Tensor:
    B, T, H, _ = q.shape
    cdt = S_in.dtype
    qc = q.to(cdt)
    b_BTH = first_segment_decay(log_decay, spans.local_cu_seqlens, B, T, H, dtype=cdt, device=q.device)
    out = torch.einsum("bthk,bhkv->bthv", qc * b_BTH.exp()[..., None], S_in)
    if R_in is not None:
        b_BTH = last_segment_decay(log_decay, spans.local_cu_seqlens, B, T, H, dtype=cdt, device=q.device)
        out = out + torch.einsum("bthk,bhkv->bthv", qc * b_BTH.exp()[..., None], R_in)
    return out


def output_state_grads(q, log_decay, do, spans: RankSpans, causal: bool) -> tuple[Tensor, Tensor | None]:
    """(dM_t, dN_t): the gradients of the loss w.r.t. S(t) and R(t) through this rank's output."""
    B, T, H, _ = q.shape
    cdt = compute_dtype(q.dtype)
    qc, doc = q.to(cdt), do.to(cdt)
    b_BTH = first_segment_decay(log_decay, spans.local_cu_seqlens, B, T, H, dtype=cdt, device=q.device)
    dM_BHKV = torch.einsum("bthk,bthv->bhkv", qc * b_BTH.exp()[..., None], doc)
    if causal:
        return dM_BHKV, None
    b_BTH = last_segment_decay(log_decay, spans.local_cu_seqlens, B, T, H, dtype=cdt, device=q.device)
    return dM_BHKV, torch.einsum("bthk,bthv->bhkv", qc * b_BTH.exp()[..., None], doc)


# --------------------------------------------------------------------------------------------
# Scans over all ranks' gathered pieces (every rank runs them for itself, in fp32 or fp64).
# --------------------------------------------------------------------------------------------


def scan_states(E_W, F_W, gamma_W, spans: RankSpans) -> tuple[Tensor, Tensor | None]:
    """(S(t), R(t)) for this rank t from every rank's (E, F, Gamma); F_W None means causal.

    E_W, F_W: [W, B, H, dk, dv]; gamma_W: [W, B, H]."""
    t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
    S = torch.zeros_like(E_W[0])
    for u in range(t):
        S = E_W[u] + gamma_W[u][..., None, None] * S if s[u] else E_W[u]
        S = S if c[u + 1] else torch.zeros_like(S)
    if F_W is None:
        return S, None
    R = torch.zeros_like(E_W[0])
    for u in range(W - 1, t, -1):
        R = F_W[u] + gamma_W[u][..., None, None] * R if s[u] else F_W[u]
        R = R if c[u] else torch.zeros_like(R)
    return S, R


def scan_state_grads(dM_W, dN_W, gamma_W, spans: RankSpans) -> tuple[Tensor, Tensor | None]:
    """(H(t+1), J(t-1)): the total gradients w.r.t. the state leaving this rank to the right and
    to the left, from every rank's (dM, dN). dN_W None means causal."""
    t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
    H_next = torch.zeros_like(dM_W[0])
    for u in range(W - 1, t, -1):
        carried = c[u + 1] and s[u] if u + 1 < W else False
        H_next = dM_W[u] + gamma_W[u][..., None, None] * H_next if carried else dM_W[u]
    if dN_W is None:
        return H_next, None
    J_prev = torch.zeros_like(dM_W[0])
    for u in range(t):
        carried = c[u] and s[u] if u >= 1 else False
        J_prev = dN_W[u] + gamma_W[u][..., None, None] * J_prev if carried else dN_W[u]
    return H_next, J_prev


def state_input_grads(S_in, R_in, H_next, J_prev, gamma_t, spans: RankSpans):
    """(dL/dE_t, dL/dF_t or None, dL/dg_t) from the scanned gradients."""
    t, W, c, s = spans.rank, spans.num_ranks, spans.continues, spans.single
    right = t + 1 < W and c[t + 1]
    dE = H_next if right else torch.zeros_like(H_next)
    dgamma = (S_in * H_next).sum((-2, -1)) if right and s[t] else torch.zeros_like(gamma_t)
    dF = None
    if J_prev is not None:
        left = t >= 1 and c[t]
        dF = J_prev if left else torch.zeros_like(J_prev)
        if left and s[t]:
            dgamma = dgamma + (R_in * J_prev).sum((-2, -1))
    return dE, dF, dgamma * gamma_t


# --------------------------------------------------------------------------------------------
# Packing of the all-gathered payload: states and per-token decay totals.
# --------------------------------------------------------------------------------------------


def pack_states(E, F, g, per_token_decay: bool, f_is_e: bool = False) -> Tensor:
    """[E, F (unless absent or equal to E), g (per-token decay only)], flat."""
    parts = [E.reshape(-1)]
    if F is not None and not f_is_e:
        parts.append(F.reshape(-1))
    if per_token_decay:
        parts.append(g.reshape(-1))
    return torch.cat(parts)


def unpack_states(payload_W: Tensor, E: Tensor, has_F: bool, f_is_e: bool, per_token_decay: bool, g_local: Tensor):
    """Split [W, n] gathered payloads into E_W, F_W, gamma_W (the layout of ``pack_states``)."""
    W, n_state = payload_W.shape[0], E.numel()
    E_W = payload_W[:, :n_state].reshape(W, *E.shape)
    offset = n_state
    F_W = E_W if has_F else None
    if has_F and not f_is_e:
        F_W = payload_W[:, offset : offset + n_state].reshape(W, *E.shape)
        offset += n_state
    if per_token_decay:
        g_W = payload_W[:, offset : offset + g_local.numel()].reshape(W, *g_local.shape)
    else:
        # no decay or a fixed per-head one: every rank's total decay equals ours
        g_W = g_local.detach().expand(W, *g_local.shape)
    return E_W, F_W, g_W.exp()


# --------------------------------------------------------------------------------------------
# The autograd Function and the public function.
# --------------------------------------------------------------------------------------------


def grads_through(outputs, grad_outputs, inputs):
    """torch.autograd.grad over the pairs that exist; None for inputs that get no gradient."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None and o.requires_grad]
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    if not pairs or not wanted:
        return [None] * len(inputs)
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    by_id = {id(x): g for x, g in zip(wanted, grads)}
    return [None if x is None else by_id.get(id(x)) for x in inputs]


# The per-rank phases of one LASP-2 call. Between forward_pre and forward_post, and between
# backward_pre and backward_post, the payloads of all ranks are all-gathered ([W, n]); tests run
# W ranks through these very functions in one process. The rank-local computations keep their
# autograd graph from forward to backward (on detached leaf copies of the inputs): the
# pure-torch kernel would hold those activations under plain autograd anyway, and fla's
# Function saves only its inputs, so keeping the graph costs no more memory than recomputing
# and saves a second forward pass.


def leaf_inputs(*tensors):
    """Detached copies that require grad where the originals did (None stays None)."""
    return [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in tensors]


def forward_pre(leaves, spans: RankSpans, causal: bool):
    """This rank's payload for the forward all-gather, and the local states (with their graph)."""
    _, k, v, log_decay = leaves
    with torch.enable_grad():
        E, F, g = local_states(k, v, log_decay, spans, causal)
    per_token = log_decay is not None and log_decay.dim() == 3
    F_data = None if F is None else F.detach()
    payload = pack_states(E.detach(), F_data, g.detach(), per_token, f_is_e=F is E)
    return payload, (E, F, g)


def local_attention(q, k, v, log_decay, spans: RankSpans, causal: bool, chunk_size: int) -> Tensor:
    """Attention among this rank's own tokens (all of it when the group has one rank)."""
    # check=False: the inputs were checked by the public wrapper or come from an SP context
    o, _ = chunk_linear_attention(
        q,
        k,
        v,
        causal=causal,
        log_decay=log_decay,
        cu_seqlens=spans.local_cu_seqlens,
        chunk_size=chunk_size,
        check=False,
    )
    return o


def forward_intra(leaves, spans: RankSpans, causal: bool, chunk_size: int) -> Tensor:
    """The intra-rank output with its graph; needs no remote data, so it runs while the gather
    is in flight."""
    with torch.enable_grad():
        return local_attention(*leaves, spans, causal, chunk_size)


def forward_post(leaves, o_intra, payload_W, states, spans: RankSpans):
    """o_t (with its local graph) from the intra output and everyone's payloads, plus what the
    backward scans need."""
    q, _, _, log_decay = leaves
    E, F, g = states
    per_token = log_decay is not None and log_decay.dim() == 3
    E_W, F_W, gamma_W = unpack_states(payload_W, E.detach(), F is not None, F is E, per_token, g.detach())
    S_in, R_in = scan_states(E_W, F_W, gamma_W, spans)
    with torch.enable_grad():
        o = o_intra + inter_output(q, log_decay, S_in, R_in, spans).to(o_intra.dtype)
    return o, (S_in, R_in, gamma_W)


def backward_pre(q, log_decay, do, spans: RankSpans, causal: bool) -> Tensor:
    """This rank's payload for the backward all-gather: dM_t (and dN_t), flattened."""
    q = q.detach()
    log_decay = None if log_decay is None else log_decay.detach()
    dM, dN = output_state_grads(q, log_decay, do, spans, causal)
    return dM.reshape(-1) if dN is None else torch.cat([dM.reshape(-1), dN.reshape(-1)])


def backward_post(leaves, states, dMN_W, saved, spans: RankSpans, causal: bool):
    """Gradients through this rank's outgoing states (E, F, g), from everyone's dM/dN."""
    S_in, R_in, gamma_W = saved
    W, n = spans.num_ranks, S_in.numel()
    dM_W = dMN_W[:, :n].reshape(W, *S_in.shape)
    dN_W = None if causal else dMN_W[:, n:].reshape(W, *S_in.shape)
    H_next, J_prev = scan_state_grads(dM_W, dN_W, gamma_W, spans)
    dE, dF, dg = state_input_grads(S_in, R_in, H_next, J_prev, gamma_W[spans.rank], spans)
    return grads_through(list(states), [dE, dF, dg], leaves)


def sum_grads(*grad_lists, like):
    """Elementwise sum of per-input gradient lists (None = no contribution), cast to the inputs' dtypes."""
    out = []
    for grads, x in zip(zip(*grad_lists), like):
        present = [g for g in grads if g is not None]
        out.append(None if not present or x is None else sum(present[1:], present[0]).to(x.dtype))
    return out


class _Lasp2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, spans, causal, chunk_size):
        leaves = leaf_inputs(q, k, v, log_decay)
        payload, states = forward_pre(leaves, spans, causal)
        payload_W, handle = comm.dist_all_gather(payload, group=group, async_op=True)
        o_intra = forward_intra(leaves, spans, causal, chunk_size)
        handle.wait()
        o, saved = forward_post(leaves, o_intra, payload_W, states, spans)
        # graphs, not just tensors, go to backward: kept as attributes, released with ctx
        ctx.leaves, ctx.states, ctx.o, ctx.saved = leaves, states, o, saved
        ctx.group, ctx.spans, ctx.causal = group, spans, causal
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        q, _, _, log_decay = ctx.leaves
        payload = backward_pre(q, log_decay, do, ctx.spans, ctx.causal)
        dMN_W, handle = comm.dist_all_gather(payload, group=ctx.group, async_op=True)
        # while dM travels: gradients through the local output
        local = grads_through([ctx.o], [do], ctx.leaves)
        handle.wait()
        remote = backward_post(ctx.leaves, ctx.states, dMN_W, ctx.saved, ctx.spans, ctx.causal)
        grads = sum_grads(local, remote, like=ctx.leaves)
        del ctx.leaves, ctx.states, ctx.o, ctx.saved
        return (*grads, None, None, None, None)


def lasp2_attention_in_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sp: SPContext,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """:func:`lasp2_attention` over the micro-batch's context ``sp`` (group, spans, documents);
    validates nothing and reads nothing back from the device: one all-gather forward, one backward."""
    if sp.num_ranks == 1:
        return local_attention(q, k, v, log_decay, sp.spans, causal, chunk_size)
    return _Lasp2Function.apply(q, k, v, log_decay, sp.group, sp.spans, causal, chunk_size)


def lasp2_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Group,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Linear attention over the ranks of ``group`` with LASP-2; inputs are this rank's shard.

    Args:
        q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]`` — tokens [rT, (r+1)T) of the sequence on
            group rank r (every rank holds the same T).
        group: the SP group (``comm.SOLO`` for a single rank).
        causal: causal or bidirectional.
        log_decay: None, ``[H]`` (fixed per head) or ``[B, T, H]`` (this rank's per-token gates), <= 0.
        cu_seqlens: document boundaries of the WHOLE packed sequence ``[0, ..., W*T]``, identical
            on every rank (B must be 1); states reset at each boundary.

    Returns ``[B, T, H, dv]``: this rank's shard of the output, equal to the single-device
    ``linear_attention`` of the whole sequence. Validates its inputs (host reads) and checks
    that the ranks agree (one all-gather of 12 int64), then runs :func:`lasp2_attention_in_context`.
    """
    sp = validated_linear_context(
        "lasp2_attention", q, k, v, group=group, causal=causal, log_decay=log_decay, cu_seqlens=cu_seqlens
    )
    return lasp2_attention_in_context(q, k, v, sp, causal=causal, log_decay=log_decay, chunk_size=chunk_size)


def __getattr__(name: str):
    # re-export of the delta-rule op (parallel/lasp2_delta.py), lazily: that module imports this one
    if name == "lasp2_delta_rule_attention":
        from parallel.lasp2_delta import lasp2_delta_rule_attention

        return lasp2_delta_rule_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
