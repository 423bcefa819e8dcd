"""MoELayer: router(s), balance loss, Chain-of-Experts iterations and DeepSpeed expert parallelism.

    layer = MoELayer(d_model=128, hidden=256, num_experts=8, top_k=2, router="gru",
                     balance="global", chain_iterations=1, ep_size=2)
    y_TD, state = layer(x_TD)            # y is the FFN output (the block adds the residual)
    loss = lm_loss + layer.aux_loss()    # standalone; a model shares one tracker over layers

The layer is a ``deepspeed.moe.layer.MoE`` so that DeepSpeed's engine treats it as one (expert
parameters reduced over the expert-data-parallel group, saved per expert, split into MoE
optimizer groups); what that takes of DeepSpeed's internals is in ``moe/deepspeed_adapter.py``.
Routing, balance and dispatch are ours.

Expert parameters are initialised from a generator seeded by (seed, layer, global expert id):
expert e gets the same weights whatever ``ep_size`` puts it on, which is what makes
``ep_size`` = 1, 2, 4 give identical models, and different EP ranks never start with
identical experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe.balance import BALANCE_MODES, BalanceTracker, inside_backward
from moe.chain import chain_of_experts
from moe.deepspeed_adapter import DeepSpeedMoEModule, expert_parallel_group
from moe.experts import EXPERT_COMPUTE, ExpertMLP, dispatch_combine
from moe.router import GRURouter, LinearRouter, Routing, make_gru_cell
from parallel.comm import Group, group_rank, group_size

__all__ = ["MoELayer", "expert_parallel_group", "validate_moe_options"]

ROUTERS = ("linear", "gru")


def validate_moe_options(
    *, num_experts: int, top_k: int, router: str, balance: str, chain_iterations: int, ep_size: int, router_dim: int
) -> None:
    """Raise ValueError naming the option and the fix for an impossible MoE setup."""
    if num_experts < 1 or top_k < 1:
        raise ValueError(f"num_experts={num_experts} and top_k={top_k} must be >= 1")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}: choose top_k <= num_experts")
    if router not in ROUTERS:
        raise ValueError(f"router={router!r}: allowed {', '.join(ROUTERS)}")
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance={balance!r}: allowed {', '.join(BALANCE_MODES)}")
    if chain_iterations < 1:
        raise ValueError(f"chain_iterations={chain_iterations} must be >= 1 (1 = plain MoE)")
    if chain_iterations > top_k or top_k % chain_iterations:
        raise ValueError(
            f"chain_iterations={chain_iterations} must divide top_k={top_k}: each iteration routes to "
            "top_k / chain_iterations experts (use top_k = chain_iterations × experts per iteration)"
        )
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
    if router == "gru" and router_dim < 1:
        raise ValueError(f"router_dim={router_dim} must be >= 1")


class MoELayer(DeepSpeedMoEModule):
    """Top-k MoE FFN with a linear or GRU router, micro/sequence/global balance, C-iteration
    Chain-of-Experts and dropless expert parallelism. See the module docstring."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        num_experts: int,
        top_k: int,
        router: str = "linear",
        router_dim: int = 128,
        gru_cell: nn.GRUCell | None = None,
        balance: str = "global",
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        chain_iterations: int = 1,
        chain_norm_topk_prob: bool = False,
        shared_expert: bool = False,
        ep_size: int = 1,
        expert_compute: str = "auto",
        ep_group: Group | None = None,
        balance_group: Group | None = None,
        tracker: BalanceTracker | None = None,
        layer_index: int = 0,
        seed: int = 0,
    ):
        validate_moe_options(
            num_experts=num_experts,
            top_k=top_k,
            router=router,
            balance=balance,
            chain_iterations=chain_iterations,
            ep_size=ep_size,
            router_dim=router_dim,
        )
        super().__init__(expert=ExpertMLP(d_model, hidden), num_experts=num_experts, ep_size=ep_size)

        if expert_compute not in EXPERT_COMPUTE:
            raise ValueError(f"expert_compute={expert_compute!r}: allowed {', '.join(EXPERT_COMPUTE)}")
        self.expert_compute = expert_compute
        self.top_k, self.chain_iterations = top_k, chain_iterations
        # plain MoE: route_topk's rule (renormalise k > 1); CoE: the reference's raw probs unless asked
        self.renormalize = None if chain_iterations == 1 else chain_norm_topk_prob
        self.k_per_iteration = top_k // chain_iterations
        self.layer_index, self.seed = layer_index, seed
        self.router_kind = router
        if router == "gru":
            if gru_cell is None:  # a standalone layer owns its cell; a model shares one over layers
                gru_cell = self.gru_cell = make_gru_cell(router_dim)
            self.routers = nn.ModuleList(GRURouter(d_model, num_experts, gru_cell) for _ in range(chain_iterations))
        else:
            self.routers = nn.ModuleList(LinearRouter(d_model, num_experts) for _ in range(chain_iterations))

        ep_group = expert_parallel_group(ep_size) if ep_group is None else ep_group
        if group_size(ep_group) != ep_size:
            raise ValueError(f"ep_group has {group_size(ep_group)} ranks but ep_size={ep_size}")
        self._ep_group = [ep_group]  # a list: process groups are not module state
        # 'shared_ffn', not 'shared_expert': DeepSpeed saves every key containing 'expert' per expert
        self.shared_ffn = ExpertMLP(d_model, hidden) if shared_expert else None

        self._owns_tracker = tracker is None
        if tracker is None:
            tracker = BalanceTracker(
                num_experts=num_experts,
                top_k=self.k_per_iteration,
                num_sites=chain_iterations,
                balance=balance,
                coef=balance_coef,
                z_loss_coef=z_loss_coef,
                group=balance_group,
            )
        elif tracker.num_sites < (layer_index + 1) * chain_iterations:
            raise ValueError(f"tracker has {tracker.num_sites} sites, layer {layer_index} needs its C sites too")
        self.tracker = tracker
        self.reset_parameters()

    @property
    def ep_group(self) -> Group:
        return self._ep_group[0]

    def global_expert_ids(self) -> list[int]:
        first = group_rank(self.ep_group) * self.num_local_experts
        return list(range(first, first + self.num_local_experts))

    def reset_parameters(self) -> None:
        """Routers and shared expert: N(0, 0.02) from the global RNG (identical on every rank
        that seeds alike). Experts: N(0, 0.02) from a generator per (seed, layer, global id)."""
        for module in [*self.routers, self.shared_ffn]:
            for param in module.parameters() if module is not None else []:
                nn.init.normal_(param, std=0.02)
        for expert, global_id in zip(self.local_experts, self.global_expert_ids(), strict=True):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.layer_index) * 10_007 + global_id)
            with torch.no_grad():
                for param in expert.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)

    def site(self, iteration: int) -> int:
        return self.layer_index * self.chain_iterations + iteration

    def _experts(self, x_TD: Tensor, routing: Routing) -> Tensor:
        return dispatch_combine(
            x_TD,
            routing.experts_TK,
            routing.weights_TK,
            local_experts=self.local_experts,
            num_experts=self.num_experts,
            ep_group=self.ep_group,
            expert_compute=self.expert_compute,
        )

    def forward(self, x: Tensor, router_state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x``: [T, D] or [B, T, D] (normalised) hidden states; returns the FFN output of the
        same shape and the router state for the next MoE layer (None for the linear router)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if self._owns_tracker and not inside_backward():
            self.tracker.begin_microbatch()  # standalone: every forward is a micro-batch
        y_TD, router_state = chain_of_experts(
            x_TD,
            routers=self.routers,
            k_per_iteration=self.k_per_iteration,
            experts=self._experts,
            shared=self.shared_ffn,
            record=lambda t, routing: self.tracker.record(self.site(t), routing),
            router_state=router_state,
            renormalize=self.renormalize,
        )
        return y_TD.view(shape), router_state

    def aux_loss(self) -> Tensor:
        """The balance (+ z) loss of the last forward, for a standalone layer."""
        return self.tracker.loss()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, router={self.router_kind}, "
            f"balance={self.tracker.balance}, chain_iterations={self.chain_iterations}, ep_size={self.ep_size}"
        )
