"""Autograd collectives, CommMeter volumes and the buddy-group cache, on 1-4 gloo ranks.

Each rank builds every rank's input from a seed, so it can compute the single-process reference
of the collective and of the gradient of the global loss sum_r <y_r, g_r> by itself.
Tolerances: collectives move fp64 values unchanged and sum at most 4 terms, so forward results
must match to 1e-12 relative; CommMeter counts are integers and must match exactly.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from parallel import comm
from parallel.context import ParallelContext, buddy_group_ranks
from tests.distributed import RankFailure, run_on_ranks

TOL = 1e-12
WORLD_SIZES = [1, 2, 3, 4]


def _rank_tensor(kind: str, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    # a stable seed: str hashes differ between processes
    seed = zlib.crc32(repr((kind, rank, shape)).encode())
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).norm() <= TOL * max(b.norm().item(), 1e-30))


def _run_all_gather(ctx: ParallelContext, dim: int):
    W, r = ctx.world_size, ctx.rank
    shape = (3, 5) if dim == 0 else (4, 2, 3)
    xs = [_rank_tensor("x", s, shape) for s in range(W)]
    y_shape = list(shape)
    y_shape[dim] *= W
    gs = [_rank_tensor("g", s, tuple(y_shape)) for s in range(W)]
    x = xs[r].clone().requires_grad_()
    with comm.CommMeter() as meter:
        y = comm.all_gather(x, group=ctx.world, dim=dim)
        (y * gs[r]).sum().backward()
    ref_grad = sum(g.chunk(W, dim=dim)[r] for g in gs)
    n = xs[r].numel() * 8
    return (
        _close(y.detach(), torch.cat(xs, dim=dim)),
        _close(x.grad, ref_grad),
        meter.summary(),
        {"all_gather": ((W - 1) * n,) * 2, "reduce_scatter": ((W - 1) * n,) * 2},
    )


def _run_reduce_scatter(ctx: ParallelContext):
    W, r = ctx.world_size, ctx.rank
    xs = [_rank_tensor("x", s, (2 * W, 3)) for s in range(W)]
    gs = [_rank_tensor("g", s, (2, 3)) for s in range(W)]
    x = xs[r].clone().requires_grad_()
    with comm.CommMeter() as meter:
        y = comm.reduce_scatter(x, group=ctx.world, dim=0)
        (y * gs[r]).sum().backward()
    n = 2 * 3 * 8
    return (
        _close(y.detach(), sum(t.chunk(W, dim=0)[r] for t in xs)),
        _close(x.grad, torch.cat(gs, dim=0)),
        meter.summary(),
        {"reduce_scatter": ((W - 1) * n,) * 2, "all_gather": ((W - 1) * n,) * 2},
    )


def _run_all_reduce(ctx: ParallelContext):
    W, r = ctx.world_size, ctx.rank
    xs = [_rank_tensor("x", s, (4, 5)) for s in range(W)]
    gs = [_rank_tensor("g", s, (4, 5)) for s in range(W)]
    x = xs[r].clone().requires_grad_()
    with comm.CommMeter() as meter:
        y = comm.all_reduce(x, group=ctx.world)
        (y * gs[r]).sum().backward()
    # forward and backward: each 2(W-1)/W of the 20 fp64 values, each way
    volume = 2 * int(2 * (W - 1) / W * 20 * 8)
    return (
        _close(y.detach(), sum(xs)),
        _close(x.grad, sum(gs)),
        meter.summary(),
        {"all_reduce": (volume, volume)},
    )


def _run_all_to_all(ctx: ParallelContext, scatter_dim: int, gather_dim: int):
    W, r = ctx.world_size, ctx.rank
    shape = [2, 3, 2]
    shape[scatter_dim] *= W
    xs = [_rank_tensor("x", s, tuple(shape)) for s in range(W)]
    x = xs[r].clone().requires_grad_()
    ref = torch.cat([t.chunk(W, dim=scatter_dim)[r] for t in xs], dim=gather_dim)
    gs = [_rank_tensor("g", s, tuple(ref.shape)) for s in range(W)]
    with comm.CommMeter() as meter:
        y = comm.all_to_all(x, group=ctx.world, scatter_dim=scatter_dim, gather_dim=gather_dim)
        (y * gs[r]).sum().backward()
    ref_grad = torch.cat([g.chunk(W, dim=gather_dim)[r] for g in gs], dim=scatter_dim)
    n = xs[r].numel() * 8
    return (
        _close(y.detach(), ref),
        _close(x.grad, ref_grad),
        meter.summary(),
        # forward and backward each keep 1/W of the n bytes local
        {"all_to_all": (2 * (W - 1) * n // W,) * 2},
    )


def _splits(W: int) -> list[list[int]]:
    """rows[s][d]: rows rank s sends to rank d; uneven, with zeros."""
    return [[(s + 2 * d) % 3 for d in range(W)] for s in range(W)]


def _run_all_to_all_single(ctx: ParallelContext):
    W, r = ctx.world_size, ctx.rank
    rows = _splits(W)
    xs = [_rank_tensor("x", s, (sum(rows[s]), 3)) for s in range(W)]
    x = xs[r].clone().requires_grad_()
    pieces = [list(t.split(rows[s], dim=0)) for s, t in enumerate(xs)]
    ref = torch.cat([pieces[s][r] for s in range(W)], dim=0)
    gs = [_rank_tensor("g", s, (sum(rows[q][s] for q in range(W)), 3)) for s in range(W)]
    in_splits, out_splits = rows[r], [rows[s][r] for s in range(W)]
    with comm.CommMeter() as meter:
        y = comm.all_to_all_single(x, group=ctx.world, output_split_sizes=out_splits, input_split_sizes=in_splits)
        (y * gs[r]).sum().backward()
    grad_pieces = [list(g.split([rows[q][s] for q in range(W)], dim=0)) for s, g in enumerate(gs)]
    ref_grad = torch.cat([grad_pieces[d][r] for d in range(W)], dim=0)
    # forward sends what backward receives and vice versa; rows are 3 fp64 values
    remote = (sum(in_splits) - in_splits[r] + sum(out_splits) - out_splits[r]) * 24
    return (_close(y.detach(), ref), _close(x.grad, ref_grad), meter.summary(), {"all_to_all": (remote, remote)})


def _run_send_recv(ctx: ParallelContext, ring: bool):
    W, r = ctx.world_size, ctx.rank
    xs = [_rank_tensor("x", s, (3, 4)) for s in range(W)]
    gs = [_rank_tensor("g", s, (3, 4)) for s in range(W)]
    if ring:
        dst, src = (r + 1) % W, (r - 1) % W
    else:  # a chain: rank 0 only sends, the last rank only receives
        dst = r + 1 if r + 1 < W else None
        src = r - 1 if r > 0 else None
    x = xs[r].clone().requires_grad_()
    with comm.CommMeter() as meter:
        y = comm.send_recv(x, group=ctx.world, dst=dst, src=src)
        (y * gs[r]).sum().backward()
    ref = xs[src] if src is not None else torch.zeros(3, 4, dtype=torch.float64)
    ref_grad = gs[dst] if dst is not None else torch.zeros(3, 4, dtype=torch.float64)
    # forward sends to dst and receives from src; backward the reverse: per direction n bytes per peer
    n = 12 * 8
    per_pass = (n if dst is not None else 0) + (n if src is not None else 0)
    return (
        _close(y.detach(), ref),
        _close(x.grad, ref_grad),
        meter.summary(),
        {"send": (per_pass, 0), "recv": (0, per_pass)},
    )


def _check(results, world_size: int) -> None:
    for rank, (fwd_ok, grad_ok, summary, expected) in enumerate(results):
        assert fwd_ok, f"rank {rank}: forward differs from the single-process reference"
        assert grad_ok, f"rank {rank}: gradient differs from the single-process reference"
        if world_size == 1:
            assert summary == {}, "a 1-rank group must move no bytes"
            continue
        assert set(summary) == set(expected), (rank, summary)
        for kind, (sent, received) in expected.items():
            assert (summary[kind]["bytes_sent"], summary[kind]["bytes_received"]) == (sent, received), (rank, kind)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dim", [0, 1])
def test_all_gather(world_size, dim):
    _check(run_on_ranks(world_size, _run_all_gather, dim), world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_reduce_scatter(world_size):
    _check(run_on_ranks(world_size, _run_reduce_scatter), world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_reduce(world_size):
    _check(run_on_ranks(world_size, _run_all_reduce), world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scatter_dim,gather_dim", [(0, 1), (1, 0), (2, 1)], ids=["s0g1", "s1g0", "s2g1"])
def test_all_to_all(world_size, scatter_dim, gather_dim):
    _check(run_on_ranks(world_size, _run_all_to_all, scatter_dim, gather_dim), world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_to_all_single_uneven(world_size):
    _check(run_on_ranks(world_size, _run_all_to_all_single), world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "chain"])
def test_send_recv(world_size, ring):
    _check(run_on_ranks(world_size, _run_send_recv, ring), world_size)


def test_solo_group_is_identity_and_free():
    x = torch.randn(3, 4, requires_grad=True)
    with comm.CommMeter() as meter:
        for fn in (comm.all_gather, comm.reduce_scatter, comm.all_reduce):
            assert fn(x, group=comm.SOLO) is x
        out, handle = comm.dist_all_gather(x, group=comm.SOLO, async_op=True)
        handle.wait()
        assert out.shape == (1, 3, 4)
    assert meter.summary() == {}
    with pytest.raises(ValueError, match="SOLO"):
        comm.send_recv(x, group=comm.SOLO, dst=0, src=0)


def _run_async_all_gather(ctx: ParallelContext):
    x = torch.full((2, 2), float(ctx.rank))
    out, handle = comm.dist_all_gather(x, group=ctx.world, async_op=True)
    handle.wait()
    return out[:, 0, 0].tolist()


def test_async_all_gather():
    for rank_out in run_on_ranks(3, _run_async_all_gather):
        assert rank_out == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Buddy-group cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world_size,expected",
    [
        (1, []),
        (2, [(0, 1)]),
        (3, [(0, 1), (0, 1, 2)]),
        (4, [(0, 1), (2, 3), (0, 1, 2, 3)]),
        (8, [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1, 2, 3), (4, 5, 6, 7), tuple(range(8))]),
    ],
)
def test_buddy_group_ranks_order(world_size, expected):
    assert buddy_group_ranks(world_size) == expected


@pytest.mark.parametrize("world_size", range(1, 65))
def test_buddy_group_count_at_most_world_minus_one(world_size):
    groups = buddy_group_ranks(world_size)
    assert len(groups) <= max(world_size - 1, 0)
    assert len(set(groups)) == len(groups)
    for ranks in groups:
        size = len(ranks)
        if ranks != tuple(range(world_size)):
            assert size & (size - 1) == 0 and ranks[0] % size == 0


def _run_group_cache(ctx: ParallelContext):
    W, r = ctx.world_size, ctx.rank
    mine = [ranks for ranks in buddy_group_ranks(W) if r in ranks]
    sums = {}
    for ranks in mine:
        group = ctx.group(ranks)
        t = torch.tensor([float(r)])
        dist.all_reduce(t, group=group)
        sums[ranks] = (t.item(), comm.group_size(group), comm.group_rank(group))
    # (1, 2) is consecutive but does not start at a multiple of 2; the other tuple lacks this rank
    bad_cases = [(1, 2)] if W >= 3 and r in (1, 2) else []
    bad_cases += [tuple(x for x in range(W) if x != r)] if W > 1 else []
    errors = []
    for bad in bad_cases:
        try:
            ctx.group(bad)
        except ValueError as exc:
            errors.append(str(exc))
    errors = (len(bad_cases), errors)
    degrees = {}
    d = 1
    while d <= W:
        try:
            degrees[d] = ctx.buddy_group_of_degree(d)
        except ValueError:
            degrees[d] = None
        d *= 2
    return ctx.num_cached_groups, sums, ctx.group((r,)) is comm.SOLO, errors, degrees


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_group_cache(world_size):
    for rank, (count, sums, solo, errors, degrees) in enumerate(run_on_ranks(world_size, _run_group_cache)):
        assert count <= max(world_size - 1, 0)
        assert count == sum(rank in g for g in buddy_group_ranks(world_size))
        assert solo
        for ranks, (total, size, rank_in_group) in sums.items():
            assert total == float(sum(ranks)) and size == len(ranks) and rank_in_group == ranks.index(rank)
        num_bad, messages = errors
        assert len(messages) == num_bad and all("not" in m for m in messages), messages
        for degree, ranks in degrees.items():
            if ranks is not None:
                assert len(ranks) == degree and rank in ranks and ranks[0] % degree == 0


# ---------------------------------------------------------------------------------------------
# The harness itself: failures and deadlocks surface as errors, never as hangs.
# ---------------------------------------------------------------------------------------------


def _raise_on_rank_one(ctx: ParallelContext):
    if ctx.rank == 1:
        raise ValueError("boom on rank one")
    return ctx.rank


def _rank_only(ctx: ParallelContext):
    return ctx.rank


def _deadlock(ctx: ParallelContext):
    if ctx.rank == 0:
        dist.barrier(group=ctx.world)
    return ctx.rank


def test_harness_reports_rank_exceptions():
    with pytest.raises(RankFailure, match="boom on rank one"):
        run_on_ranks(2, _raise_on_rank_one)


def test_harness_times_out_on_deadlock():
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\]"):
        run_on_ranks(2, _deadlock, timeout_s=3)
    # the pool is rebuilt: the next call works
    assert run_on_ranks(2, _rank_only) == [0, 1]


def test_gpu_default_group_has_a_cpu_backend_too():
    """On GPUs the default group is NCCL for CUDA tensors and gloo for CPU ones (object
    broadcasts, host-side reductions); the context reports the device backend."""
    from parallel.context import init_backend, primary_backend

    assert init_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert init_backend("gloo") == "gloo"
    assert primary_backend("cpu:gloo,cuda:nccl") == "nccl"
    assert primary_backend("gloo") == "gloo"
