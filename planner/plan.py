"""StepPlan: what the planner hands the runtime for one training step (pure, JSON-serialisable data).

A plan is a list of micro-batches run one after another. In each, the ranks are tiled by SP
groups: power-of-two blocks of consecutive ranks whose start is a multiple of their size (the
buddy groups of ``parallel.context.buddy_group_ranks``), or, for a plan with
``group_sizes='any'``, blocks of consecutive ranks of any size (``ParallelContext.ensure_groups``
creates those); group ``j`` of micro-batch ``i`` runs the sequences ``seq_indices`` of the
global batch, packed, sharded over ``ranks``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from planner.cost import CostModel, is_power_of_two

__all__ = ["Group", "MicroBatch", "StepPlan"]


@dataclass(frozen=True)
class Group:
    """One SP group of one micro-batch: ``ranks`` (tuple) run ``seq_indices`` (list of ints)."""

    ranks: tuple[int, ...]
    seq_indices: list[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "seq_indices", [int(i) for i in self.seq_indices])

    def __hash__(self) -> int:
        return hash((self.ranks, tuple(self.seq_indices)))

    @property
    def degree(self) -> int:
        return len(self.ranks)


@dataclass
class MicroBatch:
    groups: list[Group]
    predicted_time_s: float | None = None
    """The cost model's makespan of this micro-batch (the slowest group)."""

    def group_of(self, rank: int) -> Group:
        """The group that ``rank`` belongs to in this micro-batch."""
        for group in self.groups:
            if rank in group.ranks:
                return group
        raise ValueError(f"rank {rank} is in no group of this micro-batch")


@dataclass
class StepPlan:
    microbatches: list[MicroBatch]
    num_ranks: int
    predicted_time_s: float
    """Σ over micro-batches of the slowest group's time under the cost model."""
    solver: str
    """Who made it: 'highs' or 'cbc' (MILP), 'greedy' (a MILP failed: best single degree per
    micro-batch), 'batch_adaptive' (the best single-degree plan beat the MILP's, or the
    baseline), 'static' (baseline)."""
    solve_time_s: float
    lower_bound_s: float | None = None
    """A time no plan of this batch can beat under the cost model (see planner.solver.lower_bound_s)."""
    dropped: list[int] = field(default_factory=list)
    """Indices of sequences left out because no group can hold them (max_len_policy='drop')."""
    group_sizes: str = "pow2"
    """'pow2': every group is a buddy block; 'any': contiguous blocks of any size."""

    @property
    def gap_to_lower_bound(self) -> float | None:
        """predicted / lower bound − 1: how far the plan can be from the best possible (None without a bound)."""
        if not self.lower_bound_s:
            return None
        return self.predicted_time_s / self.lower_bound_s - 1

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_ranks": self.num_ranks,
            "predicted_time_s": self.predicted_time_s,
            "solver": self.solver,
            "solve_time_s": self.solve_time_s,
            "lower_bound_s": self.lower_bound_s,
            "dropped": list(self.dropped),
            "group_sizes": self.group_sizes,
            "microbatches": [
                {
                    "predicted_time_s": mb.predicted_time_s,
                    "groups": [{"ranks": list(g.ranks), "seq_indices": list(g.seq_indices)} for g in mb.groups],
                }
                for mb in self.microbatches
            ],
        }

    @classmethod
    def from_json(cls, text: str) -> StepPlan:
        """Parse :meth:`to_json` output; a malformed field raises ValueError naming its path."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan JSON: invalid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> StepPlan:
        if not isinstance(data, dict):
            raise ValueError("plan JSON: expected an object")
        microbatches = []
        for i, mb in enumerate(_get(data, "microbatches", list, "plan")):
            where = f"microbatches[{i}]"
            if not isinstance(mb, dict):
                raise ValueError(f"plan JSON: {where}: expected an object")
            groups = []
            for j, g in enumerate(_get(mb, "groups", list, where)):
                gwhere = f"{where}.groups[{j}]"
                if not isinstance(g, dict):
                    raise ValueError(f"plan JSON: {gwhere}: expected an object")
                groups.append(Group(_int_list(g, "ranks", gwhere), _int_list(g, "seq_indices", gwhere)))
            microbatches.append(MicroBatch(groups, _optional_number(mb, "predicted_time_s", where)))
        return cls(
            microbatches=microbatches,
            num_ranks=_get(data, "num_ranks", int, "plan"),
            predicted_time_s=float(_get(data, "predicted_time_s", (int, float), "plan")),
            solver=_get(data, "solver", str, "plan"),
            solve_time_s=float(_get(data, "solve_time_s", (int, float), "plan")),
            lower_bound_s=_optional_number(data, "lower_bound_s", "plan"),
            dropped=_int_list(data, "dropped", "plan") if "dropped" in data else [],
            group_sizes=_group_sizes(data),
        )

    def validate(self, lengths: list[int], cost: CostModel | None = None) -> None:
        """Raise ValueError unless every sequence runs exactly once (dropped ones never), every
        micro-batch's groups tile all ranks with aligned power-of-two blocks, and (given a cost
        model) every group fits in memory."""
        n = self.num_ranks
        buddy = self.group_sizes == "pow2"
        if buddy and not is_power_of_two(n):
            raise ValueError(f"plan: num_ranks={n!r}; the planner's buddy groups need a power-of-two number of ranks")
        if not buddy and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"plan: num_ranks={n!r}; must be a positive integer")
        if not self.microbatches and len(self.dropped) < len(lengths):
            raise ValueError("plan: no micro-batches")
        seen = Counter(self.dropped)
        for i, mb in enumerate(self.microbatches):
            _check_tiling(mb, n, f"micro-batch {i}", buddy)
            for j, group in enumerate(mb.groups):
                for k in group.seq_indices:
                    if not 0 <= k < len(lengths):
                        raise ValueError(
                            f"plan: micro-batch {i} group {j} names sequence {k}, not in the batch of {len(lengths)}"
                        )
                seen.update(group.seq_indices)
        for k in range(len(lengths)):
            if seen[k] != 1:
                what = f"appears {seen[k]} times"
                if k in self.dropped and seen[k] > 1:
                    what = "is dropped and also planned"
                raise ValueError(f"plan: sequence {k} {what}; every sequence must run exactly once")
        extra = sorted(set(seen) - set(range(len(lengths))))
        if extra:
            raise ValueError(f"plan: dropped sequence index {extra[0]} is not in the batch of {len(lengths)}")
        if cost is not None:
            for i, mb in enumerate(self.microbatches):
                for j, group in enumerate(mb.groups):
                    _check_memory(cost, [lengths[k] for k in group.seq_indices], group, f"micro-batch {i} group {j}")

    def shapes(self) -> list[str]:
        """Each micro-batch's group degrees, largest first, e.g. '32,16,8x2'."""
        result = []
        for mb in self.microbatches:
            counts = Counter(g.degree for g in mb.groups)
            result.append(",".join(f"{d}x{c}" if c > 1 else f"{d}" for d, c in sorted(counts.items(), reverse=True)))
        return result

    def summary(self) -> dict[str, Any]:
        """A small dict for logs and metrics.jsonl."""
        gap = self.gap_to_lower_bound
        return {
            "microbatches": len(self.microbatches),
            "shape": self.shapes(),
            "predicted_time_s": round(self.predicted_time_s, 6),
            "lower_bound_s": None if self.lower_bound_s is None else round(self.lower_bound_s, 6),
            "gap": None if gap is None else round(gap, 4),
            "solver": self.solver,
            "solve_time_s": round(self.solve_time_s, 4),
            "dropped": len(self.dropped),
        }


def _check_tiling(mb: MicroBatch, num_ranks: int, where: str, buddy: bool = True) -> None:
    covered = []
    for j, group in enumerate(mb.groups):
        d, start = group.degree, group.ranks[0] if group.ranks else -1
        if buddy and not is_power_of_two(d):
            raise ValueError(f"plan: {where} group {j} has {d} ranks; SP degrees are powers of two")
        consecutive = d > 0 and group.ranks == tuple(range(start, start + d))
        if not buddy and not consecutive:
            raise ValueError(f"plan: {where} group {j} ranks {list(group.ranks)} are not consecutive ranks")
        if buddy and (not consecutive or start % d):
            raise ValueError(
                f"plan: {where} group {j} ranks {list(group.ranks)} are not a buddy block "
                f"(consecutive ranks starting at a multiple of {d})"
            )
        covered += group.ranks
    if sorted(covered) != list(range(num_ranks)):
        dup = sorted(r for r, c in Counter(covered).items() if c > 1)
        odd = sorted(set(range(num_ranks)) ^ set(covered))
        raise ValueError(
            f"plan: {where} groups do not tile ranks 0..{num_ranks - 1} exactly "
            f"(ranks in two groups: {dup[:8]}; ranks missing or out of range: {odd[:8]})"
        )


def _check_memory(cost: CostModel, lengths: list[int], group: Group, where: str) -> None:
    if cost.max_degree is not None and group.degree > cost.max_degree:
        raise ValueError(
            f"plan: {where} has {group.degree} ranks but cost model {cost.name!r} allows at most {cost.max_degree}"
        )
    capacity = cost.token_capacity(group.degree)
    if sum(lengths) > capacity:
        raise ValueError(
            f"plan: {where} ({group.degree} ranks) runs {sum(lengths)} tokens but holds at most {capacity} "
            f"under cost model {cost.name!r}"
        )


def _group_sizes(data: dict) -> str:
    value = data.get("group_sizes", "pow2")
    if value not in ("pow2", "any"):
        raise ValueError(f"plan JSON: plan.group_sizes: got {value!r}; allowed: 'pow2', 'any'")
    return value


def _get(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ValueError(f"plan JSON: {where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"plan JSON: {where}.{key}: got {value!r}, of the wrong type")
    return value


def _int_list(data: dict, key: str, where: str) -> list[int]:
    values = _get(data, key, list, where)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"plan JSON: {where}.{key}: expected a list of integers, got {values!r}")
    return values


def _optional_number(data: dict, key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"plan JSON: {where}.{key}: got {value!r}; expected a number or null")
    return float(value)
