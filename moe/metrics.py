"""Routing metrics, cheap enough to log every step.

Per site (an MoE layer, or one Chain-of-Experts iteration of a layer), accumulated over the
micro-batches of a step and reduced over ranks in one all-reduce when summarised:

- tokens per expert, and MaxVio = (max − mean)/mean of those counts (0 = perfectly balanced);
- dead experts: experts no token chose;
- top-k score sum: mean over tokens of the summed probabilities of the chosen experts (higher
  means more confident routing; the global-LBL paper reports it rising with global balance);
- routing entropy: mean over tokens of the entropy of the full softmax (nats);
- per-domain selection frequency, when tokens carry domain labels: for each domain, the
  fraction of its tokens that chose each expert (a row sums to k). Specialised experts show up
  as large entries for one domain only.

Everything is accumulated detached, in float64, on the router tensors' device, with
``index_add_`` (no host read); ``summary()`` reads the reduced statistics back once. The
runtime's ``train_step`` folds them into its one reduction per step (``stats()`` /
``summarize()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.router import Routing
from parallel.comm import Group, dist_all_reduce

__all__ = ["RoutingMetrics", "max_violation"]


def max_violation(tokens_per_expert: Tensor) -> float:
    """(max − mean)/mean of a load vector; 0 when balanced or empty."""
    load = tokens_per_expert.double()
    mean = load.mean()
    return 0.0 if mean <= 0 else float((load.max() - mean) / mean)


class RoutingMetrics:
    """Accumulates routing statistics for ``num_sites`` sites; ``summary()`` reduces and resets."""

    def __init__(
        self,
        *,
        num_sites: int,
        num_experts: int,
        site_names: list[str] | None = None,
        domain_names: list[str] | tuple[str, ...] = (),
    ):
        self.num_sites, self.num_experts = num_sites, num_experts
        self.site_names = site_names or [f"site{s}" for s in range(num_sites)]
        if len(self.site_names) != num_sites:
            raise ValueError(f"RoutingMetrics: {len(self.site_names)} site names for {num_sites} sites")
        self.domain_names = list(domain_names)
        D, E = len(self.domain_names), num_experts
        # per site: counts[E], tokens, score_sum, entropy_sum, domain_counts[D*E], domain_tokens[D]
        self._width = E + 3 + D * E + D
        self._stats = torch.zeros(num_sites, self._width, dtype=torch.float64)

    def reset(self) -> None:
        self._stats.zero_()

    def observe(
        self, site: int, routing: Routing, domains_T: Tensor | None = None, weight_T: Tensor | None = None
    ) -> None:
        """Add one routing decision; ``weight_T`` (0 on padding) leaves tokens out."""
        E, D = self.num_experts, len(self.domain_names)
        experts_TK = routing.experts_TK.detach()
        probs_TE = routing.probs_TE.detach().double()
        device = experts_TK.device
        if self._stats.device != device:
            self._stats = self._stats.to(device)
        T, K = experts_TK.shape
        w_T = torch.ones(T, dtype=torch.float64, device=device) if weight_T is None else weight_T.double()
        row = self._stats[site]
        row[:E].index_add_(0, experts_TK.reshape(-1), w_T.repeat_interleave(K))
        row[E] += w_T.sum()
        row[E + 1] += (probs_TE.gather(1, experts_TK).sum(dim=1) * w_T).sum()
        row[E + 2] += (-(probs_TE * probs_TE.clamp(min=1e-30).log()).sum(dim=1) * w_T).sum()
        if D and domains_T is not None:
            domains_T = domains_T.detach().long()
            if domains_T.shape[0] != T:
                raise ValueError(f"domain labels for {domains_T.shape[0]} tokens, routing for {T}")
            # a host read, so only for host labels: the runtime checks its labels on the host
            if domains_T.device.type == "cpu" and domains_T.numel() and not 0 <= domains_T.min() <= domains_T.max() < D:
                raise ValueError(f"domain labels must lie in [0, {D}) ({', '.join(self.domain_names)})")
            pair = (domains_T[:, None] * E + experts_TK).reshape(-1)
            row[E + 3 : E + 3 + D * E].index_add_(0, pair, w_T.repeat_interleave(K))
            row[E + 3 + D * E :].index_add_(0, domains_T, w_T)

    def stats(self) -> Tensor:
        """The [sites, width] float64 statistics since the last reset, on the routing device."""
        return self._stats

    def summary(self, group: Group | None = None) -> dict:
        """JSON-ready metrics over all ranks of ``group`` (one all-reduce), then reset."""
        stats = self._stats.clone()
        if group is not None:
            dist_all_reduce(stats, group=group)
        return self.summarize(stats)

    def summarize(self, stats: Tensor) -> dict:
        """JSON-ready metrics of already-reduced ``stats`` (one host read); resets."""
        stats = stats.detach().to("cpu", copy=True)  # a copy: ``stats`` may be ours, reset below
        self.reset()
        E, D = self.num_experts, len(self.domain_names)
        sites = []
        for s, name in enumerate(self.site_names):
            row = stats[s]
            counts, tokens = row[:E], float(row[E])
            entry = {
                "site": name,
                "tokens": int(tokens),
                "tokens_per_expert": [int(c) for c in counts],
                "max_vio": max_violation(counts),
                "dead_experts": int((counts == 0).sum()) if tokens else 0,
                "topk_score_sum": float(row[E + 1]) / tokens if tokens else 0.0,
                "entropy": float(row[E + 2]) / tokens if tokens else 0.0,
            }
            if D:
                domain_counts = row[E + 3 : E + 3 + D * E].view(D, E)
                domain_tokens = row[E + 3 + D * E :]
                entry["domain_frequency"] = {
                    name: (domain_counts[d] / domain_tokens[d]).tolist()
                    for d, name in enumerate(self.domain_names)
                    if domain_tokens[d] > 0
                }
            sites.append(entry)
        active = [e for e in sites if e["tokens"]]
        return {
            "max_vio": sum(e["max_vio"] for e in active) / len(active) if active else 0.0,
            "dead_experts": sum(e["dead_experts"] for e in active),
            "topk_score_sum": sum(e["topk_score_sum"] for e in active) / len(active) if active else 0.0,
            "entropy": sum(e["entropy"] for e in active) / len(active) if active else 0.0,
            "sites": sites,
        }
