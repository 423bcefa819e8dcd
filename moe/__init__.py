"""MoE layers, routers and balance losses: not implemented yet (see README, Status)."""
