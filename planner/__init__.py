"""Per-step SP planning by linear programming: not implemented yet (see README, Status)."""
