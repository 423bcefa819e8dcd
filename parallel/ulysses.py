"""DeepSpeed-Ulysses: sequence parallelism by all-to-all, the baseline for LASP-2 / LASP-2H.

Layout: tensors are ``[B, T, H, D]``; group rank r of W holds tokens ``[r*T, (r+1)*T)`` of the
packed sequence of N = W*T tokens. An all-to-all turns the sequence shard of all heads into the
whole sequence of H/W heads (rank r gets heads ``[r*H/W, (r+1)*H/W)``), every rank runs the
single-device kernel on its heads, and the inverse all-to-all brings the output back::

    [B, T, H, D] --all-to-all--> [B, N, H/W, D] --attention--> [B, N, H/W, D_v] --all-to-all--> [B, T, H, D_v]

Heads are independent in both softmax and linear attention, so this is exact; the backward of
each all-to-all is the inverse all-to-all. Masks (causal, documents from ``cu_seqlens``) are
those of the whole sequence, with no offsets.

GQA (softmax only): H_q must divide by W. If H_kv does not, each k/v head is repeated
``lcm(H_kv, W) / H_kv`` times (consecutively, so query head h still uses original k/v head
``h // (H_q / H_kv)``): the fewest copies that make the k/v heads split evenly and stay a
divisor of H_q. The gradients of the copies are summed back by autograd.

Communication per rank, per all-to-all of a local tensor of n bytes: (W-1)/W*n sent and
(W-1)/W*n received (the 1/W addressed to itself stays local). Forward moves q, k, v (k and v
with H_kv' = lcm(H_kv, W) heads when repeated) and o; backward moves their gradients, the same
volumes. So with e bytes per element::

    softmax: 2 * (W-1)/W * B*T*e * (H_q*D + H_kv'*D + H_kv'*D_v + H_q*D_v)   sent (and received)
    linear:  2 * (W-1)/W * B*T*e * H * (2*D_k + 2*D_v), plus 2 * (W-1)/W * B*T*H*e for a
             per-token log_decay that needs a gradient (once forward only if it does not);
             a per-head log_decay [H] is replicated and only sliced: no bytes.

plus, in the public functions only, the agreement check of ``parallel.sp_context`` (an
all-gather of 12 int64 per rank, (W-1)*96 bytes each way), which makes every rank raise the same
ValueError on a bad input. The ``*_in_context`` entries (the runtime's path) take the
micro-batch's ``SPContext`` instead, whose one agreement check covers the whole model: no check
per layer and no host read.
"""

from __future__ import annotations

import math

from torch import Tensor

from parallel import comm
from parallel.comm import Group
from parallel.linear_attention import chunk_linear_attention, validate_linear_attention_inputs
from parallel.softmax_sp import packed_attention, validate_attention_shards
from parallel.sp_context import SPContext, check_shards_agree, validate_packed_cu_seqlens

__all__ = [
    "kv_head_repeats",
    "ulysses_attention",
    "ulysses_attention_in_context",
    "ulysses_linear_attention",
    "ulysses_linear_attention_in_context",
]


def kv_head_repeats(num_q_heads: int, num_kv_heads: int, group_size: int) -> int:
    """How often each k/v head is repeated so that k/v heads split evenly over ``group_size`` ranks."""
    if num_q_heads % group_size:
        raise ValueError(
            f"Ulysses splits heads over the group: q has {num_q_heads} heads, which the group size {group_size} "
            "does not divide"
        )
    return math.lcm(num_kv_heads, group_size) // num_kv_heads


def _check_linear_heads(num_heads: int, group_size: int) -> None:
    if num_heads % group_size:
        raise ValueError(
            f"Ulysses splits heads over the group: q/k/v have {num_heads} heads, which the group size {group_size} "
            "does not divide"
        )


def _seq_to_heads(x_BTH_: Tensor, group: Group) -> Tensor:
    """``[B, T, H, ...]`` sequence shard -> ``[B, W*T, H/W, ...]`` head shard."""
    return comm.all_to_all(x_BTH_, group=group, scatter_dim=2, gather_dim=1)


def _heads_to_seq(x_BNH_: Tensor, group: Group) -> Tensor:
    """Inverse of :func:`_seq_to_heads`."""
    return comm.all_to_all(x_BNH_, group=group, scatter_dim=1, gather_dim=2)


def ulysses_attention_in_context(
    q: Tensor, k: Tensor, v: Tensor, sp: SPContext, *, causal: bool = True, scale: float | None = None
) -> Tensor:
    """:func:`ulysses_attention` over the micro-batch's context ``sp``; validates nothing and
    reads nothing back from the device (``kv_head_repeats`` still rejects indivisible heads)."""
    scale_value = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    repeats = kv_head_repeats(q.shape[2], k.shape[2], sp.num_ranks)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    q_h, k_h, v_h = (_seq_to_heads(t, sp.group) for t in (q, k, v))
    o_h = packed_attention(q_h, k_h, v_h, q_offset=0, causal=causal, bounds=sp.bounds_list, scale=scale_value)
    return _heads_to_seq(o_h, sp.group)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Group,
    causal: bool = True,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention over the ranks of ``group`` by Ulysses all-to-alls (DESIGN.md public API).

    Same arguments and result as :func:`parallel.softmax_sp.allgather_attention`; additionally
    H_q must divide by the group size (k/v heads are repeated when H_kv does not).
    """
    size = comm.group_size(group)
    problem, bounds, scale_value = None, None, 0.0
    try:
        bounds, scale_value = validate_attention_shards(q, k, v, group_size=size, cu_seqlens=cu_seqlens, scale=scale)
        kv_head_repeats(q.shape[2], k.shape[2], size)  # raises for heads the group cannot split
    except ValueError as exc:
        problem = f"ulysses_attention: {exc}"
    check_shards_agree(
        "ulysses_attention",
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
    return ulysses_attention_in_context(q, k, v, sp, causal=causal, scale=scale_value)


def _decay_kind(log_decay: Tensor | None) -> int:
    return 0 if log_decay is None else log_decay.dim()


def _decay_to_heads(log_decay: Tensor | None, group: Group) -> Tensor | None:
    """This rank's heads of the log-decay: a slice of a per-head ``[H]`` one (replicated on every
    rank, so its gradient here covers these heads only and sums over the group to the full one),
    an all-to-all of a per-token ``[B, T, H]`` one."""
    if log_decay is None or log_decay.dim() == 3:
        return None if log_decay is None else _seq_to_heads(log_decay, group)
    heads = log_decay.shape[0] // comm.group_size(group)
    start = comm.group_rank(group) * heads
    return log_decay[start : start + heads]


def ulysses_linear_attention_in_context(
    q: Tensor, k: Tensor, v: Tensor, sp: SPContext, *, causal: bool = True, log_decay: Tensor | None = None
) -> Tensor:
    """:func:`ulysses_linear_attention` over the micro-batch's context ``sp``; validates nothing
    and reads nothing back from the device."""
    _check_linear_heads(q.shape[2], sp.num_ranks)
    q_h, k_h, v_h = (_seq_to_heads(t, sp.group) for t in (q, k, v))
    o_h, _ = chunk_linear_attention(
        q_h,
        k_h,
        v_h,
        causal=causal,
        log_decay=_decay_to_heads(log_decay, sp.group),
        cu_seqlens=sp.cu_seqlens,
        check=False,
    )
    return _heads_to_seq(o_h, sp.group)


def ulysses_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Group,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Linear attention over the ranks of ``group`` by Ulysses all-to-alls.

    Same maths as :func:`parallel.linear_attention.linear_attention` on the whole packed
    sequence; q, k, v ``[B, T, H, D]`` are this rank's shard, ``log_decay`` is None, ``[H]``
    (identical on every rank) or this rank's ``[B, T, H]`` shard, ``cu_seqlens`` the whole
    sequence's boundaries ``[0, ..., W*T]``. H must divide by the group size.
    """
    size = comm.group_size(group)
    problem, bounds = None, None
    try:
        validate_linear_attention_inputs(q, k, v, log_decay=log_decay, cu_seqlens=None)
        bounds = validate_packed_cu_seqlens(cu_seqlens, batch=q.shape[0], total_tokens=size * q.shape[1])
        _check_linear_heads(q.shape[2], size)
    except ValueError as exc:
        problem = f"ulysses_linear_attention: {exc}"
    kind = _decay_kind(log_decay) if problem is None else 0
    check_shards_agree(
        "ulysses_linear_attention",
        q,
        k,
        v,
        causal=causal,
        bounds=bounds,
        extra=("log_decay kind", kind),
        problem=problem,
        group=group,
    )
    sp = SPContext.build(group, local_len=q.shape[1], bounds=bounds, device=q.device)
    return ulysses_linear_attention_in_context(q, k, v, sp, causal=causal, log_decay=log_decay)
