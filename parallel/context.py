"""ParallelContext: the explicit object that carries ranks, device, backend and process groups.

Nothing in seqmoe reads process groups from module globals: whoever communicates is handed a
``ParallelContext`` (or a group taken from one). The planner assigns sequences to "buddy"
groups: power-of-two blocks of consecutive ranks, a degree-d group starting at a multiple of d
(so a group of <= 8 ranks stays inside an 8-GPU node). Creating a group is collective over all
ranks, so every rank creates the same groups in the same order, eagerly at start-up; after
that a group is found by its rank tuple. A world of W ranks caches at most W-1 buddy groups.

Plans with groups of any size (``StepPlan.group_sizes == 'any'``) use blocks of consecutive
ranks that are not buddy groups. ``ensure_groups`` creates those collectively, in plan order,
when a plan needs them, and keeps at most ``max(W, the current plan's)`` of them, evicting the
least recently used: a world of W ranks then caches at most (W - 1) + max(W, P) groups, P the
distinct non-buddy groups of one plan.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.comm import SOLO, Group

__all__ = ["ParallelContext", "buddy_group_ranks", "init_backend", "primary_backend", "resolve_backend_and_device"]


def buddy_group_ranks(world_size: int) -> list[tuple[int, ...]]:
    """Rank tuples of the cached groups, in creation order: degree 2, 4, 8, ... (ascending start),
    then the whole world if it is not itself a power of two. Degree-1 groups need no process
    group (SOLO)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    groups = []
    degree = 2
    while degree <= world_size:
        groups += [tuple(range(start, start + degree)) for start in range(0, world_size - degree + 1, degree)]
        degree *= 2
    world = tuple(range(world_size))
    if world_size > 1 and world not in groups:
        groups.append(world)
    return groups


def init_backend(backend: str) -> str:
    """What ``init_process_group`` gets for ``backend``: NCCL for CUDA tensors *and* gloo for
    CPU tensors, so object broadcasts (the plan) and host-side reductions keep working on GPUs."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def primary_backend(name: str) -> str:
    """The device backend of a process group's backend string ("cpu:gloo,cuda:nccl" -> "nccl")."""
    name = str(name)
    return "nccl" if "nccl" in name else "gloo" if "gloo" in name else name


def resolve_backend_and_device(backend: str = "auto", device: str = "auto", local_rank: int = 0):
    """``auto`` picks NCCL + cuda:<local_rank> when CUDA is available, else gloo + CPU."""
    has_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if has_cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"parallel.backend: got {backend!r}; allowed: 'auto', 'nccl', 'gloo'")
    if backend == "nccl" and not has_cuda:
        raise ValueError("parallel.backend='nccl' needs CUDA, but torch sees no GPU; use 'gloo' or 'auto'")
    if device == "auto":
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if backend == "nccl" else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not has_cuda:
        raise ValueError(f"parallel.device={device!r} but torch sees no GPU; use 'cpu' or 'auto'")
    if backend == "nccl" and resolved.type != "cuda":
        raise ValueError(f"parallel.backend='nccl' cannot run on device {device!r}; use a cuda device or gloo")
    return backend, resolved


@dataclass
class ParallelContext:
    """Ranks, device, backend and the group cache of one process.

    Build it with :meth:`initialize` (reads the torchrun-style environment: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or :meth:`from_initialized` when the default process
    group already exists.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    world: Group
    _groups: dict[tuple[int, ...], Group] = field(default_factory=dict, repr=False)
    _extra: OrderedDict[tuple[int, ...], Group | None] = field(default_factory=OrderedDict, repr=False)
    """Non-buddy groups made by ensure_groups, least recently used first (on every rank, members or not)."""
    max_extra_groups: int | None = field(default=None, repr=False)
    """Non-buddy groups kept beyond the current plan's (None: the world size)."""
    timeout_s: float | None = field(default=None, repr=False)
    """The collective timeout of every group this context creates (None: torch's default, 30 min)."""

    @classmethod
    def initialize(
        cls,
        *,
        backend: str = "auto",
        device: str = "auto",
        timeout_s: float = 600.0,
        init_method: str | None = None,
    ) -> ParallelContext:
        """Initialise torch.distributed (unless already done) and build the group cache."""
        if not dist.is_initialized():
            rank, world_size, local_rank = _env_ranks()
            backend, _ = resolve_backend_and_device(backend, device, local_rank)
            if init_method is None:
                init_method = _default_init_method(world_size)
            dist.init_process_group(
                backend=init_backend(backend),
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        return cls.from_initialized(backend=backend, device=device, timeout_s=timeout_s)

    @classmethod
    def from_initialized(
        cls, *, backend: str = "auto", device: str = "auto", timeout_s: float | None = None
    ) -> ParallelContext:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call ParallelContext.initialize()")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        actual_backend = primary_backend(dist.get_backend())
        if backend not in ("auto", actual_backend):
            raise ValueError(f"parallel.backend={backend!r} but the process group uses {actual_backend!r}")
        _, resolved_device = resolve_backend_and_device(actual_backend, device, local_rank)
        if resolved_device.type == "cuda":
            torch.cuda.set_device(resolved_device)
        world = dist.group.WORLD if world_size > 1 else SOLO
        ctx = cls(rank, world_size, local_rank, resolved_device, actual_backend, world)
        ctx.timeout_s = timeout_s
        ctx._create_buddy_groups()
        return ctx

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelContext:
        """One process without torch.distributed (every group is SOLO): benchmarks and tests."""
        return cls(0, 1, 0, torch.device(device), "gloo", SOLO)

    def _new_group(self, ranks: tuple[int, ...]) -> Group:
        # new_group does not inherit the world's timeout (it defaults to 30 min): pass it on
        timeout = None if self.timeout_s is None else timedelta(seconds=self.timeout_s)
        return dist.new_group(list(ranks), timeout=timeout)

    def _create_buddy_groups(self) -> None:
        world_ranks = tuple(range(self.world_size))
        for ranks in buddy_group_ranks(self.world_size):
            # new_group is collective over all ranks: everyone calls it, in this same order
            group = self.world if ranks == world_ranks else self._new_group(ranks)
            if self.rank in ranks:
                self._groups[ranks] = group

    def ensure_groups(self, groups: Iterable[Sequence[int]]) -> None:
        """Create the groups (rank tuples, e.g. every group of a plan) that are not cached yet.

        Collective over the world: every rank calls it with the same groups in the same order (a
        broadcast plan gives them). Beyond max(W, this call's groups) non-buddy groups the least
        recently used ones not needed now are destroyed, the same ones on every rank."""
        wanted: list[tuple[int, ...]] = []
        buddies = set(buddy_group_ranks(self.world_size))
        for ranks in groups:
            ranks = tuple(int(r) for r in ranks)
            if len(ranks) >= 2 and ranks not in wanted and ranks not in buddies:
                if any(not 0 <= r < self.world_size for r in ranks):
                    raise ValueError(f"group {ranks} names a rank outside the {self.world_size}-rank world")
                wanted.append(ranks)
        world_ranks = tuple(range(self.world_size))
        for ranks in wanted:
            if ranks in self._extra:
                self._extra.move_to_end(ranks)
                continue
            # new_group is collective over all ranks: everyone calls it, in this same order
            group = self.world if ranks == world_ranks else self._new_group(ranks)
            member = self.rank in ranks
            self._extra[ranks] = group if member else None
            if member:
                self._groups[ranks] = group
        keep = self.world_size if self.max_extra_groups is None else self.max_extra_groups
        limit = max(keep, len(wanted))
        while len(self._extra) > limit:
            victim = next(ranks for ranks in self._extra if ranks not in wanted)
            group = self._extra.pop(victim)
            if group is not None:
                del self._groups[victim]
                if group is not self.world:
                    dist.destroy_process_group(group)

    @property
    def num_cached_groups(self) -> int:
        """Process groups this rank holds a handle to (members only; SOLO is not a group)."""
        return len(self._groups)

    def group(self, ranks: tuple[int, ...] | list[int]) -> Group:
        """The cached group with exactly these ranks; ``(self.rank,)`` gives SOLO."""
        ranks = tuple(ranks)
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} asked for group {ranks}, which it is not a member of")
        if len(ranks) == 1:
            return SOLO
        if ranks not in self._groups:
            raise ValueError(
                f"group {ranks} is not a buddy group of a {self.world_size}-rank world: groups are "
                "power-of-two blocks of consecutive ranks starting at a multiple of their size "
                "(or the whole world); other groups must first be made by ensure_groups"
            )
        return self._groups[ranks]

    def buddy_group_of_degree(self, degree: int) -> tuple[int, ...]:
        """The rank tuple of this rank's buddy group of ``degree``."""
        if degree < 1 or degree & (degree - 1) or degree > self.world_size:
            raise ValueError(f"degree must be a power of two in [1, {self.world_size}], got {degree}")
        start = self.rank - self.rank % degree
        if start + degree > self.world_size:
            raise ValueError(f"rank {self.rank} has no degree-{degree} group in a {self.world_size}-rank world")
        return tuple(range(start, start + degree))

    def destroy(self) -> None:
        self._groups.clear()
        self._extra.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


def _env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; one process if unset."""
    names = ("RANK", "WORLD_SIZE")
    present = [name for name in names if name in os.environ]
    if not present:
        return 0, 1, 0
    if len(present) != len(names):
        missing = sorted(set(names) - set(present))
        raise RuntimeError(
            f"launcher environment is inconsistent: {present} set but {missing} missing; "
            "launch with `seqmoe launch` or torchrun, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 0 <= rank < world_size:
        raise RuntimeError(f"launcher environment is inconsistent: RANK={rank} not in [0, WORLD_SIZE={world_size})")
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


def _default_init_method(world_size: int) -> str:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return "env://"
    if world_size == 1:
        # a private file store: a single process needs no network rendezvous
        fd, path = tempfile.mkstemp(prefix="seqmoe-store-")
        os.close(fd)
        os.remove(path)
        return f"file://{path}"
    raise RuntimeError(
        f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with `seqmoe launch` or torchrun"
    )
