"""LASP-2H: sequence-parallel softmax attention by an all-gather of K and V.

Layout: tensors are ``[B, T, H, D]``; in an SP group of W ranks, group rank r holds tokens
``[r*T, (r+1)*T)`` of the packed sequence (every rank the same T). k and v may have fewer heads
than q (GQA): query head h uses k/v head ``h // (H_q / H_kv)``, as torch SDPA's ``enable_gqa``.

Maths, for the local queries Q_r of rank r and the gathered K, V of all N = W*T tokens::

    O_r = softmax(scale * Q_r K^T + M_r) V,      scale = 1/sqrt(D) by default
    M_r[i, j] = 0 if key j is visible to the query at global position p = r*T + i, else -inf
    visible(p, j) = doc(j) == doc(p) and (j <= p if causal)

so the causal mask is aligned bottom-right (torch SDPA's ``is_causal`` aligns top-left when the
query and key lengths differ, hence the explicit mask). ``doc`` comes from ``cu_seqlens``, the
boundaries of the documents packed into the whole sequence. Only the keys a query block can see
are used: ``[start of the first query's document, end of the visible range)``. A query always
sees its own key, so no softmax row is empty, causal or not.

Backward: dQ_r is local; each rank's K, V gradient covers all N tokens, and the owner of a
token needs the sum over ranks, so the dual of the all-gather is a reduce-scatter of [dK, dV]
(``comm.all_gather``'s autograd backward).

Communication per rank and call, with n = B*T*H_kv*(D + D_v)*elem_bytes the local K/V bytes
(k and v travel as one concatenated tensor):

* forward all-gather of K|V: (W-1)*n sent and (W-1)*n received;
* backward reduce-scatter of dK|dV: (W-1)*n sent and (W-1)*n received;
* the public ``allgather_attention`` only: a forward agreement check, an all-gather of 12 int64
  (a validity flag and a fingerprint of the shapes, dtype, causal, scale and cu_seqlens),
  (W-1)*96 bytes each way. Every rank raises the same ValueError when any rank's inputs are
  invalid or the ranks disagree, so a bad input can never leave the other ranks waiting in the
  K/V gather. Its shared pieces live in parallel/sp_context.py.
* ``allgather_attention_in_context`` (the runtime's path) takes the micro-batch's ``SPContext``,
  whose one agreement check covers the whole model: no check per layer and no host read.

Local compute: ``parallel.doc_attention`` attends each document separately (work ∝ Σ_docs local
document tokens × visible keys; flash-attn varlen, flex_attention or SDPA per document). The
former path, one boolean mask over the visible key window ((H_q/H_kv)*T*window bytes), stays as
``packed_attention(..., method="dense")``.
Memory: the gathered K/V buffer holds W*n bytes (O(N)); K/V are never repeated for GQA.
Numerics: torch SDPA keeps the softmax in fp32 for bf16/fp16 inputs (fused kernels accumulate
in fp32; the math backend upcasts unless ``allow_fp16_bf16_reduction_math_sdp`` is set).
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel import comm
from parallel.comm import Group
from parallel.doc_attention import doc_attention
from parallel.sp_context import (
    SPContext,
    check_group_agreement,
    check_shards_agree,
    shard_fingerprint,
    validate_packed_cu_seqlens,
)

__all__ = [
    "allgather_attention",
    "allgather_attention_in_context",
    "allgather_attention_local",
    "check_group_agreement",
    "check_shards_agree",
    "dense_packed_attention",
    "packed_attention",
    "shard_fingerprint",
    "validate_attention_shards",
    "validate_packed_cu_seqlens",
]


# ----------------------------------------------------------------------------- validation


def _check_tensors(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be rank-4 [batch, tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the same dtype as q: q is {q.dtype}, {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q: q is on {q.device}, {name} on {t.device}")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, *, same_tokens: bool) -> None:
    """Batch, heads and head dims agree; with ``same_tokens`` k/v also hold q's token count."""
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have the same [batch, tokens, heads]: k has {tuple(k.shape[:3])}, v has {tuple(v.shape[:3])}"
        )
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have the same batch as q: q has {q.shape[0]}, k has {k.shape[0]}")
    if same_tokens and k.shape[1] != q.shape[1]:
        raise ValueError(f"k/v must have the same local tokens as q: q has {q.shape[1]}, k has {k.shape[1]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the same head dim as q: q has {q.shape[3]}, k has {k.shape[3]}")
    if q.shape[1] == 0:
        raise ValueError(f"q must hold at least one token, got shape {tuple(q.shape)}")
    num_q_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q heads ({num_q_heads}) must be a multiple of k/v heads ({num_kv_heads}) for grouped-query attention"
        )


def _resolve_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def validate_attention_shards(
    q: object, k: object, v: object, *, group_size: int, cu_seqlens: object, scale: object
) -> tuple[list[int] | None, float]:
    """Rank-local checks of one shard; returns (document boundaries as ints or None, scale)."""
    _check_tensors(q, k, v)
    _check_shapes(q, k, v, same_tokens=True)
    bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q.shape[0], total_tokens=group_size * q.shape[1])
    return bounds, _resolve_scale(scale, q.shape[3])


# ----------------------------------------------------------------------------- local compute


def _key_window(q_offset: int, T: int, S: int, causal: bool, bounds: list[int] | None) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that the queries at ``[q_offset, q_offset + T)`` may see."""
    first, last = q_offset, q_offset + T - 1
    lo, hi = 0, (last + 1 if causal else S)
    if bounds is not None:
        lo = bounds[bisect.bisect_right(bounds, first) - 1]
        if not causal:
            hi = bounds[bisect.bisect_right(bounds, last)]
    return lo, hi


def _window_mask(
    q_offset: int, T: int, lo: int, hi: int, *, causal: bool, bounds: list[int] | None, device: torch.device
) -> Tensor | None:
    """``[T, hi - lo]`` bool, True where a query sees a key; None when it sees all of them."""
    cuts = [] if bounds is None else [b for b in bounds[1:-1] if lo < b < hi]
    if not causal and not cuts:
        return None
    q_pos_T = torch.arange(q_offset, q_offset + T, device=device)
    k_pos_S = torch.arange(lo, hi, device=device)
    if causal:
        visible_TS = k_pos_S[None, :] <= q_pos_T[:, None]
    else:
        visible_TS = torch.ones(T, hi - lo, dtype=torch.bool, device=device)
    if cuts:
        # document index = number of interior boundaries at or before the position
        cuts_C = torch.tensor(cuts, dtype=torch.long, device=device)
        q_doc_T = torch.bucketize(q_pos_T, cuts_C, right=True)
        k_doc_S = torch.bucketize(k_pos_S, cuts_C, right=True)
        visible_TS = visible_TS & (q_doc_T[:, None] == k_doc_S[None, :])
    return visible_TS


def _grouped_sdpa(q_BTHD: Tensor, k_BSKD: Tensor, v_BSKE: Tensor, mask_TS: Tensor | None, scale: float) -> Tensor:
    B, T, H, D = q_BTHD.shape
    K, E = k_BSKD.shape[2], v_BSKE.shape[3]
    G = H // K
    # the G query heads that share a k/v head are folded into the query axis, so k/v are never
    # repeated in memory (and this needs no enable_gqa, which torch < 2.5 lacks)
    q_BKLD = q_BTHD.permute(0, 2, 1, 3).reshape(B, K, G * T, D)
    mask_LS = None if mask_TS is None else mask_TS.repeat(G, 1)
    o_BKLE = F.scaled_dot_product_attention(
        q_BKLD, k_BSKD.transpose(1, 2), v_BSKE.transpose(1, 2), attn_mask=mask_LS, scale=scale
    )
    return o_BKLE.reshape(B, H, T, E).transpose(1, 2).contiguous()


def packed_attention(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKE: Tensor,
    *,
    q_offset: int,
    causal: bool,
    bounds: list[int] | None,
    scale: float,
    method: str = "auto",
) -> Tensor:
    """Attention of T queries at global positions ``[q_offset, q_offset + T)`` over all S keys,
    with checked arguments (``bounds``: document boundaries as ints). Returns ``[B, T, H, E]``.

    ``method``: a ``parallel.doc_attention`` backend (``"auto"``: per document, work ∝ Σ_docs
    local doc tokens × visible keys), or ``"dense"``: one mask over the whole visible key window
    (the former path, kept as the reference and for benchmarks)."""
    if method != "dense":
        return doc_attention(
            q_BTHD, k_BSKD, v_BSKE, q_offset=q_offset, causal=causal, bounds=bounds, scale=scale, backend=method
        )
    return dense_packed_attention(q_BTHD, k_BSKD, v_BSKE, q_offset=q_offset, causal=causal, bounds=bounds, scale=scale)


def dense_packed_attention(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKE: Tensor,
    *,
    q_offset: int,
    causal: bool,
    bounds: list[int] | None,
    scale: float,
) -> Tensor:
    """:func:`packed_attention` by one boolean mask over the visible key window (work ∝ T × window)."""
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    lo, hi = _key_window(q_offset, T, S, causal, bounds)
    mask_TS = _window_mask(q_offset, T, lo, hi, causal=causal, bounds=bounds, device=q_BTHD.device)
    return _grouped_sdpa(q_BTHD, k_BSKD[:, lo:hi], v_BSKE[:, lo:hi], mask_TS, scale)


def allgather_attention_local(
    q_local: Tensor,
    k_full: Tensor,
    v_full: Tensor,
    *,
    q_offset: int,
    causal: bool = True,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """One rank's LASP-2H compute once K/V are gathered: ``q_local`` ``[B, T, H_q, D]`` at global
    positions ``[q_offset, q_offset + T)``, ``k_full``/``v_full`` ``[B, S, H_kv, D | D_v]`` of the
    whole sequence, ``cu_seqlens`` its document boundaries ``[0, ..., S]``. Returns ``[B, T, H_q, D_v]``."""
    _check_tensors(q_local, k_full, v_full)
    _check_shapes(q_local, k_full, v_full, same_tokens=False)
    T, S = q_local.shape[1], k_full.shape[1]
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or not 0 <= q_offset <= S - T:
        raise ValueError(f"q_offset must be an int in [0, {S - T}] (k/v tokens {S} - q tokens {T}), got {q_offset!r}")
    bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q_local.shape[0], total_tokens=S)
    scale = _resolve_scale(scale, q_local.shape[3])
    return packed_attention(q_local, k_full, v_full, q_offset=q_offset, causal=causal, bounds=bounds, scale=scale)


# ----------------------------------------------------------------------------- the SP op


def allgather_attention_in_context(
    q: Tensor, k: Tensor, v: Tensor, sp: SPContext, *, causal: bool = True, scale: float | None = None
) -> Tensor:
    """:func:`allgather_attention` over the micro-batch's context ``sp`` (group, host document
    bounds, this shard's offset); validates nothing and reads nothing back from the device: one
    all-gather of K|V forward, its reduce-scatter backward."""
    scale_value = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    if sp.num_ranks == 1:
        k_full, v_full = k, v
    else:
        kv_full = comm.all_gather(torch.cat([k, v], dim=3), group=sp.group, dim=1)
        k_full, v_full = kv_full.split([k.shape[3], v.shape[3]], dim=3)
    return packed_attention(
        q, k_full, v_full, q_offset=sp.offset, causal=causal, bounds=sp.bounds_list, scale=scale_value
    )


def allgather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Group,
    causal: bool = True,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """LASP-2H softmax attention over the ranks of ``group`` (DESIGN.md public API).

    q ``[B, T, H_q, D]``, k ``[B, T, H_kv, D]``, v ``[B, T, H_kv, D_v]`` are this rank's shard;
    ``cu_seqlens`` (batch 1) describes the whole packed sequence ``[0, ..., W*T]`` and must be
    identical on every rank. Returns this rank's output ``[B, T, H_q, D_v]``; gradients of k and
    v reach their owners by a reduce-scatter.
    """
    size = comm.group_size(group)
    problem, bounds, scale_value = None, None, 0.0
    try:
        bounds, scale_value = validate_attention_shards(q, k, v, group_size=size, cu_seqlens=cu_seqlens, scale=scale)
    except ValueError as exc:
        problem = f"allgather_attention: {exc}"
    check_shards_agree(
        "allgather_attention",
        q,
        k,
        v,
        causal=causal,
        bounds=bounds,
        extra=("scale", scale_value),
        problem=problem,
        group=group,
    )
    sp = SPContext.build(group, local_len=q.shape[1], bounds=bounds, device=q.device)
    return allgather_attention_in_context(q, k, v, sp, causal=causal, scale=scale_value)
