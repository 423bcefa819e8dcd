"""Chain-of-Experts (Wang, Pan et al. 2025): C routed passes over one shared pool of experts.

    x⁽⁰⁾ = x
    x⁽ᵗ⁾ = Σᵢ g_{t,i}·Eᵢ(x⁽ᵗ⁻¹⁾) + shared(x⁽ᵗ⁻¹⁾) + x⁽ᵗ⁻¹⁾        t = 1..C   (inner residual)

Each iteration has its own router choosing top-(K/C) experts, so C iterations cost the expert
compute of one top-K layer; iteration t+1 routes on iteration t's combined output, which makes
every iteration a full route → dispatch → experts → combine round (C all-to-all pairs per layer
under expert parallelism, serialised). Each iteration is a balance "site" of its own: its own
loss term, counts, GA buffer and metrics.

**Residuals.** The reference code (ZihanWang314/CoE, ``CoeDecoderLayer``) applies the layer's
pre-norm once and returns LN(h) + Σₜ MoEₜ: the pre-norm residual h is dropped, for its C=1
baseline as well. We keep the transformer's pre-norm residual and the paper's inner residual:
the layer's FFN output is x⁽ᶜ⁾ − x⁽⁰⁾ = Σₜ MoEₜ, added to h by the block, so the block computes
h + Σₜ MoEₜ with x⁽⁰⁾ = RMSNorm(h). With C = 1 this is exactly a plain pre-norm MoE block
(tested), which is what a fair "CoE vs MoE" comparison needs.

**Top-k weights.** The reference (DeepSeek-V2-Lite's gate, ``norm_topk_prob=false``) weights each
iteration's K/C experts by their raw softmax probabilities; renormalising them to sum to one
(Mixtral style) changes the layer's output by ~15% at K/C = 2. ``renormalize=False`` (the
default, ``moe.chain_norm_topk_prob = false``) follows the reference; True renormalises. A plain
MoE layer (C = 1) keeps ``route_topk``'s own rule (renormalise when k > 1) either way.

With the GRU router, the recurrent state also runs through the iterations (layer l iteration t
hands its state to iteration t+1, the last iteration to layer l+1).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from moe.router import Routing, route_topk

__all__ = ["chain_of_experts"]


def chain_of_experts(
    x_TD: Tensor,
    *,
    routers: nn.ModuleList,
    k_per_iteration: int,
    experts: Callable[[Tensor, Routing], Tensor],
    shared: nn.Module | None,
    record: Callable[[int, Routing], None],
    router_state: Tensor | None = None,
    renormalize: bool | None = False,
) -> tuple[Tensor, Tensor | None]:
    """Σₜ MoEₜ(x⁽ᵗ⁻¹⁾) over ``len(routers)`` iterations, and the router state after the last.
    ``record(t, routing)`` hands each iteration's routing to the balance tracker.
    ``renormalize``: rescale each iteration's top-k weights to sum to one (False: the raw
    probabilities, as the CoE reference; None: ``route_topk``'s default, for plain MoE)."""
    x_t = x_TD
    total = None
    for t, router in enumerate(routers):
        logits_TE, router_state = router(x_t, router_state)
        routing = route_topk(logits_TE, k_per_iteration, renormalize=renormalize)
        record(t, routing)
        out = experts(x_t, routing)
        if shared is not None:
            out = out + shared(x_t)
        total = out if total is None else total + out
        if t + 1 < len(routers):
            x_t = x_t + out  # the inner residual
    return total, router_state
