"""A cost model from its spec: a preset name or the path of a JSON file (``CostModel.to_json``).

Shared by the dry run (``seqmoe plan``) and the training run (``planner.cost_model``), which turn
``CostSpecError`` into their own one-line errors.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from planner.cost import CostModel

__all__ = ["CostSpecError", "resolve_cost"]


class CostSpecError(ValueError):
    """The spec names no preset or readable cost-model file; the message says the fix."""


def resolve_cost(spec: str, num_ranks: int) -> CostModel:
    """A preset is built for ``num_ranks``: ZeRO shards the model states over all ranks, so the
    memory left for activations depends on it. A JSON file is taken as it is."""
    presets = list(CostModel.presets())
    if spec in presets:
        try:
            return CostModel.preset(spec, world_size=num_ranks)
        except ValueError as exc:
            raise CostSpecError(f"cost-model preset {spec!r} on {num_ranks} ranks: {exc}; use more ranks") from None
    path = Path(spec)
    if path.is_file():
        try:
            return CostModel.from_json(path)
        except ValueError as exc:
            raise CostSpecError(f"{path} is not a valid cost model ({exc}); write one with CostModel.to_json") from None
    if spec.endswith(".json") or os.sep in spec:
        raise CostSpecError(f"cost-model file {spec!r} does not exist; pass an existing JSON file or a preset")
    close = difflib.get_close_matches(spec, presets, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CostSpecError(
        f"unknown cost-model preset {spec!r}; {hint}presets: {', '.join(presets)}, "
        "or pass the path of a JSON cost model (CostModel.to_json)"
    )
