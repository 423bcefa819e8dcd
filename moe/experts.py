"""Experts and dropless expert-parallel dispatch.

The experts of one layer live in a DeepSpeed ``Experts`` container (its parameters are tagged
``allreduce=False`` with the ``ep_size_<n>`` group name, so DeepSpeed's engine reduces their
gradients over the expert-data-parallel group and checkpoints them per expert). With
``ep_size`` = W, global expert e lives on EP rank e // (E/W) as local expert e % (E/W).

Dispatch never drops a token and never depends on a rank-local capacity, because under per-step
SP groups ranks hold very different token counts (zero included):

1. sort this rank's (token, choice) pairs by expert;
2. all-to-all the per-expert counts (E integers) so each rank knows what it will receive;
3. all-to-all the token rows with those uneven split sizes (autograd: the backward is the
   inverse all-to-all);
4. run each local expert on its contiguous rows, send the results back the same way, and
   combine them with the router weights (index_add onto the token rows).

Every rank issues the same two collectives per call (one for counts, one each way for rows), a
rank with no tokens included.

Shapes: T tokens, D width, K choices per token, N = T·K routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.comm import Group, all_to_all_single, dist_all_to_all, group_size

__all__ = ["ExpertMLP", "dispatch_combine", "expert_group_name"]


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


class ExpertMLP(nn.Module):
    """One expert: a SwiGLU MLP (the model's dense FFN, at the expert's hidden size)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _run_experts(x_ND: Tensor, rows_per_expert: list[int], experts: nn.ModuleList) -> Tensor:
    """Expert j on its contiguous block of rows (an expert with no rows still runs on an empty
    block, so its parameters always get a (zero) gradient and every rank's graph is alike)."""
    blocks = torch.split(x_ND, rows_per_expert)
    return torch.cat([expert(block) for expert, block in zip(experts, blocks, strict=True)])


def _source_major_to_expert_major(recv_counts_WJ: Tensor) -> Tensor:
    """Rows arrive grouped by source rank, then by local expert; return the permutation that
    groups them by local expert, then by source rank."""
    W, J = recv_counts_WJ.shape
    counts = recv_counts_WJ.reshape(-1).tolist()
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    pieces = [
        torch.arange(starts[w * J + j], starts[w * J + j] + counts[w * J + j]) for j in range(J) for w in range(W)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def dispatch_combine(
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    *,
    local_experts: nn.ModuleList,
    num_experts: int,
    ep_group: Group,
) -> Tensor:
    """Σ_k weight_tk · expert_{e_tk}(x_t) for every local token, experts spread over ``ep_group``."""
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    W = group_size(ep_group)
    if num_experts % W or len(local_experts) != num_experts // W:
        raise ValueError(f"{len(local_experts)} local experts do not split {num_experts} experts over {W} EP ranks")
    flat_expert_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_expert_N, stable=True)
    token_N = order_N // K
    x_ND = x_TD[token_N]
    counts_E = torch.bincount(flat_expert_N, minlength=num_experts)
    if W == 1:
        y_ND = _run_experts(x_ND, counts_E.tolist(), local_experts)
    else:
        send_WJ = counts_E.view(W, -1)
        recv_WJ = dist_all_to_all(send_WJ, group=ep_group)  # recv_WJ[w, j]: rows rank w sends to my expert j
        send_splits, recv_splits = send_WJ.sum(1).tolist(), recv_WJ.sum(1).tolist()
        x_recv = all_to_all_single(x_ND, group=ep_group, output_split_sizes=recv_splits, input_split_sizes=send_splits)
        perm = _source_major_to_expert_major(recv_WJ).to(x_TD.device)
        y_local = _run_experts(x_recv[perm], recv_WJ.sum(0).tolist(), local_experts)
        y_recv = y_local[torch.argsort(perm)]
        y_ND = all_to_all_single(y_recv, group=ep_group, output_split_sizes=send_splits, input_split_sizes=recv_splits)
    w_N = weights_TK.reshape(-1)[order_N].to(y_ND.dtype)
    # under autocast the experts return bf16 while x (the residual stream) stays fp32: combine in x's dtype
    return x_TD.new_zeros(T, D).index_add(0, token_N, (y_ND * w_N[:, None]).to(x_TD.dtype))
