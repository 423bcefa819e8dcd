"""Routers: which experts each token goes to, and with what weight.

Two routers share one top-k step:

- ``LinearRouter``: logits = W x (the usual softmax gate).
- ``GRURouter`` (RMoE, Qiu et al. 2025): x' = P_l x (a per-layer projection to p dims), h_l =
  GRU(x', h_{l-1}) with **one GRU cell shared by all MoE layers**, logits = G_l h_l. The state h
  starts at zero at the first MoE layer and is carried to the next with its gradient: the
  paper's ablation shows that detaching it is worse than no recurrence at all.

Router maths runs in fp32 whatever the model's dtype: a bf16 softmax over experts shifts the
top-k choice of near-tied tokens and the balance loss with it.

Shapes: T tokens, D model width, E experts, K experts per token, P GRU state width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GRURouter", "LinearRouter", "Routing", "at_least_fp32", "route_topk"]


def at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (reference computations)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class Routing:
    """One routing decision for T tokens."""

    logits_TE: Tensor
    """fp32 router logits (the z-loss is computed on them)."""
    probs_TE: Tensor
    """fp32 softmax over all experts (the balance loss's P term; carries the gradient)."""
    experts_TK: Tensor
    """int64 chosen experts, best first."""
    weights_TK: Tensor
    """fp32 combine weights of the chosen experts."""

    @property
    def top_k(self) -> int:
        return self.experts_TK.shape[1]


def route_topk(logits_TE: Tensor, k: int, *, renormalize: bool | None = None) -> Routing:
    """Softmax over all experts, keep the top ``k``.

    ``renormalize`` (default: when k > 1) rescales the kept probabilities to sum to one (Mixtral
    style). With k = 1 that would make every weight exactly 1 and cut the router off from the
    language-model gradient, so top-1 keeps the raw probability (Switch style)."""
    num_experts = logits_TE.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"route_topk: k={k} must be between 1 and the number of experts ({num_experts})")
    logits_TE = at_least_fp32(logits_TE)
    probs_TE = logits_TE.softmax(dim=-1)
    top_p_TK, experts_TK = probs_TE.topk(k, dim=-1)
    if renormalize is None:
        renormalize = k > 1
    weights_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True) if renormalize else top_p_TK
    return Routing(logits_TE, probs_TE, experts_TK, weights_TK)


class LinearRouter(nn.Module):
    """logits = W x; stateless (passes the router state through untouched)."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x_TD: Tensor, state_TP: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return F.linear(at_least_fp32(x_TD), at_least_fp32(self.gate.weight)), state_TP


class GRURouter(nn.Module):
    """RMoE's layerwise recurrent router: a per-layer projection and gate around a GRU cell
    that all MoE layers share.

    The shared cell is passed in and is *not* registered as a submodule here: the model owns it
    once (one set of parameters in state dicts and optimizers), every layer holds a reference.
    """

    def __init__(self, d_model: int, num_experts: int, cell: nn.GRUCell):
        super().__init__()
        p = cell.hidden_size
        if cell.input_size != p:
            raise ValueError(f"GRURouter: the shared GRU cell must map {p} -> {p}, got input_size={cell.input_size}")
        self.proj = nn.Linear(d_model, p, bias=False)
        self.gate = nn.Linear(p, num_experts, bias=False)
        self._cell = [cell]  # a list hides it from nn.Module registration (see the class docstring)

    @property
    def cell(self) -> nn.GRUCell:
        return self._cell[0]

    def forward(self, x_TD: Tensor, state_TP: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cell = self.cell
        x_TP = self.proj(x_TD)
        if state_TP is None:
            state_TP = x_TP.new_zeros(x_TP.shape[0], cell.hidden_size)
        if state_TP.shape != x_TP.shape:
            raise ValueError(
                f"GRURouter: router state has shape {tuple(state_TP.shape)}, expected {tuple(x_TP.shape)} "
                "(the previous MoE layer must have seen the same tokens)"
            )
        state_TP = cell(x_TP, state_TP)
        return F.linear(at_least_fp32(state_TP), at_least_fp32(self.gate.weight)), state_TP


def make_gru_cell(router_dim: int) -> nn.GRUCell:
    """The GRU cell all layers of one model share, initialised like RMoE (every parameter,
    biases included, N(0, 0.02))."""
    cell = nn.GRUCell(router_dim, router_dim)
    for param in cell.parameters():
        nn.init.normal_(param, std=0.02)
    return cell
