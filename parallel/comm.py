"""Collectives over an explicit group, metered, in two layers.

1. ``dist_*`` functions: plain (non-autograd) collectives used inside custom autograd Functions
   such as LASP-2's. They may run asynchronously and every call is counted by the active
   ``CommMeter``s.
2. Autograd functions (``all_gather``, ``reduce_scatter``, ``all_reduce``, ``all_to_all``,
   ``all_to_all_single``, ``send_recv``): one ``torch.autograd.Function`` per collective whose
   backward is the dual collective (all-gather <-> reduce-scatter, all-reduce <-> all-reduce,
   all-to-all <-> inverse all-to-all, shift <-> reverse shift).

Every function takes ``group`` as a required keyword. ``SOLO`` is the group of this process
alone (an SP group of degree 1): every collective on it is the identity and moves no bytes.

Gradient convention: the training loss is the sum of every rank's local loss, so a tensor that
is identical on all ranks after a collective receives the sum of all ranks' gradients. That is
why ``all_reduce``'s backward is an all-reduce and ``all_gather``'s is a reduce-scatter.

Byte accounting (``CommMeter``), per process and per call, for a payload of n bytes and a group
of W ranks; these are the logical volumes of the bandwidth-optimal algorithms, the same on
NCCL and gloo:
- all_gather (n bytes in):            sent (W-1)·n,        received (W-1)·n
- reduce_scatter (n bytes out):       sent (W-1)·n,        received (W-1)·n
- all_reduce (n bytes):               sent 2(W-1)/W·n,     received 2(W-1)/W·n   (ring)
- all_to_all:                          sent = input bytes not kept, received = output bytes not local
- send / recv:                          n
- broadcast (root / others):           sent (W-1)·n / received n
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "SOLO",
    "CommMeter",
    "Group",
    "SoloGroup",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "dist_all_gather",
    "dist_all_reduce",
    "dist_all_to_all",
    "dist_broadcast",
    "dist_irecv",
    "dist_isend",
    "dist_recv",
    "dist_reduce_scatter",
    "dist_send",
    "global_rank",
    "group_rank",
    "group_size",
    "reduce_scatter",
    "send_recv",
]


@dataclass(frozen=True)
class SoloGroup:
    """The group made of this process only (SP degree 1). Collectives on it are identities."""

    def __repr__(self) -> str:
        return "SOLO"


SOLO = SoloGroup()
Group = dist.ProcessGroup | SoloGroup


def group_size(group: Group) -> int:
    return 1 if isinstance(group, SoloGroup) else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's index in ``group`` (0 for SOLO)."""
    return 0 if isinstance(group, SoloGroup) else dist.get_rank(group)


def global_rank(group: Group, rank_in_group: int) -> int:
    if isinstance(group, SoloGroup):
        if rank_in_group != 0:
            raise ValueError(f"SOLO has one rank; got rank_in_group={rank_in_group}")
        return dist.get_rank() if dist.is_initialized() else 0
    return dist.get_global_rank(group, rank_in_group)


def _is_nccl(group: Group) -> bool:
    # "nccl" or "cpu:gloo,cuda:nccl" (ParallelContext's default group on GPUs)
    return not isinstance(group, SoloGroup) and "nccl" in str(dist.get_backend(group))


# --------------------------------------------------------------------------------------------
# Metering. Meters are found through a process-wide registry rather than a contextvar because
# autograd runs backward on its own threads (one per CUDA device), where contextvars set by
# the caller are not visible; backward collectives must be counted too.
# --------------------------------------------------------------------------------------------


@dataclass
class KindCount:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class CommMeter:
    """Counts bytes this process sends and receives, per collective kind, while active.

    >>> with CommMeter() as meter:
    ...     out = all_gather(x, group=g)
    >>> meter.bytes_sent["all_gather"], meter.total_bytes_received
    """

    counts: dict[str, KindCount] = field(default_factory=lambda: defaultdict(KindCount))

    def __enter__(self) -> CommMeter:
        with _METER_LOCK:
            _ACTIVE_METERS.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _METER_LOCK:
            _ACTIVE_METERS.remove(self)

    def _add(self, kind: str, sent: int, received: int) -> None:
        count = self.counts[kind]
        count.calls += 1
        count.bytes_sent += int(sent)
        count.bytes_received += int(received)

    @property
    def bytes_sent(self) -> dict[str, int]:
        return {kind: c.bytes_sent for kind, c in self.counts.items()}

    @property
    def bytes_received(self) -> dict[str, int]:
        return {kind: c.bytes_received for kind, c in self.counts.items()}

    @property
    def calls(self) -> dict[str, int]:
        return {kind: c.calls for kind, c in self.counts.items()}

    @property
    def total_bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.counts.values())

    @property
    def total_bytes_received(self) -> int:
        return sum(c.bytes_received for c in self.counts.values())

    def summary(self) -> dict[str, dict[str, int]]:
        """JSON-ready ``{kind: {calls, bytes_sent, bytes_received}}``."""
        return {kind: vars(c).copy() for kind, c in sorted(self.counts.items())}


_ACTIVE_METERS: list[CommMeter] = []
_METER_LOCK = threading.Lock()


def _record(kind: str, sent: float, received: float) -> None:
    with _METER_LOCK:
        for meter in _ACTIVE_METERS:
            meter._add(kind, int(sent), int(received))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Done:
    """Handle of a collective that already completed (sync call or SOLO group)."""

    def wait(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Plain collectives (no autograd).
# --------------------------------------------------------------------------------------------


def dist_all_gather(x: torch.Tensor, *, group: Group, async_op: bool = False):
    """Gather ``x`` from every rank of ``group``; returns ``(out, handle)`` with ``out`` of shape
    ``[W, *x.shape]`` in group-rank order. Call ``handle.wait()`` before reading ``out``."""
    x = x.contiguous()
    size = group_size(group)
    if size == 1:
        return x.unsqueeze(0), _Done()
    # gloo accepts only the flat (concatenated) output form; the [W, ...] view costs nothing
    flat = torch.empty(size * x.numel(), dtype=x.dtype, device=x.device)
    _record("all_gather", (size - 1) * _nbytes(x), (size - 1) * _nbytes(x))
    work = dist.all_gather_single(flat, x.reshape(-1), group=group, async_op=async_op)
    return flat.view(size, *x.shape), (work if async_op else _Done())


def dist_reduce_scatter(x_W: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Sum over ranks of ``x_W[r]`` for this rank r: ``x_W`` is ``[W, *shape]``, out is ``shape``.

    gloo emulates reduce_scatter with an all-reduce (twice the traffic), so on gloo this is an
    all-to-all of the W slices followed by a local sum: the bandwidth-optimal volume.
    """
    size = group_size(group)
    if x_W.shape[0] != size:
        raise ValueError(f"reduce_scatter input needs leading dim {size} (group size), got {tuple(x_W.shape)}")
    if size == 1:
        return x_W[0]
    x_W = x_W.contiguous()
    slice_bytes = _nbytes(x_W[0])
    _record("reduce_scatter", (size - 1) * slice_bytes, (size - 1) * slice_bytes)
    if _is_nccl(group):
        out = torch.empty_like(x_W[0])
        dist.reduce_scatter_single(out.view(-1), x_W.view(-1), group=group)
        return out
    received_W = torch.empty_like(x_W)
    dist.all_to_all_single(received_W, x_W, group=group)
    return received_W.sum(dim=0)


def dist_all_reduce(x: torch.Tensor, *, group: Group, async_op: bool = False):
    """In-place sum over ``group``; returns ``(x, handle)``."""
    size = group_size(group)
    if size == 1:
        return x, _Done()
    volume = 2 * (size - 1) / size * _nbytes(x)
    _record("all_reduce", volume, volume)
    work = dist.all_reduce(x, group=group, async_op=async_op)
    return x, (work if async_op else _Done())


def dist_all_to_all(
    x: torch.Tensor,
    *,
    group: Group,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """``all_to_all_single`` along dim 0. Without split sizes, dim 0 is cut into W equal parts."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    rank = group_rank(group)
    if (output_split_sizes is None) != (input_split_sizes is None):
        raise ValueError("all_to_all: give both output_split_sizes and input_split_sizes, or neither")
    if input_split_sizes is None:
        if x.shape[0] % size:
            raise ValueError(f"all_to_all: dim 0 ({x.shape[0]}) must be divisible by the group size {size}")
        input_split_sizes = output_split_sizes = [x.shape[0] // size] * size
    row_bytes = _row_bytes(x)
    _record(
        "all_to_all",
        (sum(input_split_sizes) - input_split_sizes[rank]) * row_bytes,
        (sum(output_split_sizes) - output_split_sizes[rank]) * row_bytes,
    )
    out = torch.empty((sum(output_split_sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(
        out, x, output_split_sizes=list(output_split_sizes), input_split_sizes=list(input_split_sizes), group=group
    )
    return out


def _row_bytes(x: torch.Tensor) -> int:
    """Bytes of one index along dim 0 (also when dim 0 is empty)."""
    return x.shape[1:].numel() * x.element_size()


def dist_send(x: torch.Tensor, *, dst: int, group: Group) -> None:
    """Blocking send to group rank ``dst``."""
    if isinstance(group, SoloGroup):
        raise ValueError("send needs a group of at least two ranks, got SOLO")
    _record("send", _nbytes(x), 0)
    dist.send(x.contiguous(), dst=global_rank(group, dst), group=group)


def dist_recv(like: torch.Tensor, *, src: int, group: Group) -> torch.Tensor:
    """Blocking receive from group rank ``src`` into a new tensor shaped like ``like``."""
    if isinstance(group, SoloGroup):
        raise ValueError("recv needs a group of at least two ranks, got SOLO")
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    _record("recv", 0, _nbytes(out))
    dist.recv(out, src=global_rank(group, src), group=group)
    return out


def dist_isend(x: torch.Tensor, *, dst: int, group: Group, tag: int = 0):
    """Non-blocking send to group rank ``dst``; returns the work handle (wait before reusing ``x``)."""
    if isinstance(group, SoloGroup):
        raise ValueError("send needs a group of at least two ranks, got SOLO")
    _record("send", _nbytes(x), 0)
    return dist.isend(x.contiguous(), dst=global_rank(group, dst), group=group, tag=tag)


def dist_irecv(like: torch.Tensor, *, src: int, group: Group, tag: int = 0):
    """Non-blocking receive from group rank ``src``: ``(out, handle)``; read ``out`` after ``handle.wait()``."""
    if isinstance(group, SoloGroup):
        raise ValueError("recv needs a group of at least two ranks, got SOLO")
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    _record("recv", 0, _nbytes(out))
    return out, dist.irecv(out, src=global_rank(group, src), group=group, tag=tag)


def dist_broadcast(x: torch.Tensor, *, src: int, group: Group) -> torch.Tensor:
    """In-place broadcast from group rank ``src``."""
    size = group_size(group)
    if size == 1:
        return x
    if group_rank(group) == src:
        _record("broadcast", (size - 1) * _nbytes(x), 0)
    else:
        _record("broadcast", 0, _nbytes(x))
    dist.broadcast(x, src=global_rank(group, src), group=group)
    return x


# --------------------------------------------------------------------------------------------
# Autograd collectives: the backward of each is its dual.
# --------------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        out_W, _ = dist_all_gather(x, group=group)
        # [W, ..., n, ...] -> [..., W*n, ...] along dim
        return torch.cat(out_W.unbind(0), dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = group_size(ctx.group)
        grad_W = torch.stack(grad.chunk(size, dim=ctx.dim), dim=0)
        return dist_reduce_scatter(grad_W, group=ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        size = group_size(group)
        if x.shape[dim] % size:
            raise ValueError(f"reduce_scatter: dim {dim} ({x.shape[dim]}) must be divisible by group size {size}")
        return dist_reduce_scatter(torch.stack(x.chunk(size, dim=dim), dim=0), group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_W, _ = dist_all_gather(grad, group=ctx.group)
        return torch.cat(grad_W.unbind(0), dim=ctx.dim), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        out, _ = dist_all_reduce(x.clone(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, _ = dist_all_reduce(grad.clone(), group=ctx.group)
        return out, None


class _AllToAllSingle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, output_split_sizes, input_split_sizes) -> torch.Tensor:
        ctx.group, ctx.splits = group, (output_split_sizes, input_split_sizes)
        return dist_all_to_all(
            x, group=group, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_split_sizes, input_split_sizes = ctx.splits
        # the inverse all-to-all: what was received goes back where it came from
        out = dist_all_to_all(
            grad, group=ctx.group, output_split_sizes=input_split_sizes, input_split_sizes=output_split_sizes
        )
        return out, None, None, None


class _SendRecv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dst: int | None, src: int | None) -> torch.Tensor:
        ctx.group, ctx.dst, ctx.src = group, dst, src
        return _shift(x, group=group, dst=dst, src=src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the gradient of what we received goes back to its sender; ours comes from our receiver
        return _shift(grad, group=ctx.group, dst=ctx.src, src=ctx.dst), None, None, None


def _shift(x: torch.Tensor, *, group: Group, dst: int | None, src: int | None) -> torch.Tensor:
    """Send ``x`` to ``dst`` and receive a tensor shaped like ``x`` from ``src`` (either may be
    None), posting both at once so that a ring of these cannot deadlock."""
    ops = []
    out = torch.zeros_like(x)
    if dst is not None:
        _record("send", _nbytes(x), 0)
        ops.append(dist.P2POp(dist.isend, x.contiguous(), global_rank(group, dst), group=group))
    if src is not None:
        _record("recv", 0, _nbytes(x))
        ops.append(dist.P2POp(dist.irecv, out, global_rank(group, src), group=group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return out


def all_gather(x: torch.Tensor, *, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (group-rank order).
    Backward: reduce-scatter (each rank gets the sum over ranks of the gradient of its slice)."""
    if group_size(group) == 1:
        return x
    return _AllGather.apply(x, group, dim)


def reduce_scatter(x: torch.Tensor, *, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's 1/W slice along ``dim``. Backward: all-gather."""
    if group_size(group) == 1:
        return x
    return _ReduceScatter.apply(x, group, dim)


def all_reduce(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Sum over ranks, out of place. Backward: all-reduce (sum-of-losses convention)."""
    if group_size(group) == 1:
        return x
    return _AllReduce.apply(x, group)


def all_to_all_single(
    x: torch.Tensor,
    *,
    group: Group,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """All-to-all along dim 0 with optional uneven splits. Backward: the inverse all-to-all."""
    if group_size(group) == 1:
        return x
    out_splits = None if output_split_sizes is None else list(output_split_sizes)
    in_splits = None if input_split_sizes is None else list(input_split_sizes)
    return _AllToAllSingle.apply(x, group, out_splits, in_splits)


def all_to_all(x: torch.Tensor, *, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into W parts along ``scatter_dim``, send part j to rank j, and concatenate the
    received parts along ``gather_dim`` (Ulysses' sequence <-> heads exchange).
    Backward: the inverse all-to-all (scatter_dim and gather_dim swapped)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[scatter_dim] % size:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} has size {x.shape[scatter_dim]}, not divisible by group size {size}"
        )
    x_W = torch.stack(x.chunk(size, dim=scatter_dim), dim=0)
    out_W = all_to_all_single(x_W.reshape(size, -1), group=group).reshape(x_W.shape)
    return torch.cat(out_W.unbind(0), dim=gather_dim)


def send_recv(x: torch.Tensor, *, group: Group, dst: int | None, src: int | None) -> torch.Tensor:
    """Send ``x`` to group rank ``dst`` and return the same-shaped tensor received from ``src``
    (zeros where ``src`` is None). Backward sends the gradient back to ``src`` and receives the
    gradient of ``x`` from ``dst``."""
    if isinstance(group, SoloGroup):
        raise ValueError("send_recv needs a group of at least two ranks, got SOLO")
    return _SendRecv.apply(x, group, dst, src)
