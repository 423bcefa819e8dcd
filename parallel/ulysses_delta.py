"""DeepSpeed-Ulysses for the gated delta rule: all-to-all from sequence shards to head shards,
the single-device chunk kernel on the whole sequence for H/W heads, and the inverse all-to-all.

Heads are independent in the delta rule, so this is exact; each all-to-all's backward is the
inverse all-to-all. H must divide by the group size. Volume per rank (elements, forward, each
way): (W-1)/W * B*T*H * (2*K + 2*V + 2) (q, k, v, o, beta and a per-token gate), the same for the
gradients in backward: linear in T, unlike LASP-2's or the scan's fixed-size states.
"""

from __future__ import annotations

from torch import Tensor

from parallel import comm
from parallel.delta_rule import DEFAULT_CHUNK_SIZE, chunk_delta_rule
from parallel.sp_context import SPContext

__all__ = ["ulysses_delta_rule_attention_in_context"]


def _seq_to_heads(x: Tensor, sp: SPContext) -> Tensor:
    """``[B, T, H, ...]`` sequence shard -> ``[B, W*T, H/W, ...]`` head shard."""
    return comm.all_to_all(x, group=sp.group, scatter_dim=2, gather_dim=1)


def _decay_to_heads(log_decay: Tensor | None, sp: SPContext) -> Tensor | None:
    """A per-token gate travels like the tokens; a per-head one ([H], replicated) is sliced."""
    if log_decay is None or log_decay.dim() == 3:
        return None if log_decay is None else _seq_to_heads(log_decay, sp)
    heads = log_decay.shape[0] // sp.num_ranks
    return log_decay[sp.rank * heads : (sp.rank + 1) * heads]


def ulysses_delta_rule_attention_in_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    sp: SPContext,
    *,
    log_decay: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """The gated delta rule over the micro-batch's context ``sp`` by Ulysses all-to-alls;
    validates nothing and reads nothing back from the device."""
    if q.shape[2] % sp.num_ranks:
        raise ValueError(
            f"Ulysses splits heads over the group: q/k/v have {q.shape[2]} heads, which the group size "
            f"{sp.num_ranks} does not divide; use parallel.linear_sp = 'lasp2' or 'scan'"
        )
    if sp.num_ranks == 1:
        heads = (q, k, v, beta)
    else:
        heads = tuple(_seq_to_heads(x, sp) for x in (q, k, v, beta))
    o_h, _ = chunk_delta_rule(
        *heads,
        log_decay=_decay_to_heads(log_decay, sp),
        cu_seqlens=sp.cu_seqlens,
        chunk_size=chunk_size,
        check=False,
    )
    if sp.num_ranks == 1:
        return o_h
    return comm.all_to_all(o_h, group=sp.group, scatter_dim=1, gather_dim=2)
