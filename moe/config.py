"""The ``[moe]`` config section: experts, routing, balance loss, Chain-of-Experts, expert parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from parallel.configbase import fail, positive

__all__ = ["MoEConfig"]


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    router: Literal["linear", "gru"] = "gru"
    router_dim: int = 128
    """GRU router hidden size (RMoE's p)."""
    balance: Literal["micro", "sequence", "global"] = "global"
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    chain_iterations: int = 1
    """1 = plain MoE; >= 2 = Chain-of-Experts with top_k / chain_iterations experts per iteration."""
    chain_norm_topk_prob: bool = False
    """Chain-of-Experts: renormalise each iteration's top-k probabilities to sum to one. false =
    the CoE reference (raw probabilities, norm_topk_prob=false); see moe/chain.py. Plain MoE
    (chain_iterations = 1) renormalises top-k > 1 either way."""
    shared_expert: bool = False
    ep_size: int = 1
    expert_compute: Literal["auto", "grouped", "loop"] = "auto"
    """grouped: one grouped GEMM per projection over the local experts; loop: one expert at a time
    (reference); auto: grouped on CUDA, loop on CPU (where it is faster)."""

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "router_dim", "chain_iterations", "ep_size"):
            positive(f"moe.{name}", getattr(self, name))
        if self.top_k > self.num_experts:
            fail("moe.top_k", self.top_k, f"must be <= moe.num_experts={self.num_experts}")
        if self.num_experts % self.ep_size:
            fail("moe.ep_size", self.ep_size, f"must divide moe.num_experts={self.num_experts}")
        if self.top_k % self.chain_iterations:
            fail(
                "moe.chain_iterations",
                self.chain_iterations,
                f"must divide moe.top_k={self.top_k} (each iteration routes to top_k / chain_iterations experts)",
            )
        for name in ("balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                fail(f"moe.{name}", getattr(self, name), "must be >= 0")
