"""Mixture-of-Experts: routers (linear, GRU recurrent), balance losses (micro, sequence,
global-batch), Chain-of-Experts and a dropless MoE layer over DeepSpeed expert parallelism."""

from moe.balance import BalanceTracker, SequenceLayout, load_balancing_loss, sequence_load_balancing_loss, z_loss
from moe.layer import MoELayer, expert_parallel_group
from moe.metrics import RoutingMetrics
from moe.router import GRURouter, LinearRouter, Routing, route_topk

__all__ = [
    "BalanceTracker",
    "GRURouter",
    "LinearRouter",
    "MoELayer",
    "Routing",
    "RoutingMetrics",
    "SequenceLayout",
    "expert_parallel_group",
    "load_balancing_loss",
    "route_topk",
    "sequence_load_balancing_loss",
    "z_loss",
]
