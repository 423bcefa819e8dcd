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
   combine them with the router weights (index_add onto the token rows). "grouped" compute runs
   all local experts in one grouped GEMM per projection (``torch._grouped_mm``, else a padded
   ``bmm``) over weights stacked per call; "loop" runs them one by one (the reference).

Every rank issues the same two collectives per call (one for counts, one each way for rows), a
rank with no tokens included.

Shapes: T tokens, D width, K choices per token, N = T·K routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.comm import Group, all_to_all_single, dist_all_to_all, group_size

__all__ = ["EXPERT_COMPUTE", "ExpertMLP", "dispatch_combine", "expert_group_name", "grouped_linear", "run_experts"]


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


# "auto": grouped on CUDA (one kernel per projection instead of E), the loop on CPU, where
# torch._grouped_mm runs the same per-expert GEMMs and the whole-batch activations of the
# grouped path fall out of cache (measured 0.8-0.95x the loop's tokens/s: benchmarks/RESULTS.md)
EXPERT_COMPUTE = ("auto", "grouped", "loop")


def _run_experts(x_ND: Tensor, rows_per_expert: list[int], experts: nn.ModuleList) -> Tensor:
    """Expert j on its contiguous block of rows (an expert with no rows still runs on an empty
    block, so its parameters always get a (zero) gradient and every rank's graph is alike)."""
    blocks = torch.split(x_ND, rows_per_expert)
    return torch.cat([expert(block) for expert, block in zip(experts, blocks, strict=True)])


def _run_experts_grouped(x_ND: Tensor, rows_per_expert: list[int], experts: nn.ModuleList) -> Tensor:
    """The same maths as :func:`_run_experts` with one grouped GEMM per projection.

    The weights stay DeepSpeed's per-expert ``nn.Linear`` parameters (so its expert-data-parallel
    gradient reduction and per-expert checkpoint names are untouched); they are stacked into
    ``[E, out, in]`` per call, and autograd splits the stacked gradient back to each expert
    (an expert with no rows gets a zero gradient, as in the loop).
    """
    if not experts:
        return x_ND.new_zeros(0, x_ND.shape[1])
    w_up_EOI = torch.stack([e.up.weight for e in experts])
    w_down_EOI = torch.stack([e.down.weight for e in experts])
    gate_NH, up_NH = grouped_linear(x_ND, w_up_EOI, rows_per_expert).chunk(2, dim=-1)
    return grouped_linear(F.silu(gate_NH) * up_NH, w_down_EOI, rows_per_expert)


def run_experts(x_ND: Tensor, rows_per_expert: list[int], experts: nn.ModuleList, *, compute: str) -> Tensor:
    """Expert j on rows ``[sum(rows[:j]), sum(rows[:j+1]))``; ``compute`` one of EXPERT_COMPUTE."""
    if compute == "loop" or (compute == "auto" and x_ND.device.type != "cuda"):
        return _run_experts(x_ND, rows_per_expert, experts)
    return _run_experts_grouped(x_ND, rows_per_expert, experts)


def _grouped_mm_fits(x: Tensor, w: Tensor) -> bool:
    """Where ``torch._grouped_mm`` runs: CPU fp32/bf16/fp16; CUDA bf16 on sm90+ (torch's
    kernel), with 16-byte aligned rows (dims divisible by 8) and at least one row (its backward
    rejects empty inputs)."""
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0 or x.shape[1] % 8 or w.shape[1] % 8:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``_grouped_mm``'s
    backward rejects the stride-0 gradients that e.g. ``sum()`` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_linear(x_ND: Tensor, w_EOI: Tensor, rows_per_expert: list[int]) -> Tensor:
    """Rows of expert e times ``w_EOI[e].T``: ``torch._grouped_mm`` where it runs, else one
    ``bmm`` over the rows padded to the largest expert's count. Returns ``[N, O]``."""
    if _grouped_mm_fits(x_ND, w_EOI):
        ends = torch.tensor(rows_per_expert, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        y = torch._grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=ends.to(x_ND.device))
        return _ContiguousGrad.apply(y)
    E, M = w_EOI.shape[0], max(rows_per_expert)
    # slot of each row in the padded [E, M] layout, from the host counts (no device read)
    slots_N = torch.cat([e * M + torch.arange(c) for e, c in enumerate(rows_per_expert)]).to(x_ND.device)
    x_EMI = x_ND.new_zeros(E * M, x_ND.shape[1]).index_copy(0, slots_N, x_ND).view(E, M, x_ND.shape[1])
    y_EMO = torch.bmm(x_EMI, w_EOI.transpose(1, 2))
    return y_EMO.reshape(E * M, w_EOI.shape[1])[slots_N]


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
    expert_compute: str = "auto",
) -> Tensor:
    """Σ_k weight_tk · expert_{e_tk}(x_t) for every local token, experts spread over ``ep_group``;
    ``expert_compute``: "grouped" (one grouped GEMM per projection), "loop" (the reference) or
    "auto" (grouped on CUDA, loop elsewhere)."""
    if expert_compute not in EXPERT_COMPUTE:
        raise ValueError(f"expert_compute={expert_compute!r}: allowed {', '.join(EXPERT_COMPUTE)}")
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
        y_ND = run_experts(x_ND, counts_E.tolist(), local_experts, compute=expert_compute)
    else:
        send_WJ = counts_E.view(W, -1)
        recv_WJ = dist_all_to_all(send_WJ, group=ep_group)  # recv_WJ[w, j]: rows rank w sends to my expert j
        send_splits, recv_splits = send_WJ.sum(1).tolist(), recv_WJ.sum(1).tolist()
        x_recv = all_to_all_single(x_ND, group=ep_group, output_split_sizes=recv_splits, input_split_sizes=send_splits)
        perm = _source_major_to_expert_major(recv_WJ).to(x_TD.device)
        y_local = run_experts(x_recv[perm], recv_WJ.sum(0).tolist(), local_experts, compute=expert_compute)
        y_recv = y_local[torch.argsort(perm)]
        y_ND = all_to_all_single(y_recv, group=ep_group, output_split_sizes=send_splits, input_split_sizes=recv_splits)
    w_N = weights_TK.reshape(-1)[order_N].to(y_ND.dtype)
    # under autocast the experts return bf16 while x (the residual stream) stays fp32: combine in x's dtype
    return x_TD.new_zeros(T, D).index_add(0, token_N, (y_ND * w_N[:, None]).to(x_TD.dtype))
