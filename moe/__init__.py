"""Mixture-of-Experts: routers (linear, GRU recurrent), balance losses (micro, sequence,
global-batch), Chain-of-Experts and a dropless MoE layer over DeepSpeed expert parallelism.

The names below load on first use, so ``moe.config`` (read by ``seqmoe config``) can be imported
without importing torch and DeepSpeed.
"""

import importlib

_EXPORTS = {
    "BalanceTracker": "moe.balance",
    "SequenceLayout": "moe.balance",
    "load_balancing_loss": "moe.balance",
    "sequence_load_balancing_loss": "moe.balance",
    "z_loss": "moe.balance",
    "MoELayer": "moe.layer",
    "expert_parallel_group": "moe.layer",
    "RoutingMetrics": "moe.metrics",
    "GRURouter": "moe.router",
    "LinearRouter": "moe.router",
    "Routing": "moe.router",
    "route_topk": "moe.router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
